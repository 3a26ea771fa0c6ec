"""Tiny random stand-ins for the pipeline's text encoder and VAE (they follow stiv_core.interfaces)."""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from stiv_core.config import preset
from stiv_core.interfaces import TextEmbedding
from stiv_core.model.transformer import STIVTransformer
from stiv_core.pipeline import STIVPipeline


class HashTextEncoder:
    """One fixed random vector per word (hashed); pooled = mean of the word vectors."""

    def __init__(self, dim: int = 32, seed: int = 0):
        self.dim = self.pooled_dim = dim
        self.seed = seed

    def _word(self, word: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(word.encode()))
        return torch.randn(self.dim, generator=g)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        words = [p.split() or [""] for p in prompts]
        length = max(len(w) for w in words)
        tokens = torch.zeros(len(prompts), length, self.dim)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                tokens[i, j], mask[i, j] = self._word(w), True
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return TextEmbedding(tokens, mask, pooled)


class LinearVAE:
    """Exactly invertible per-frame VAE: 2x2 pixel unshuffle, then a fixed orthogonal 12x12 mix."""

    latent_channels = 12
    spatial_factor = 2

    def __init__(self, seed: int = 0):
        q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(seed)))
        self.mix = q

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, t = pixels.shape[:3]
        x = F.pixel_unshuffle(pixels.transpose(1, 2).flatten(0, 1), 2)      # (B*T, 12, h, w)
        x = torch.einsum("oc,nchw->nohw", self.mix.to(x), x)
        return x.unflatten(0, (b, t)).transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, t = latents.shape[:3]
        x = latents.transpose(1, 2).flatten(0, 1)
        x = torch.einsum("co,nchw->nohw", self.mix.to(x), x)
        return F.pixel_shuffle(x, 2).unflatten(0, (b, t)).transpose(1, 2)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Non-zero weights everywhere (the real init zeroes gates and outputs, hiding most behaviour)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_pipeline(*, temporal_patch: int = 2, prediction: str = "velocity", seed: int = 0) -> STIVPipeline:
    text, vae = HashTextEncoder(32), LinearVAE()
    config = preset("tiny", depth=2, hidden_size=64, num_heads=4, latent_channels=vae.latent_channels,
                    patch_size=2, temporal_patch=temporal_patch, text_dim=text.dim,
                    pooled_text_dim=text.pooled_dim, max_text_tokens=8, prediction=prediction)
    return STIVPipeline(randomize(STIVTransformer(config), seed).eval(), text, vae)
