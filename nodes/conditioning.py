"""STIV Text Encode and STIV Image Condition (the "Text/Image Conditioner") -> STIV_COND.

The prompt is encoded by the model's own text encoder when the sampler runs (it ships in the bundle);
the image node turns IMAGE(s) + which frames they are into the frame-replacement condition.
"""
from __future__ import annotations

from typing import Optional

import torch

from .types import FramePosition, ImageCondition, STIVConditioning, STIVInputError, image_to_pixels


class STIVTextEncode:
    CATEGORY = "STIV/conditioning"
    RETURN_TYPES = ("STIV_COND",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    DESCRIPTION = "A prompt (and optional negative prompt) for STIV; text-to-video until images are added."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt": ("STRING", {"multiline": True, "default": "a red circle moving left on a blue background"}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "empty: the model's learned empty text (as trained)"}),
        }}

    def encode(self, prompt: str, negative_prompt: str):
        if not prompt.strip():
            raise STIVInputError("STIV Text Encode: the prompt is empty; describe the video")
        return (STIVConditioning(prompt.strip(), negative_prompt.strip() or None),)


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
            "last_image": ("IMAGE", {"tooltip": "first+last only: the last frame (else images holds both)"}),
        }}

    def condition(self, conditioning: STIVConditioning, images: torch.Tensor, frames: str,
                  keyframe_stride: int, last_image: Optional[torch.Tensor] = None):
        pixels = image_to_pixels(images)
        if last_image is not None and frames == FramePosition.FIRST_LAST.value:
            last = image_to_pixels(last_image)
            if last.shape[-2:] != pixels.shape[-2:]:
                raise STIVInputError(f"STIV Image Condition: the first image is {pixels.shape[-1]}x"
                                     f"{pixels.shape[-2]} px, the last {last.shape[-1]}x{last.shape[-2]}; "
                                     f"give images of one size")
            pixels = torch.cat([pixels, last])
        try:
            cond = ImageCondition(pixels, FramePosition(frames), keyframe_stride)
        except STIVInputError as err:
            raise STIVInputError(f"STIV Image Condition: {err}") from None
        return (conditioning.with_images(cond),)
