"""STIV Sampler (frame replacement + guidance), STIV Keyframe -> Interpolate (a long video in one node) and
STIV Interpolate Keyframes (its second half, after a STIV Sampler run with a frame_stride)."""
from __future__ import annotations

import torch

from ..stiv_core.pipeline import interpolate_keyframes, long_video_latents
from .run import NUMERIC_SETTINGS, SamplingSettings, check_widgets, require_widgets, run_sampling, settings_inputs
from .types import STIVConditioning, STIVInputError, STIVModel, require_inputs


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

    @classmethod
    def VALIDATE_INPUTS(cls, frames=None, frame_stride=None, seed=None, width=None, height=None, steps=None,
                        shift=None, scale=None, image_scale=None) -> bool | str:
        """Before the prompt runs: a bad widget value is a validation error naming the input."""
        return check_widgets(cls.INPUT_TYPES()["required"], frames=frames, frame_stride=frame_stride, seed=seed,
                             width=width, height=height, steps=steps, shift=shift, scale=scale,
                             image_scale=image_scale)

    def sample(self, model: STIVModel, conditioning: STIVConditioning, frames: int, frame_stride: int,
               **settings):
        require_inputs("STIV Sampler", model=model, conditioning=conditioning)
        require_widgets("STIV Sampler", self.INPUT_TYPES()["required"], frames=frames, frame_stride=frame_stride,
                        **{k: settings[k] for k in NUMERIC_SETTINGS})
        s = SamplingSettings(**settings)

        def work(pipeline, callback):
            request = s.request(conditioning, frames, frame_stride=frame_stride)
            return pipeline.sample_latents(request, callback=callback)

        shape = lambda: s.run_shape(frames, model.pipeline.vae.spatial_factor)
        return (run_sampling(model, conditioning, s.steps, "STIV Sampler", work, shape),)


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

    @classmethod
    def VALIDATE_INPUTS(cls, keyframes=None, keyframe_stride=None, seed=None, width=None, height=None, steps=None,
                        shift=None, scale=None, image_scale=None) -> bool | str:
        """Before the prompt runs: a bad widget value is a validation error naming the input."""
        return check_widgets(cls.INPUT_TYPES()["required"], keyframes=keyframes, keyframe_stride=keyframe_stride,
                             seed=seed, width=width, height=height, steps=steps, shift=shift, scale=scale,
                             image_scale=image_scale)

    def sample(self, model: STIVModel, conditioning: STIVConditioning, keyframes: int, keyframe_stride: int,
               **settings):
        require_inputs("STIV Keyframe -> Interpolate", model=model, conditioning=conditioning)
        require_widgets("STIV Keyframe -> Interpolate", self.INPUT_TYPES()["required"], keyframes=keyframes,
                        keyframe_stride=keyframe_stride, **{k: settings[k] for k in NUMERIC_SETTINGS})
        s = SamplingSettings(**settings)

        def work(pipeline, callback):
            request = s.request(conditioning, keyframes, frame_stride=keyframe_stride)
            return long_video_latents(pipeline, request, keyframes=keyframes, stride=keyframe_stride,
                                      callback=callback)

        shape = lambda: s.run_shape(max(keyframes, keyframe_stride + 1), model.pipeline.vae.spatial_factor)
        return (run_sampling(model, conditioning, s.steps * keyframes, "STIV Keyframe -> Interpolate", work,
                             shape),)


class STIVInterpolateKeyframes:
    CATEGORY = "STIV/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"
    DESCRIPTION = ("Fills `keyframe_stride - 1` frames between each pair of keyframes from a STIV Sampler run "
                   "with frame_stride = keyframe_stride: K keyframes -> (K - 1) * stride + 1 frames, the "
                   "keyframes kept exactly. With the same seed and settings on both nodes this equals STIV "
                   "Keyframe -> Interpolate. The video size comes from the keyframes.")

    @classmethod
    def INPUT_TYPES(cls):
        settings = {k: v for k, v in settings_inputs().items() if k not in ("width", "height")}
        return {"required": {
            "model": ("STIV_MODEL",),
            "conditioning": ("STIV_COND",),
            "keyframes": ("LATENT", {"tooltip": "a STIV Sampler's output, sampled with frame_stride = "
                                                "keyframe_stride"}),
            "keyframe_stride": ("INT", {"default": 5, "min": 1, "max": 256,
                                        "tooltip": "the keyframes' frame_stride; stride + 1 must be a "
                                                   "multiple of the temporal patch"}),
            **settings,
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, keyframe_stride=None, seed=None, steps=None, shift=None, scale=None,
                        image_scale=None) -> bool | str:
        """Before the prompt runs: a bad widget value is a validation error naming the input."""
        return check_widgets(cls.INPUT_TYPES()["required"], keyframe_stride=keyframe_stride, seed=seed, steps=steps,
                             shift=shift, scale=scale, image_scale=image_scale)

    def sample(self, model: STIVModel, conditioning: STIVConditioning, keyframes: dict, keyframe_stride: int,
               **settings):
        require_inputs("STIV Interpolate Keyframes", model=model, conditioning=conditioning)
        require_widgets("STIV Interpolate Keyframes", self.INPUT_TYPES()["required"], keyframe_stride=keyframe_stride,
                        **{k: settings[k] for k in NUMERIC_SETTINGS if k in settings})
        keys = keyframe_latents(model, keyframes)
        factor = model.pipeline.vae.spatial_factor
        s = SamplingSettings(width=keys.shape[4] * factor, height=keys.shape[3] * factor, **settings)

        def work(pipeline, callback):
            # the images (if any) conditioned the keyframe pass; the windows are conditioned on the keyframes
            request = s.request(conditioning.with_images(None), keys.shape[2], frame_stride=keyframe_stride)
            return interpolate_keyframes(pipeline, request, keys.to(pipeline.device), stride=keyframe_stride,
                                         callback=callback)

        shape = lambda: s.run_shape(keyframe_stride + 1, factor)
        return (run_sampling(model, conditioning, s.steps * (keys.shape[2] - 1), "STIV Interpolate Keyframes",
                             work, shape),)


def keyframe_latents(model: STIVModel, latent: dict) -> torch.Tensor:
    """LATENT -> keyframe latents `(B, C, K, h, w)` of this model's VAE, K >= 2, or a readable error."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    channels = model.pipeline.vae.latent_channels
    if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[1] != channels:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise STIVInputError(f"STIV Interpolate Keyframes: expected keyframe latents (B, {channels}, K, h, w) "
                             f"from a STIV Sampler run with this model, got {shape}")
    if samples.shape[0] != 1:
        raise STIVInputError(f"STIV Interpolate Keyframes: takes one video's keyframes (batch 1), got a batch of "
                             f"{samples.shape[0]}; split the batch (e.g. Latent From Batch) first")
    if samples.shape[2] < 2:
        raise STIVInputError(f"STIV Interpolate Keyframes: needs at least 2 keyframes to interpolate between, "
                             f"got {samples.shape[2]}; sample more frames in the keyframe pass")
    return samples.float()
