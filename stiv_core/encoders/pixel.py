"""The built-in model's "VAE": pixel space itself, an exact identity (3 channels, factor 1).

At 32-64 px a learned autoencoder buys nothing (a prototype found pixel space the better choice), and
an identity makes given frames exact by construction.
"""
from __future__ import annotations

import torch


class PixelVAE:
    latent_channels = 3
    spatial_factor = 1
    scaling_factor, shift_factor = 1.0, 0.0
    latent_range = 1.0   # the sampler may clamp its clean estimates to this (SamplerConfig.clip_denoised)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, 3, T, H, W)` in [-1, 1] -> the same tensor (a float copy)."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"PixelVAE encodes (B, 3, T, H, W) pixels, got {tuple(pixels.shape)}")
        return pixels.float().clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clone()
