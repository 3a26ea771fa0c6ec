"""Attention backends behind one registry and one call site (`attention`).

Every attention in the model calls `attention(q, k, v, mask, backend=...)` with q, k, v shaped
`(B, heads, N, head_dim)` and an optional boolean `mask` broadcastable to `(B, heads, Nq, Nk)`
(True = attend). Backends are chosen by `AttentionBackend`; one that cannot serve a call (not
installed, wrong device, no mask support) falls back to SDPA with the reason logged once.
"""
from __future__ import annotations

import enum
import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class AttentionBackend(str, enum.Enum):
    SDPA = "sdpa"   # torch's scaled_dot_product_attention (flash / memory-efficient kernels)
    MATH = "math"   # the plain reference: softmax(q k^T / sqrt(d)) v in float32
    SAGE = "sage"   # sageattention (CUDA + Triton only; optional dependency)


@dataclass(frozen=True)
class _Entry:
    fn: AttentionFn
    supports_mask: bool
    unavailable: Callable[[torch.Tensor], Optional[str]]  # reason it can't serve q, or None


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference attention, computed in float32 (or float64 when given float64)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = q.to(compute) @ k.to(compute).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if mask is not None:  # a query with no key to attend gets zeros, as torch's SDPA gives, not NaN
        weights = torch.where(mask.any(dim=-1, keepdim=True), weights, 0.0)
    return (weights @ v.to(compute)).to(q.dtype)


def _sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sage(q, k, v, mask=None):
    from sageattention import sageattn  # imported only when chosen and usable

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def _sage_unavailable(q: torch.Tensor) -> Optional[str]:
    if importlib.util.find_spec("sageattention") is None:
        return "sageattention is not installed (pip install sageattention; needs CUDA and Triton)"
    if q.device.type != "cuda":
        return f"sageattention runs on CUDA only, tensors are on {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"sageattention needs float16/bfloat16, got {q.dtype}"
    return None


_REGISTRY: dict[AttentionBackend, _Entry] = {
    AttentionBackend.SDPA: _Entry(_sdpa, supports_mask=True, unavailable=lambda q: None),
    AttentionBackend.MATH: _Entry(math_attention, supports_mask=True, unavailable=lambda q: None),
    AttentionBackend.SAGE: _Entry(_sage, supports_mask=False, unavailable=_sage_unavailable),
}
_logged: set[tuple[AttentionBackend, str]] = set()


def available_backends(device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> list[AttentionBackend]:
    """The backends that can serve attention on tensors of this device and dtype."""
    probe = torch.empty(0, device=device, dtype=dtype)
    return [backend for backend, entry in _REGISTRY.items() if entry.unavailable(probe) is None]


def resolve_backend(backend: AttentionBackend, q: torch.Tensor, has_mask: bool) -> AttentionBackend:
    """The backend that will actually serve this call; logs why once when it is not `backend`."""
    entry = _REGISTRY[backend]
    reason = entry.unavailable(q)
    if reason is None and has_mask and not entry.supports_mask:
        reason = f"{backend.value} does not take an attention mask (text-token mask)"
    if reason is None:
        return backend
    if (backend, reason) not in _logged:
        _logged.add((backend, reason))
        log.warning("attention backend %s unavailable: %s; using sdpa", backend.value, reason)
    return AttentionBackend.SDPA


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              *, backend: AttentionBackend = AttentionBackend.SDPA) -> torch.Tensor:
    """Attention over `(B, heads, N, head_dim)` tensors through the chosen backend."""
    chosen = resolve_backend(backend, q, mask is not None)
    return _REGISTRY[chosen].fn(q, k, v, mask)
