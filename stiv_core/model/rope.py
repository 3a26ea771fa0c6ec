"""Rotary position embeddings from per-axis positions (2D over space, 1D over time).

Positions are real numbers per token and axis, so interpolated positions (a model moved to a larger
grid, positions scaled by `STIVConfig.rope_position_scale`) need no special code. The head dimension
is split between the axes; within each axis, channel pairs `(2i, 2i+1)` rotate at frequency
`theta ** (-2i / axis_dim)`. Tables are real float32 (no complex float64, no loops); the rotation
itself is a complex64 multiply.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class Rope(NamedTuple):
    """cos and sin tables shaped `(..., N, head_dim // 2)`, broadcastable against q and k."""

    cos: torch.Tensor
    sin: torch.Tensor

    def index_tokens(self, index: torch.Tensor) -> Rope:
        """Tables for the kept tokens only: `index` is `(B, N_keep)` into the token axis."""
        gather = lambda table: table[index]  # (N, D/2) -> (B, N_keep, D/2)
        return Rope(gather(self.cos), gather(self.sin))


def rope_tables(positions: torch.Tensor, axes_dims: Sequence[int], theta: float) -> Rope:
    """Tables for `positions` `(N, n_axes)`; `axes_dims` gives each axis its share of head_dim."""
    if positions.shape[-1] != len(axes_dims):
        raise ValueError(f"positions have {positions.shape[-1]} axes, axes_dims {len(axes_dims)}")
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
        angles.append(positions[..., axis : axis + 1].float() * freqs)
    angle = torch.cat(angles, dim=-1)
    return Rope(angle.cos(), angle.sin())


def grid_positions(*sizes: int, scale: Sequence[float], device=None) -> torch.Tensor:
    """Positions `(prod(sizes), len(sizes))` of a row-major grid, each axis multiplied by `scale`."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) * s for n, s in zip(sizes, scale)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate `x` `(..., N, head_dim)` by `rope`; computed in float32, returned in x's dtype.

    Each channel pair is one complex64 number times `cos + i sin`: one vectorised pass (5x faster on
    the CPU than rotating strided halves and stacking them). MPS lacks complex kernels: real path there.
    """
    if x.device.type == "mps":
        return _apply_rope_real(x, rope)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.complex(rope.cos, rope.sin)).flatten(-2).to(x.dtype)


def _apply_rope_real(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = rope.cos, rope.sin
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
