"""The trainer's text encoder and VAE, chosen by the config; their widths must fit the model config.

- text: `hashed` (a fixed vector per word; tests), `words` (the built-in word-level encoder, frozen at
  a seeded initialisation so every process and every resume builds the same one, or the one saved
  in the `[init]` bundle when there is one; it ships in the exported bundle), `hf` (T5, CLIP or any
  Hugging Face encoder from `text_encoder_path`, offline; with `pooled_text_encoder_path`, the pooled
  embedding comes from that CLIP-like encoder instead);
- vae: `pixel` (pixel space, the built-in model's) or `diffusers` (an AutoencoderKL from `vae_path`; a
  single original-format file, e.g. ComfyUI's `sdxl_vae.safetensors`, with `vae_config = "sdxl"`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from ..bundle import load_word_encoder
from ..data import objects, shapes
from ..data.config import DataConfig, DataKind
from ..encoders.hashed import HashedTextEncoder
from ..encoders.pixel import PixelVAE
from ..encoders.words import WordTextEncoder
from ..interfaces import TextEncoder, VideoVAE
from .config import ConfigError, TextEncoderKind, TrainConfig, VAEKind

log = logging.getLogger(__name__)


def build_encoders(config: TrainConfig, device: torch.device | str = "cpu") -> tuple[TextEncoder, VideoVAE]:
    vae = build_vae(config, device)
    return build_text_encoder(config, device), vae


def build_vae(config: TrainConfig, device: torch.device | str) -> VideoVAE:
    m = config.model
    if config.vae == VAEKind.DIFFUSERS:
        from ..encoders.vae import DiffusersVAE

        vae = DiffusersVAE(config.vae_path, config=config.vae_config or None, device=device)
    else:
        vae = PixelVAE()
    if m.latent_channels != vae.latent_channels:
        raise ConfigError(f"model.latent_channels is {m.latent_channels}, but the {config.vae.value} VAE gives "
                          f"{vae.latent_channels} channels: set model.latent_channels = {vae.latent_channels}")
    step = vae.spatial_factor * m.patch_size
    for frames, height, width in config.data.buckets:
        if height % step or width % step:
            raise ConfigError(f"data.buckets: {width}x{height} px is not a multiple of {step} (VAE factor "
                              f"{vae.spatial_factor} x patch {m.patch_size})")
    return vae


def build_text_encoder(config: TrainConfig, device: torch.device | str) -> TextEncoder:
    m = config.model
    if config.text_encoder == TextEncoderKind.WORDS:
        _need_widths(m, m.text_dim, m.text_dim, "the word encoder (pooled = token width)")
        words = _init_word_encoder(config)
        if words is None:
            words = WordTextEncoder.seeded(vocabulary(config.data), dim=m.text_dim, max_tokens=m.max_text_tokens,
                                           seed=config.seed)
        return words.to(device).eval().requires_grad_(False)
    if config.text_encoder == TextEncoderKind.HF:
        from ..encoders.hf import HFTextEncoder

        encoder = HFTextEncoder(config.text_encoder_path, max_tokens=m.max_text_tokens, device=device)
        what = config.text_encoder_path
        if config.pooled_text_encoder_path:
            from ..encoders.combined import CombinedTextEncoder

            pooled = HFTextEncoder(config.pooled_text_encoder_path, max_tokens=m.max_text_tokens, device=device)
            encoder = CombinedTextEncoder(encoder, pooled)
            what = f"{config.text_encoder_path} (tokens) + {config.pooled_text_encoder_path} (pooled)"
        _need_widths(m, encoder.dim, encoder.pooled_dim, what)
        return encoder
    if m.pooled_text_dim > m.text_dim:
        raise ConfigError(f"model.pooled_text_dim ({m.pooled_text_dim}) must be <= model.text_dim "
                          f"({m.text_dim}) for the hashed text encoder")
    return HashedTextEncoder(m.text_dim, m.pooled_text_dim, m.max_text_tokens)


def word_encoder_origin(config: TrainConfig) -> str:
    """Which word encoder a run with `config` reads: 'init:PATH' (the one saved in init.path) or 'seed:N'."""
    return f"init:{config.init.path}" if _saved_word_encoder(config.init.path) is not None else f"seed:{config.seed}"


def _saved_word_encoder(path: str) -> Optional[WordTextEncoder]:
    return load_word_encoder(path) if path and Path(path).is_file() else None


def _init_word_encoder(config: TrainConfig) -> Optional[WordTextEncoder]:
    """The word encoder saved in `init.path` (a bundle), if any: the model there learnt to read exactly
    that one, so a finetune keeps it whatever `seed` says (a seeded one would be a different encoder)."""
    path = config.init.path  # the weights that read the text (cross-attention) come from here
    words = _saved_word_encoder(path)
    if words is None:
        return None
    m = config.model
    if (words.dim, words.max_tokens) != (m.text_dim, m.max_text_tokens):
        raise ConfigError(f"the word encoder in init.path {path!r} gives {words.dim}-wide tokens, at most "
                          f"{words.max_tokens}; the model takes {m.text_dim} / {m.max_text_tokens}")
    log.info("text: the word encoder saved in %s (%d words)", path, len(words.vocab))
    grown = words.with_words(vocabulary(config.data), seed=config.seed)
    if grown is not words:
        log.info("text: %d words of the data added to it: %s", len(grown.vocab) - len(words.vocab),
                 ", ".join(grown.vocab[len(words.vocab):]))
    return grown


def vocabulary(data: DataConfig) -> tuple[str, ...]:
    """The words a procedural domain's captions use (the shapes domain's for every other kind)."""
    return objects.VOCABULARY if data.kind == DataKind.OBJECTS else shapes.VOCABULARY


def _need_widths(model, dim: int, pooled: int, what: str) -> None:
    if (model.text_dim, model.pooled_text_dim) != (dim, pooled):
        raise ConfigError(f"model.text_dim / model.pooled_text_dim are {model.text_dim} / {model.pooled_text_dim}, "
                          f"but {what} gives {dim} / {pooled}: set them to match")
