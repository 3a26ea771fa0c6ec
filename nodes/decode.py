"""STIV Decode: LATENT -> ComfyUI IMAGE `[T, H, W, C]` in 0..1, decoded a chunk of frames at a time."""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import _comfy
from .comfy_adapters import RecordedVAE, with_comfy_vae
from .types import STIVInputError, STIVModel, require_inputs, video_to_image


class STIVDecode:
    CATEGORY = "STIV/latent"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"
    DESCRIPTION = ("Decodes STIV latents into frames for CreateVideo / SaveVideo, with the model's VAE or a "
                   "ComfyUI VAE connected to vae (the one the model was trained with).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("STIV_MODEL",),
            "latent": ("LATENT",),
            "chunk_frames": ("INT", {"default": 16, "min": 1, "max": 1024,
                                     "tooltip": "frames decoded at once: lower it if decoding runs out of memory"}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "optional: a ComfyUI VAE that decodes instead of the model's own (same "
                                       "latent channels; the model's latent scale is undone first)"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, chunk_frames: Optional[int] = None) -> bool | str:
        """ComfyUI's check before the prompt runs: an API prompt can pass what the widget's minimum stops;
        the message names the input. (A linked chunk_frames is not known yet: None, checked in `decode`.)"""
        return True if chunk_frames is None else check_chunk_frames(chunk_frames) or True

    def decode(self, model: STIVModel, latent: dict, chunk_frames: int, vae: Any = None):
        require_inputs("STIV Decode", model=model)
        problem = check_chunk_frames(chunk_frames)
        if problem:
            raise STIVInputError(f"STIV Decode: {problem}")
        if vae is None and isinstance(model.pipeline.vae, RecordedVAE):
            raise STIVInputError(f"STIV Decode: {model.pipeline.vae.message}")
        try:
            pipeline = with_comfy_vae(model.pipeline, vae, chunk_frames=chunk_frames)
        except ValueError as err:
            raise STIVInputError(f"STIV Decode: {err}") from None
        samples = latent.get("samples") if isinstance(latent, dict) else None
        channels = pipeline.vae.latent_channels
        if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[1] != channels:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise STIVInputError(f"STIV Decode: expected STIV video latents (B, {channels}, T, h, w) from a STIV "
                                 f"sampler, got {shape}; image latents from other models cannot be decoded here")
        chunks = -(-samples.shape[2] // chunk_frames)
        bar = _comfy.progress_bar(chunks)

        def on_chunk(done: int, total: int) -> None:
            bar.update_absolute(done, total)
            if done < total and _comfy.interrupt_requested():
                _comfy.raise_interrupted()

        pixels = pipeline.decode(samples.to(pipeline.device), chunk_frames=chunk_frames, on_chunk=on_chunk)
        return (video_to_image(pixels),)


def check_chunk_frames(chunk_frames: object) -> str:
    """Why `chunk_frames` is not a frame count to decode at a time, or "" when it is."""
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
        return (f"chunk_frames must be a whole number of frames >= 1 (frames decoded at once; lower it if "
                f"decoding runs out of memory), got {chunk_frames!r}")
    return ""
