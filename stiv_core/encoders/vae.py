"""Real per-frame VAEs from LOCAL files, offline: diffusers `AutoencoderKL` (SD, SDXL, SD3 / Flux-style
16 channels, any channel count) behind the `VideoVAE` protocol.

diffusers is imported only here and only when such a VAE is built; nothing is downloaded. Accepted:
- a diffusers folder (`config.json` + weights), e.g. `sdxl-vae/` or `stable-diffusion-xl-base-1.0/vae`;
- a single `.safetensors` file with diffusers key names plus its `config.json` (beside it, or `config=`);
- a single original-format (LDM / ComfyUI `models/vae`) file, converted by diffusers' single-file
  loader, which also needs the diffusers config folder (`config=`): offline it cannot fetch one.
Latents are `(z - shift_factor) * scaling_factor`, per frame, encoded and decoded in chunks of frames.
"""
from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Optional

import torch

CONFIG_FILE = "config.json"


class LatentSampling(str, enum.Enum):
    MODE = "mode"      # the posterior mean: deterministic (the usual choice for caching latents)
    SAMPLE = "sample"  # a draw from the posterior, as SD's training does


def import_diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("real VAEs need the diffusers package: pip install diffusers "
                          "(the built-in model needs none: it works in pixel space)") from err
    return diffusers


class DiffusersVAE:
    """A diffusers AutoencoderKL applied to each frame of `(B, 3, T, H, W)` pixels in [-1, 1]."""

    def __init__(self, path: str | Path, *, config: Optional[str | Path] = None, chunk_frames: int = 8,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 sampling: LatentSampling = LatentSampling.MODE, generator: Optional[torch.Generator] = None):
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.vae = load_autoencoder_kl(path, config=config).to(device=device, dtype=dtype).eval()
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.chunk_frames, self.sampling, self.generator = chunk_frames, LatentSampling(sampling), generator

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, 3, T, H, W)` in [-1, 1] -> scaled latents `(B, C, T, H / f, W / f)` (float32)."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"encode takes (B, 3, T, H, W) pixels, got {tuple(pixels.shape)}")
        f = self.spatial_factor
        if pixels.shape[-2] % f or pixels.shape[-1] % f:
            raise ValueError(f"frame size {pixels.shape[-2]}x{pixels.shape[-1]} is not divisible by the VAE "
                             f"factor {f}")
        return self._per_frame(pixels, self._encode_frames)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents `(B, C, T, h, w)` -> pixels `(B, 3, T, h * f, w * f)` in [-1, 1] (float32)."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode takes (B, {self.latent_channels}, T, h, w) latents, got "
                             f"{tuple(latents.shape)}")
        return self._per_frame(latents, self._decode_frames).clamp(-1, 1)

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(frames).latent_dist
        z = dist.mode() if self.sampling is LatentSampling.MODE else dist.sample(generator=self.generator)
        return (z - self.shift_factor) * self.scaling_factor

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample

    def _per_frame(self, x: torch.Tensor, fn) -> torch.Tensor:
        """`fn` on `(N, C, H, W)` frames, `chunk_frames` at a time; `(B, C, T, H, W)` in and out."""
        b, _, t = x.shape[:3]
        param = next(self.vae.parameters())
        frames = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        outs = [fn(chunk.to(device=param.device, dtype=param.dtype)).float()
                for chunk in frames.split(self.chunk_frames)]
        out = torch.cat(outs)
        return out.unflatten(0, (b, t)).transpose(1, 2).to(x.device)


def load_autoencoder_kl(path: str | Path, *, config: Optional[str | Path] = None):
    """An AutoencoderKL from a local folder or single file (see the module docstring); never downloads."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE {str(path)!r} does not exist: give a diffusers folder with {CONFIG_FILE} "
                                f"or a .safetensors file")
    diffusers = import_diffusers()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_FILE}: not a diffusers AutoencoderKL folder")
        return diffusers.AutoencoderKL.from_pretrained(path, local_files_only=True)
    if path.suffix not in (".safetensors", ".sft"):
        raise ValueError(f"{path.name}: only .safetensors VAE files are loaded (pickle can run code)")
    config_file = _config_file(path, config)
    from safetensors.torch import load_file

    state = load_file(str(path))
    if any(k.startswith("encoder.down_blocks.") for k in state):  # diffusers key names
        vae = diffusers.AutoencoderKL.from_config(json.loads(config_file.read_text()))
        vae.load_state_dict(state)
        return vae
    return diffusers.AutoencoderKL.from_single_file(str(path), config=str(config_file.parent),
                                                    local_files_only=True)


def _config_file(path: Path, config: Optional[str | Path]) -> Path:
    candidates = [Path(config)] if config else [path.with_suffix(".json"), path.parent / CONFIG_FILE]
    for candidate in candidates:
        file = candidate / CONFIG_FILE if candidate.is_dir() else candidate
        if file.is_file():
            return file
    raise FileNotFoundError(f"no AutoencoderKL config for {path.name}: a single file needs its diffusers "
                            f"{CONFIG_FILE} (beside it, as {path.stem}.json, or passed as config=); offline "
                            f"it cannot be fetched. Looked at: {[str(c) for c in candidates]}")
