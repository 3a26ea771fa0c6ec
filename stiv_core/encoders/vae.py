"""Real per-frame VAEs from LOCAL files, offline: diffusers `AutoencoderKL` (SD, SDXL, SD3 / Flux-style
16 channels, any channel count) behind the `VideoVAE` protocol.

diffusers is imported only here and only when such a VAE is built; nothing is downloaded. Accepted:
- a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`, never a pickle `.bin`), e.g.
  `sdxl-vae/` or `stable-diffusion-xl-base-1.0/vae`;
- a single `.safetensors` file, with original (LDM / ComfyUI `models/vae`, e.g. `sdxl_vae.safetensors`)
  or diffusers key names, and either its family (`config="sdxl"`; also "sd", "sd3", "flux": the
  architecture is read from the tensor shapes, the latent scale and shift are the family's) or its
  diffusers `config.json` (`config=`, or beside the file as `<stem>.json` / `config.json`). Original
  names are converted by diffusers' single-file loader, given that config from a local folder.
Latents are `(z - shift_factor) * scaling_factor`, per frame, encoded and decoded in chunks of frames.
"""
from __future__ import annotations

import enum
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .weight_folders import require_safetensors

CONFIG_FILE = "config.json"
SAFETENSORS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name (SAFETENSORS_WEIGHTS_NAME)


class VAEFamily(str, enum.Enum):
    SD = "sd"        # SD 1.x / 2.x
    SDXL = "sdxl"
    SD3 = "sd3"
    FLUX = "flux"


# family: (latent channels, scaling_factor, shift_factor, sample_size), as in the families' diffusers configs
FAMILIES: dict[VAEFamily, tuple[int, float, Optional[float], int]] = {
    VAEFamily.SD: (4, 0.18215, None, 512),
    VAEFamily.SDXL: (4, 0.13025, None, 1024),
    VAEFamily.SD3: (16, 1.5305, 0.0609, 1024),
    VAEFamily.FLUX: (16, 0.3611, 0.1159, 1024),
}
VAEConfigSource = Union[VAEFamily, str, Path, None]  # a family (or its name), a config.json or its folder


@dataclass(frozen=True)
class KeyNames:
    """Where a key style keeps the tensors whose shapes give the architecture."""

    down: str          # "{i}" = level, "{j}" = block within it
    mid_attention: str

    @property
    def mark(self) -> str:
        """A key only this style has."""
        return self.block_prefix(0) + "0.conv1.weight"

    @property
    def down_prefix(self) -> str:
        return self.down.split("{i}")[0]

    def block_prefix(self, level: int) -> str:
        return self.down.split("{j}")[0].format(i=level)


LDM_NAMES = KeyNames("encoder.down.{i}.block.{j}.", "encoder.mid.attn_1.q.weight")
DIFFUSERS_NAMES = KeyNames("encoder.down_blocks.{i}.resnets.{j}.", "encoder.mid_block.attentions.0.to_q.weight")
# Named alike in both styles: conv_out gives 2 x latent channels (mean and log-variance).
CONV_IN, CONV_OUT, DECODER_OUT = "encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight"


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
    """A diffusers AutoencoderKL applied to each frame of `(B, 3, T, H, W)` pixels in [-1, 1].

    `config` is for single files: a `VAEFamily` (or its name) or a diffusers config.json / its folder.
    """

    def __init__(self, path: str | Path, *, config: VAEConfigSource = None, chunk_frames: int = 8,
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
        self.latent_range: Optional[float] = None  # a learned latent space has no known bound
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


def load_autoencoder_kl(path: str | Path, *, config: VAEConfigSource = None):
    """An AutoencoderKL from a local folder or single file (see the module docstring); never downloads."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE {str(path)!r} does not exist: give a diffusers folder with {CONFIG_FILE} "
                                f"or a .safetensors file")
    diffusers = import_diffusers()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_FILE}: not a diffusers AutoencoderKL folder")
        require_safetensors(path, SAFETENSORS_WEIGHTS)
        return diffusers.AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True)
    if path.suffix not in (".safetensors", ".sft"):
        raise ValueError(f"{path.name}: only .safetensors VAE files are loaded (pickle can run code)")
    shapes = _tensor_shapes(path)
    names = next((n for n in (LDM_NAMES, DIFFUSERS_NAMES) if n.mark in shapes), None)
    if names is None:
        raise ValueError(f"{path.name} is not an AutoencoderKL VAE file: it has neither {LDM_NAMES.mark!r} "
                         f"(original names) nor {DIFFUSERS_NAMES.mark!r} (diffusers names)")
    vae_config = _vae_config(path, config, shapes, names)
    if names is DIFFUSERS_NAMES:
        from safetensors.torch import load_file

        vae = diffusers.AutoencoderKL.from_config(vae_config)
        vae.load_state_dict(load_file(str(path)))
        return vae
    with tempfile.TemporaryDirectory() as folder:  # from_single_file reads its config from a folder
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(vae_config))
        return diffusers.AutoencoderKL.from_single_file(str(path), config=folder, local_files_only=True)


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _vae_config(path: Path, config: VAEConfigSource, shapes: Mapping[str, tuple[int, ...]],
                names: KeyNames) -> dict:
    """The diffusers config of a single file: from a family (architecture read from the tensor shapes),
    or from a config.json (given, beside the file as `<stem>.json`, or `config.json` in its folder)."""
    family = _family(config)
    if family is not None:
        return config_for_family(family, shapes, names, path.name)
    candidates = [Path(config)] if config else [path.with_suffix(".json"), path.parent / CONFIG_FILE]
    for candidate in candidates:
        file = candidate / CONFIG_FILE if candidate.is_dir() else candidate
        if file.is_file():
            return json.loads(file.read_text())
    raise FileNotFoundError(f"no AutoencoderKL config for {path.name}: a single file needs its family "
                            f"(config = one of {[f.value for f in VAEFamily]}: SD 1.x/2.x, SDXL, SD3, Flux) or "
                            f"its diffusers {CONFIG_FILE} (beside it, as {path.stem}.json, or passed as config=); "
                            f"offline it cannot be fetched. Looked at: {[str(c) for c in candidates]}")


def _family(config: VAEConfigSource) -> Optional[VAEFamily]:
    if isinstance(config, VAEFamily):
        return config
    if isinstance(config, str) and config.lower() in {f.value for f in VAEFamily}:
        return VAEFamily(config.lower())
    return None


def config_for_family(family: VAEFamily, shapes: Mapping[str, tuple[int, ...]], names: KeyNames,
                      name: str = "VAE") -> dict:
    """A diffusers AutoencoderKL config: the architecture read from the tensor shapes (either key style),
    the latent scale and shift of the family. GroupNorm groups: 32, as in every SD-family VAE."""
    latents, scale, shift, size = FAMILIES[family]
    if shapes[CONV_OUT][0] != 2 * latents:
        raise ValueError(f"{name}: {family.value} VAEs have {latents} latent channels, this file has "
                         f"{shapes[CONV_OUT][0] // 2}: choose another family or give its {CONFIG_FILE}")
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith(names.down_prefix)})
    first = names.block_prefix(0)
    layers = {k[len(first):].split(".")[0] for k in shapes if k.startswith(first)}
    return {"_class_name": "AutoencoderKL", "in_channels": shapes[CONV_IN][1], "out_channels": shapes[DECODER_OUT][0],
            "latent_channels": latents,
            "block_out_channels": [shapes[names.block_prefix(i) + "0.conv1.weight"][0] for i in levels],
            "down_block_types": ["DownEncoderBlock2D"] * len(levels),
            "up_block_types": ["UpDecoderBlock2D"] * len(levels), "layers_per_block": len(layers),
            "act_fn": "silu", "norm_num_groups": 32, "sample_size": size, "scaling_factor": scale,
            "shift_factor": shift, "use_quant_conv": "quant_conv.weight" in shapes,
            "use_post_quant_conv": "post_quant_conv.weight" in shapes,
            "mid_block_add_attention": names.mid_attention in shapes}
