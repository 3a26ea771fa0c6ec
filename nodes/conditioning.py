"""STIV Text Encode and STIV Image Condition (the "Text/Image Conditioner") -> STIV_COND.

The prompt is encoded by the model's own text encoder when the sampler runs (it ships in the bundle), or
here by a ComfyUI CLIP connected to `clip`; the image node turns IMAGE(s) + which frames they are into
the frame-replacement condition, encoded at sampling by the model's VAE or a ComfyUI VAE on `vae`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .comfy_adapters import EncodedPrompts, clip_text_embedding
from .types import FramePosition, ImageCondition, STIVConditioning, STIVInputError, image_to_pixels, require_inputs


class STIVTextEncode:
    CATEGORY = "STIV/conditioning"
    RETURN_TYPES = ("STIV_COND",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    DESCRIPTION = ("A prompt (and optional negative prompt) for STIV; text-to-video until images are added. "
                   "The model's own text encoder reads it, or a ComfyUI text encoder connected to clip (e.g. "
                   "T5-XXL from CLIPLoader, type 'pixart'), which must be the one the model was trained with.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt": ("STRING", {"multiline": True, "default": "a red circle moving left on a blue background"}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "empty: the model's learned empty text (as trained)"}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "optional: a ComfyUI text encoder used instead of the model's own; its "
                                         "width must be the model's (T5-XXL 4096, CLIP-L 768). Encoders without a "
                                         "pooled output (T5) give the mean of the tokens as the pooled text"}),
            "pooled_clip": ("CLIP", {"tooltip": "optional, with clip: a second text encoder (e.g. CLIP-L) whose "
                                                "pooled output is the pooled text, for a model trained on T5 tokens "
                                                "+ a CLIP pooled embedding"}),
        }}

    def encode(self, prompt: str, negative_prompt: str, clip: Any = None, pooled_clip: Any = None):
        prompt, negative = prompt.strip(), negative_prompt.strip() or None
        if not prompt:
            raise STIVInputError("STIV Text Encode: the prompt is empty; describe the video")
        if pooled_clip is not None and clip is None:
            raise STIVInputError("STIV Text Encode: pooled_clip gives only the pooled text; connect clip too "
                                 "(the encoder of the tokens)")
        encoded = None
        if clip is not None:
            try:
                encoded = EncodedPrompts({p: clip_text_embedding(clip, p, pooled_clip=pooled_clip)
                                          for p in (prompt, negative) if p})
            except ValueError as err:
                raise STIVInputError(f"STIV Text Encode: {err}") from None
        return (STIVConditioning(prompt, negative, encoded=encoded),)


class STIVImageCondition:
    CATEGORY = "STIV/conditioning"
    RETURN_TYPES = ("STIV_COND",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "condition"
    DESCRIPTION = ("Gives frames of the video: first (image-to-video), last, first+last (interpolation), "
                   "first k (video prediction) or keyframes every `keyframe_stride` frames.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("STIV_COND",),
            "images": ("IMAGE", {"tooltip": "one image per given frame, in order"}),
            "frames": ([p.value for p in FramePosition], {"default": FramePosition.FIRST.value}),
            "keyframe_stride": ("INT", {"default": 4, "min": 1, "max": 1024,
                                        "tooltip": "keyframes only: frames between given images"}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "optional: a ComfyUI VAE that encodes the images instead of the model's "
                                       "own (the one it was trained with: same latent channels; the model's "
                                       "latent scale is applied). Connect the same VAE to STIV Decode"}),
            "last_image": ("IMAGE", {"tooltip": "first+last only: the last frame (else images holds both)"}),
        }}

    def condition(self, conditioning: STIVConditioning, images: torch.Tensor, frames: str,
                  keyframe_stride: int, last_image: Optional[torch.Tensor] = None, vae: Any = None):
        require_inputs("STIV Image Condition", conditioning=conditioning)
        try:
            pixels = image_to_pixels(images, "images")
            last = None if last_image is None else image_to_pixels(last_image, "last_image")
        except STIVInputError as err:
            raise STIVInputError(f"STIV Image Condition: {err}") from None
        if last_image is not None and frames != FramePosition.FIRST_LAST.value:
            raise STIVInputError(f"STIV Image Condition: last_image is connected but frames is {frames!r}; pick "
                                 f"'{FramePosition.FIRST_LAST.value}' to use it, or disconnect it")
        if last is not None:
            if last.shape[-2:] != pixels.shape[-2:]:
                raise STIVInputError(f"STIV Image Condition: the first image is {pixels.shape[-1]}x"
                                     f"{pixels.shape[-2]} px, the last {last.shape[-1]}x{last.shape[-2]}; "
                                     f"give images of one size")
            pixels = torch.cat([pixels, last])
        try:
            cond = ImageCondition(pixels, FramePosition(frames), keyframe_stride)
        except STIVInputError as err:
            raise STIVInputError(f"STIV Image Condition: {err}") from None
        return (conditioning.with_images(cond, vae),)
