"""STIV Decode: LATENT -> ComfyUI IMAGE `[T, H, W, C]` in 0..1, decoded a chunk of frames at a time."""
from __future__ import annotations

import torch

from .types import STIVInputError, STIVModel, video_to_image


class STIVDecode:
    CATEGORY = "STIV/latent"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"
    DESCRIPTION = "Decodes STIV latents with the model's VAE into frames for CreateVideo / SaveVideo."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("STIV_MODEL",),
            "latent": ("LATENT",),
            "chunk_frames": ("INT", {"default": 16, "min": 1, "max": 1024,
                                     "tooltip": "frames decoded at once: lower it if decoding runs out of memory"}),
        }}

    def decode(self, model: STIVModel, latent: dict, chunk_frames: int):
        samples = latent.get("samples") if isinstance(latent, dict) else None
        channels = model.pipeline.vae.latent_channels
        if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[1] != channels:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise STIVInputError(f"STIV Decode: expected STIV video latents (B, {channels}, T, h, w) from a STIV "
                                 f"sampler, got {shape}; image latents from other models cannot be decoded here")
        pixels = model.pipeline.decode(samples.to(model.pipeline.device), chunk_frames=chunk_frames)
        return (video_to_image(pixels),)
