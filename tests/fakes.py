"""Tiny random stand-ins for the pipeline's text encoder and VAE (they follow stiv_core.interfaces)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stiv_core.config import preset
from stiv_core.encoders.hashed import HashedTextEncoder
from stiv_core.model.transformer import STIVTransformer
from stiv_core.pipeline import STIVPipeline


class LinearVAE:
    """Exactly invertible per-frame VAE: 2x2 pixel unshuffle, then a fixed orthogonal 12x12 mix."""

    latent_channels = 12
    spatial_factor = 2
    scaling_factor, shift_factor = 1.0, 0.0
    latent_range = None

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
    text, vae = HashedTextEncoder(32, max_tokens=None), LinearVAE()
    config = preset("tiny", depth=2, hidden_size=64, num_heads=4, latent_channels=vae.latent_channels,
                    patch_size=2, temporal_patch=temporal_patch, text_dim=text.dim,
                    pooled_text_dim=text.pooled_dim, max_text_tokens=8, prediction=prediction)
    return STIVPipeline(randomize(STIVTransformer(config), seed).eval(), text, vae)


class ScaledLinearVAE(LinearVAE):
    """LinearVAE with a diffusers-style latent scaling, as DiffusersVAE applies it: `(raw - shift) * scale`."""

    def __init__(self, seed: int = 0, scaling_factor: float = 0.5, shift_factor: float = 0.25):
        super().__init__(seed)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return (super().encode(pixels) - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return super().decode(latents / self.scaling_factor + self.shift_factor)


# -- ComfyUI's CLIP and VAE objects (comfy/sd.py, Comfy-Org/ComfyUI a125cd8), as the STIV nodes call them --
class ComfyCLIPStandIn:
    """`CLIP.tokenize(text)` and `CLIP.encode_from_tokens(tokens, return_pooled, return_dict)`: each word is
    HashedTextEncoder's vector. T5-like by default (no pooled output, no padding); `pooled=True` gives a
    CLIP-like pooled output: the last word, twice that when the encoder projects it by default
    (`projected=True`, as ComfyUI's CLIP-G) unless asked for "unprojected"; `pad_to` pads with zero
    "<pad>" tokens, which `attention_mask=True` reports as in ComfyUI's masked encoders."""

    def __init__(self, dim: int = 32, *, seed: int = 0, pooled: bool = False, pooled_dim: int | None = None,
                 projected: bool = False, pad_to: int = 0, attention_mask: bool = False):
        self.words = HashedTextEncoder(dim, max_tokens=None, seed=seed)
        self.pooled, self.pooled_dim, self.projected = pooled, pooled_dim or dim, projected
        self.pad_to, self.attention_mask = pad_to, attention_mask
        self.calls: list = []

    def tokenize(self, text, return_word_ids=False, **kwargs):
        words = [(w, 1.0) for w in text.split()]
        return {"t5xxl": [words + [("<pad>", 1.0)] * max(0, self.pad_to - len(words))]}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.calls.append(return_pooled)
        words = [w for w, _ in tokens["t5xxl"][0]]
        real = torch.tensor([w != "<pad>" for w in words])
        cond = torch.stack([self.words.word_vector(w) if w != "<pad>" else torch.zeros(self.words.dim) for w in words])[None]
        pooled = None
        if self.pooled:
            pooled = cond[:, int(real.nonzero().max()), : self.pooled_dim]
            pooled = pooled * 2 if self.projected and return_pooled != "unprojected" else pooled
        if not return_dict:
            return (cond, pooled) if return_pooled else cond
        out = {"cond": cond, "pooled_output": pooled}
        if self.attention_mask:
            out["attention_mask"] = real.long()[None]
        return out


class ComfyVAEStandIn:
    """`VAE.encode(images)`: IMAGE `(N, H, W, C)` in 0..1 -> RAW latents `(N, 12, H/2, W/2)` (LinearVAE per
    frame, after ComfyUI's `image * 2 - 1`); `VAE.decode(latents)` -> `(N, H, W, C)` in 0..1. Records the
    frames per call."""

    latent_channels, latent_dim, downscale_ratio, upscale_ratio = 12, 2, 2, 2

    def __init__(self, seed: int = 0, latent_dim: int = 2):
        self.linear, self.latent_dim = LinearVAE(seed), latent_dim
        self.calls: list[tuple[str, int]] = []

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def encode(self, pixel_samples):
        self.calls.append(("encode", pixel_samples.shape[0]))
        return self.linear.encode(pixel_samples.movedim(-1, 1)[:, :, None] * 2 - 1)[:, :, 0]

    def decode(self, samples_in, vae_options={}):
        self.calls.append(("decode", samples_in.shape[0]))
        return ((self.linear.decode(samples_in[:, :, None])[:, :, 0] + 1) / 2).clamp(0, 1).movedim(1, -1)


class ComfyPixelSpaceVAEStandIn(ComfyVAEStandIn):
    """VAELoader's "pixel_space": 3 channels, factor 1, latents = image * 2 - 1 (ComfyUI's process_input)."""

    latent_channels, downscale_ratio, upscale_ratio = 3, 1, 1

    def encode(self, pixel_samples):
        self.calls.append(("encode", pixel_samples.shape[0]))
        return pixel_samples.movedim(-1, 1) * 2 - 1

    def decode(self, samples_in, vae_options={}):
        self.calls.append(("decode", samples_in.shape[0]))
        return ((samples_in + 1) / 2).clamp(0, 1).movedim(1, -1)


# A 1-block trainer config on 4-frame 16x16 clips (key=value overrides of the trainer's defaults).
TINY_TRAINING = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.text_dim=16",
                 "model.pooled_text_dim=16", "model.max_text_tokens=8", "data.buckets=[[4, 16, 16]]", "batch_size=4"]
