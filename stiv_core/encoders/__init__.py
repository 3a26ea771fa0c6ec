"""Text encoders and VAEs that follow `stiv_core.interfaces` (built-in ones; real ones load from local folders).

The kinds below name them in a trainer config and in the `trained_with` record of an exported model.
"""
import enum


class TextEncoderKind(str, enum.Enum):
    HASHED = "hashed"  # a fixed random vector per word, no position (tests, stand-ins)
    WORDS = "words"    # the built-in word-level encoder (with positions), shipped in the model bundle
    HF = "hf"          # T5 / CLIP / any Hugging Face encoder from text_encoder_path (local, offline)


class VAEKind(str, enum.Enum):
    PIXEL = "pixel"          # pixel space: an exact identity (the built-in model)
    DIFFUSERS = "diffusers"  # an AutoencoderKL (SD, SDXL, ...) from vae_path (local, offline)
