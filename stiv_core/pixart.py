"""PixArt-alpha / PixArt-Sigma state dicts mapped onto STIV's parameter names.

Two key styles are read: PixArt's original names (`x_embedder.proj`, `t_block`, `blocks.N.attn.qkv`,
...) and diffusers' `PixArtTransformer2DModel` names (`pos_embed.proj`, `adaln_single.linear`,
`transformer_blocks.N.attn1.to_q`, ...). Diffusers names are first renamed to the original ones (q, k,
v fused), so the mapping onto STIV is written once (`stiv_state_from_pixart`).
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import torch

from .flow import TIMESTEP_SCALE
from .model.transformer import inflate_patch_embed


class ConversionError(ValueError):
    """A source that is not a PixArt checkpoint, or one that does not fit the target config."""


class KeyStyle(str, enum.Enum):
    ORIGINAL = "original"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class PixArtShape:
    """What a PixArt state dict's tensor shapes say about its architecture."""

    hidden_size: int
    depth: int
    latent_channels: int
    patch_size: int
    mlp_hidden: int
    text_dim: int
    out_channels: int            # 2 * latent_channels when the model learns sigma
    null_text_tokens: int | None  # rows of y_embedding (120 alpha, 300 Sigma); None in diffusers files

    @property
    def learned_sigma(self) -> bool:
        return self.out_channels == 2 * self.latent_channels


_ORIGINAL_MARK, _DIFFUSERS_MARK = "x_embedder.proj.weight", "pos_embed.proj.weight"
_DIFFUSERS_RENAMES = {
    "pos_embed.proj.": "x_embedder.proj.",
    "adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "adaln_single.emb.resolution_embedder.linear_1.": "csize_embedder.mlp.0.",
    "adaln_single.emb.resolution_embedder.linear_2.": "csize_embedder.mlp.2.",
    "adaln_single.emb.aspect_ratio_embedder.linear_1.": "ar_embedder.mlp.0.",
    "adaln_single.emb.aspect_ratio_embedder.linear_2.": "ar_embedder.mlp.2.",
    "adaln_single.linear.": "t_block.1.",
    "caption_projection.linear_1.": "y_embedder.y_proj.fc1.",
    "caption_projection.linear_2.": "y_embedder.y_proj.fc2.",
    "caption_projection.y_embedding": "y_embedder.y_embedding",
    "scale_shift_table": "final_layer.scale_shift_table",
    "proj_out.": "final_layer.linear.",
}
_DIFFUSERS_BLOCK_RENAMES = {
    "attn1.to_out.0.": "attn.proj.", "attn2.to_q.": "cross_attn.q_linear.",
    "attn2.to_out.0.": "cross_attn.proj.", "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2.",
    "scale_shift_table": "scale_shift_table",
}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_FUSED = re.compile(r"^(attn1\.to_[qkv]|attn2\.to_[kv])\.(weight|bias)$")


def key_style(state: dict[str, torch.Tensor], name: str = "source") -> KeyStyle:
    if _ORIGINAL_MARK in state:
        return KeyStyle.ORIGINAL
    if _DIFFUSERS_MARK in state:
        return KeyStyle.DIFFUSERS
    sample = sorted(state)[:5]
    raise ConversionError(f"{name} is not a PixArt-alpha/Sigma checkpoint: it has neither {_ORIGINAL_MARK!r} "
                          f"(original names) nor {_DIFFUSERS_MARK!r} (diffusers names); first keys: {sample}")


def to_original_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Diffusers names renamed to PixArt's original ones (q, k, v fused); also the keys left unknown."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match:
            index, rest = match.groups()
            renamed = _rename_block_key(rest)
            if renamed is None:
                if not _FUSED.match(rest):  # q, k, v are fused below
                    unknown.append(key)
                continue
            out[f"blocks.{index}.{renamed}"] = value
            continue
        prefix = next((p for p in _DIFFUSERS_RENAMES if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            out[_DIFFUSERS_RENAMES[prefix] + key[len(prefix):]] = value
    for index in {int(m.group(1)) for m in map(_BLOCK.match, state) if m}:
        for suffix in ("weight", "bias"):
            block = f"transformer_blocks.{index}"
            q, k, v = (state.get(f"{block}.attn1.to_{n}.{suffix}") for n in "qkv")
            if q is not None and k is not None and v is not None:
                out[f"blocks.{index}.attn.qkv.{suffix}"] = torch.cat([q, k, v])
            k, v = (state.get(f"{block}.attn2.to_{n}.{suffix}") for n in "kv")
            if k is not None and v is not None:
                out[f"blocks.{index}.cross_attn.kv_linear.{suffix}"] = torch.cat([k, v])
    return out, unknown


def _rename_block_key(rest: str) -> str | None:
    prefix = next((p for p in _DIFFUSERS_BLOCK_RENAMES if rest.startswith(p)), None)
    return None if prefix is None else _DIFFUSERS_BLOCK_RENAMES[prefix] + rest[len(prefix):]


def pixart_shape(state: dict[str, torch.Tensor], name: str = "source") -> PixArtShape:
    """The architecture read from an original-names state dict; a ConversionError if a part is missing."""
    required = ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_block.1.weight",
                "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight", "final_layer.scale_shift_table",
                "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise ConversionError(f"{name} lacks PixArt tensors {missing}: a partial or non-PixArt checkpoint")
    d, c, p, p2 = state["x_embedder.proj.weight"].shape
    if p != p2:
        raise ConversionError(f"{name}: non-square patch embedding {p}x{p2}")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    y_embedding = state.get("y_embedder.y_embedding")
    return PixArtShape(hidden_size=d, depth=depth, latent_channels=c, patch_size=p,
                       mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0],
                       text_dim=state["y_embedder.y_proj.fc1.weight"].shape[1],
                       out_channels=state["final_layer.linear.weight"].shape[0] // (p * p),
                       null_text_tokens=None if y_embedding is None else y_embedding.shape[0])


def time_reversal(frequency_dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """`M` with `emb(T - u) = M @ emb(u)` for the [cos | sin] sinusoid of `layers.sinusoidal_embedding`.

    STIV embeds `u = TIMESTEP_SCALE t` (t = 0 noise; see flow.py); PixArt embeds its DDPM timestep
    `s = T - u` (s = 0 data, T = 1000 timesteps, which is TIMESTEP_SCALE).
    Composing PixArt's first timestep layer with M gives it the same input it had, from STIV's time.
    """
    half = frequency_dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    cos, sin = torch.cos(TIMESTEP_SCALE * freqs), torch.sin(TIMESTEP_SCALE * freqs)
    # cos(f(T-u)) = cos(fT) cos(fu) + sin(fT) sin(fu);  sin(f(T-u)) = sin(fT) cos(fu) - cos(fT) sin(fu)
    top = torch.cat([torch.diag(cos), torch.diag(sin)], dim=1)
    bottom = torch.cat([torch.diag(sin), -torch.diag(cos)], dim=1)
    return torch.cat([top, bottom], dim=0)


_BLOCK_MAP = {
    "attn.qkv": "spatial_attn.qkv", "attn.proj": "spatial_attn.proj",
    "cross_attn.q_linear": "cross_attn.q", "cross_attn.kv_linear": "cross_attn.kv",
    "cross_attn.proj": "cross_attn.proj", "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2",
}
_TOP_MAP = {"t_embedder.mlp.2": "t_embedder.mlp.2", "t_block.1": "adaln_single.1",
            "y_embedder.y_proj.fc1": "caption_proj.fc1", "y_embedder.y_proj.fc2": "caption_proj.fc2",
            "x_embedder.proj": "patch_embed"}


def carried_tensors(state: dict[str, torch.Tensor], shape: PixArtShape,
                    temporal_patch: int) -> dict[str, torch.Tensor]:
    """STIV tensors that come from the PixArt state (original names), float32, already reshaped."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in _TOP_MAP.items():
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = state[f"{src}.{suffix}"]
    out["patch_embed.weight"] = inflate_patch_embed(state["x_embedder.proj.weight"].float(), temporal_patch)
    w0 = state["t_embedder.mlp.0.weight"].double()
    out["t_embedder.mlp.0.weight"] = w0 @ time_reversal(w0.shape[1])
    out["t_embedder.mlp.0.bias"] = state["t_embedder.mlp.0.bias"]
    for i in range(shape.depth):
        for src, dst in _BLOCK_MAP.items():
            for suffix in ("weight", "bias"):
                out[f"blocks.{i}.{dst}.{suffix}"] = state[f"blocks.{i}.{src}.{suffix}"]
        out[f"blocks.{i}.scale_shift_table"] = state[f"blocks.{i}.scale_shift_table"].reshape(6, -1)
    out["final_table"] = state["final_layer.scale_shift_table"].reshape(2, -1)
    out["final_linear.weight"], out["final_linear.bias"] = _final_rows(state, shape, temporal_patch)
    if shape.null_text_tokens is not None:
        out["null_text"] = state["y_embedder.y_embedding"]
    return {k: v.float() for k, v in out.items()}


def _final_rows(state: dict[str, torch.Tensor], shape: PixArtShape,
                temporal_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PixArt's output rows are laid out (p, p, out_channels); keep the first C (epsilon, not sigma)
    and repeat them for each of the `temporal_patch` frames of a token (STIV's (pt, p, p, C))."""
    p, c, o = shape.patch_size, shape.latent_channels, shape.out_channels
    weight = state["final_layer.linear.weight"].reshape(p, p, o, -1)[:, :, :c].reshape(p * p * c, -1)
    bias = state["final_layer.linear.bias"].reshape(p, p, o)[:, :, :c].reshape(p * p * c)
    return weight.repeat(temporal_patch, 1), bias.repeat(temporal_patch)
