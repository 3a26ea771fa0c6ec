"""STIV Sampler (frame replacement + guidance) and STIV Keyframe -> Interpolate (a long video)."""
from __future__ import annotations

from ..stiv_core.pipeline import long_video_latents
from .run import SamplingSettings, run_sampling, settings_inputs
from .types import STIVConditioning, STIVModel


class STIVSampler:
    CATEGORY = "STIV/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"
    DESCRIPTION = ("Samples a video: the condition's given frames are put in place at every step (frame "
                   "replacement) and the passes are combined by the chosen guidance.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("STIV_MODEL",),
            "conditioning": ("STIV_COND",),
            "frames": ("INT", {"default": 16, "min": 1, "max": 1024,
                               "tooltip": "a multiple of the model's temporal patch (2 for the built-in)"}),
            **settings_inputs(),
            "frame_stride": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "micro-condition: source "
                                     "frames between generated ones (> 1 for sparse keyframes)"}),
        }}

    def sample(self, model: STIVModel, conditioning: STIVConditioning, frames: int, frame_stride: int,
               **settings):
        s = SamplingSettings(**settings)

        def work(callback):
            request = s.request(conditioning, frames, frame_stride=frame_stride)
            return model.pipeline.sample_latents(request, callback=callback)

        return (run_sampling(model, s.steps, "STIV Sampler", work),)


class STIVKeyframeInterpolate:
    CATEGORY = "STIV/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"
    DESCRIPTION = ("A long video: `keyframes` frames at `keyframe_stride` (the condition applies here), then "
                   "interpolation between each pair; pairs share their boundary frames exactly. "
                   "(keyframes - 1) * stride + 1 frames.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("STIV_MODEL",),
            "conditioning": ("STIV_COND",),
            "keyframes": ("INT", {"default": 4, "min": 2, "max": 256,
                                  "tooltip": "a multiple of the temporal patch (2 for the built-in)"}),
            "keyframe_stride": ("INT", {"default": 5, "min": 1, "max": 256,
                                        "tooltip": "stride + 1 (each window's frames) must be a multiple "
                                                   "of the temporal patch"}),
            **settings_inputs(),
        }}

    def sample(self, model: STIVModel, conditioning: STIVConditioning, keyframes: int, keyframe_stride: int,
               **settings):
        s = SamplingSettings(**settings)

        def work(callback):
            request = s.request(conditioning, keyframes, frame_stride=keyframe_stride)
            return long_video_latents(model.pipeline, request, keyframes=keyframes, stride=keyframe_stride,
                                      callback=callback)

        return (run_sampling(model, s.steps * keyframes, "STIV Keyframe -> Interpolate", work),)
