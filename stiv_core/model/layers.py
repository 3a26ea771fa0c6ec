"""Small building blocks of the STIV transformer: norms, embedders, attention and FFN modules."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import AttentionBackend, attention
from .rope import Rope, apply_rope


def stateless_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim with no learned affine (the paper's sandwich / condition norm)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """`norm(x)` with `norm`'s weight; on the CPU via one vector_norm (nn.RMSNorm there is pow/mean/
    rsqrt with copies, ~4x slower on the strided q/k views); CUDA keeps torch's fused kernel."""
    if x.device.type == "cuda":
        return norm(x)
    scale = (torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True).square() / x.shape[-1] + norm.eps).rsqrt()
    return (x.float() * scale).to(x.dtype) * norm.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; `1 + scale` so that a zero-initialised condition leaves x unchanged."""
    return x * (1 + scale) + shift


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """`(B,)` real values -> `(B, dim)` [cos | sin] features, as in DiT's timestep embedder."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """One singleton condition (timestep or a micro-condition): sinusoid -> MLP -> stateless LN."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256, eps: float = 1e-6):
        super().__init__()
        self.frequency_dim, self.eps = frequency_dim, eps
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, values: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, D)
        features = sinusoidal_embedding(values, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return stateless_norm(self.mlp(features), self.eps)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK RMSNorm and rotary positions.

    `forward` attends over N in `(B, N, D)`; `forward_over_time` attends over T in `(B, T, S, D)` for
    every spatial position, without first making a time-major copy of the tokens.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=eps)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = self._attend(q, k, v, rope, backend)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def forward_over_time(self, x: torch.Tensor, rope: Rope, backend: AttentionBackend) -> torch.Tensor:
        b = x.shape[0]
        qkv = rearrange(self.qkv(x), "b t s (three h d) -> three (b s) h t d", three=3, h=self.num_heads)
        out = self._attend(*qkv, rope, backend)
        return self.proj(rearrange(out, "(b s) h t d -> b t s (h d)", b=b))

    def _attend(self, q, k, v, rope: Rope, backend: AttentionBackend) -> torch.Tensor:
        q, k = apply_rope(rms_norm(q, self.q_norm), rope), apply_rope(rms_norm(k, self.k_norm), rope)
        return attention(q, k, v, backend=backend)


class CrossAttention(nn.Module):
    """Attention from video tokens `(B, N, D)` to text tokens `(B, L, D)` with a text mask `(B, L)`."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=eps)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                backend: AttentionBackend) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        mask = text_mask[:, None, None, :]  # (B, 1, 1, L): every query sees the same tokens
        out = attention(rms_norm(q, self.q_norm), rms_norm(k, self.k_norm), v, mask, backend=backend)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))
