"""A model with the text encoder and VAE it was trained with, in ONE safetensors file.

The transformer's weights are stored under their own names, the built-in word encoder's under
`text_encoder.` (its vocabulary in the metadata), and the metadata names the VAE and the size the
model was trained at (the CLI's defaults). `load_pipeline("tiny")` loads the built-in model that
ships in `stiv_core/weights/`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open

from .checkpoint import CheckpointError, check_safetensors, load_model, read_metadata, save_model, save_state_dict
from .checkpoint import CONFIG_KEY, TEXT_ENCODER_PREFIX, metadata_record, model_metadata
from .encoders import TextEncoderKind, VAEKind
from .encoders.pixel import PixelVAE
from .encoders.words import VOCAB_KEY, WordTextEncoder
from .model.transformer import STIVTransformer
from .pipeline import STIVPipeline

_WEIGHTS = Path(__file__).resolve().parent / "weights"
BUILTIN_MODELS = {"tiny": _WEIGHTS / "stiv_tiny.safetensors",         # video: T2V, TI2V, ... (configs/tiny.toml)
                  "tiny-mv": _WEIGHTS / "stiv_tiny_mv.safetensors"}   # multi-view (configs/tiny_mv.toml)
BUILTIN_CONFIGS = {"tiny": "tiny.toml", "tiny-mv": "tiny_mv.toml"}
VAE_KEY, DEFAULTS_KEY, ENCODERS_KEY = "vae", "sampling_defaults", "trained_with"
SUPPORTED_VAES = (VAEKind.PIXEL.value,)
# What a bundle's weights are loaded in unless a caller asks otherwise: the built-in file is stored in
# float16 to stay small, and float16 matmuls on a CPU without native half support run several times
# slower than float32 (6x on an AMD EPYC here; see BENCHMARKS.md).
LOAD_DTYPE = torch.float32


@dataclass(frozen=True)
class SamplingDefaults:
    """What the model was trained for: the CLI and nodes start from these."""

    num_frames: int = 16
    height: int = 32
    width: int = 32
    fps: float = 8.0
    steps: int = 25
    shift: float = 1.0
    multiview: bool = False   # the frames are views (data/objects.py): frame 0 given, num_frames fixed
    scale: float = 7.5        # the guidance scale it samples best with (the paper's JIT-CFG 7.5 for video)


@dataclass(frozen=True)
class TrainedWith:
    """What a bare model (no bundled encoders) was trained with, so a user can connect the same ones.

    Latents were `(raw - shift_factor) * scaling_factor` of a `vae_kind` VAE ("pixel" / "diffusers",
    `vae_family` e.g. "sdxl" when one was named) with `latent_channels` channels and `spatial_factor`
    pixels per latent; text: a `text_encoder` ("hf", ...) giving `text_dim`-wide tokens and a
    `pooled_text_dim`-wide pooled vector, taken from a CLIP when `pooled_from_clip`.
    """

    vae_kind: VAEKind = VAEKind.PIXEL
    latent_channels: int = 3
    spatial_factor: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    vae_family: str = ""
    text_encoder: TextEncoderKind = TextEncoderKind.HF
    text_encoder_name: str = ""
    text_dim: int = 0
    pooled_text_dim: int = 0
    pooled_from_clip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "vae_kind", VAEKind(self.vae_kind))
        object.__setattr__(self, "text_encoder", TextEncoderKind(self.text_encoder))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def save_bare_model(path: str | os.PathLike, model: STIVTransformer, trained_with: TrainedWith, *,
                    defaults: SamplingDefaults = SamplingDefaults(), dtype: Optional[torch.dtype] = None) -> None:
    """A model without its encoders (`load_model` reads it), recording what it was trained with and at."""
    save_model(path, model, dtype=dtype, metadata={ENCODERS_KEY: trained_with.to_json(),
                                                   DEFAULTS_KEY: json.dumps(asdict(defaults))})


def read_trained_with(path: str | os.PathLike) -> Optional[TrainedWith]:
    """The record of a bare model's encoders; None for a bundle or a model exported without one."""
    meta = read_metadata(path)
    return metadata_record(path, meta, ENCODERS_KEY, TrainedWith) if ENCODERS_KEY in meta else None


def save_bundle(path: str | os.PathLike, model: STIVTransformer, text_encoder: WordTextEncoder, *,
                defaults: SamplingDefaults = SamplingDefaults(), dtype: Optional[torch.dtype] = None,
                metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write model + word encoder (optionally cast to `dtype`) + pixel VAE spec atomically."""
    cast = lambda v: v.detach().to(dtype or v.dtype).contiguous().cpu()
    state = {k: cast(v) for k, v in model.state_dict().items()}
    state.update({TEXT_ENCODER_PREFIX + k: cast(v) for k, v in text_encoder.state_dict().items()})
    meta = {**model_metadata(model.config, metadata), VAE_KEY: VAEKind.PIXEL.value, DEFAULTS_KEY: json.dumps(asdict(defaults)),
            **text_encoder.metadata()}
    save_state_dict(path, state, meta)


def resolve_model_path(ref: str | os.PathLike) -> Path:
    """A built-in name ('tiny') or a file path -> the checkpoint's path, with a clear error if absent."""
    if str(ref) in BUILTIN_MODELS:
        path = BUILTIN_MODELS[str(ref)]
        if not path.is_file():
            raise FileNotFoundError(f"the built-in {ref!r} model is not in this checkout ({path}); train it with "
                                    f"python stiv_core/train.py --config stiv_core/configs/{BUILTIN_CONFIGS[str(ref)]}")
        return path
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"no model file {str(path)!r}; give a .safetensors path or one of "
                                f"{sorted(BUILTIN_MODELS)}")
    return path


def load_defaults(path: str | os.PathLike) -> SamplingDefaults:
    meta = read_metadata(path)
    return metadata_record(path, meta, DEFAULTS_KEY, SamplingDefaults) if DEFAULTS_KEY in meta else SamplingDefaults()


def load_pipeline(ref: str | os.PathLike, *, device: str | torch.device = "cpu",
                  dtype: Optional[torch.dtype] = LOAD_DTYPE) -> STIVPipeline:
    """The STIVPipeline of a bundle (a built-in name or a path), in eval mode on `device`, its weights in
    `dtype` (None: the stored dtype)."""
    path = resolve_model_path(ref)
    meta = read_metadata(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path.name}: this is not a STIV checkpoint (no STIV config in its metadata)")
    if VOCAB_KEY not in meta or meta.get(VAE_KEY) not in SUPPORTED_VAES:
        raise CheckpointError(f"{path.name} is a bare STIV model without its text encoder and VAE; load it with "
                              f"stiv_core.checkpoint.load_model and pass your own encoders")
    model = load_model(path, device=device, dtype=dtype)
    return STIVPipeline(model, _read_word_encoder(path, meta).to(device), PixelVAE())


def load_word_encoder(path: str | os.PathLike) -> Optional[WordTextEncoder]:
    """The word encoder saved in a bundle (float32, eval, frozen), or None if the file has none."""
    meta = read_metadata(path)
    return _read_word_encoder(path, meta) if VOCAB_KEY in meta else None


def _read_word_encoder(path: str | os.PathLike, meta: Mapping[str, str]) -> WordTextEncoder:
    text_encoder = metadata_record(path, meta, VOCAB_KEY, WordTextEncoder.from_spec)
    with safe_open(str(check_safetensors(path)), framework="pt", device="cpu") as f:
        state = {k[len(TEXT_ENCODER_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(TEXT_ENCODER_PREFIX)}
    text_encoder.load_state_dict({k: v.float() for k, v in state.items()})
    return text_encoder.eval().requires_grad_(False)
