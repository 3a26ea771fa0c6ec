"""The small typed interfaces between the pipeline and its text encoder and VAE.

Any text encoder (the built-in word-level one, T5, CLIP) and any per-frame VAE (the built-in pixel
identity, SD/SDXL AutoencoderKL) plugs in by following these protocols.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEmbedding:
    """tokens `(B, L, D)`, mask `(B, L)` bool (True = real token), pooled `(B, Dp)`."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        b, length = self.tokens.shape[:2]
        if self.tokens.dim() != 3 or self.mask.shape != (b, length) or self.pooled.dim() != 2 \
                or self.pooled.shape[0] != b:
            raise ValueError(f"TextEmbedding needs tokens (B, L, D), mask (B, L), pooled (B, Dp); got "
                             f"{tuple(self.tokens.shape)}, {tuple(self.mask.shape)}, {tuple(self.pooled.shape)}")

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> TextEmbedding:
        """The embedding of some batch rows (an int keeps its batch dimension, as `x[i : i + 1]`)."""
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        return TextEmbedding(self.tokens[rows], self.mask[rows], self.pooled[rows])

    def fit(self, max_tokens: int) -> TextEmbedding:
        """Exactly `max_tokens` tokens: longer texts are truncated (with a warning), shorter padded."""
        length = self.tokens.shape[1]
        if length > max_tokens:
            dropped = int(self.mask[:, max_tokens:].sum())
            if dropped:
                log.warning("text has %d tokens beyond the model's maximum of %d; they are dropped",
                            dropped, max_tokens)
            return TextEmbedding(self.tokens[:, :max_tokens], self.mask[:, :max_tokens], self.pooled)
        pad = max_tokens - length
        return TextEmbedding(F.pad(self.tokens, (0, 0, 0, pad)), F.pad(self.mask.bool(), (0, pad)), self.pooled)

    def repeat(self, n: int) -> TextEmbedding:
        """Each row repeated `n` times (a prompt for each of n samples)."""
        rep = lambda x: x.repeat_interleave(n, dim=0)
        return TextEmbedding(rep(self.tokens), rep(self.mask), rep(self.pooled))

    def to(self, device=None, dtype=None) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device),
                             self.pooled.to(device=device, dtype=dtype))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `tokens` `(B, L, D)` over the real ones (`mask` `(B, L)` True) -> `(B, D)`; 0 for none."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@runtime_checkable
class TextEncoder(Protocol):
    dim: int         # token width
    pooled_dim: int  # pooled width

    def encode(self, prompts: list[str]) -> TextEmbedding:
        ...


@runtime_checkable
class VideoVAE(Protocol):
    """Per-frame autoencoder. Pixels are `(B, 3, T, H, W)` in [-1, 1].

    Latents are `(raw - shift_factor) * scaling_factor` of what the autoencoder's encoder gives (pixel space:
    1 and 0). `latent_range`: clean latents lie in [-latent_range, latent_range] (pixel space: 1.0), and the
    sampler may clamp its clean estimates to it (see `flow.clamp_data`); None for learned VAEs, which have
    no such bound.
    """

    latent_channels: int
    spatial_factor: int  # pixels per latent along H and W
    scaling_factor: float
    shift_factor: float
    latent_range: Optional[float]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, 3, T, H, W)` -> latents `(B, C, T, H / f, W / f)`."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents `(B, C, T, h, w)` -> pixels `(B, 3, T, h * f, w * f)` in [-1, 1]."""
        ...
