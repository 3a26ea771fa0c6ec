"""What travels between the STIV nodes: typed dataclasses, converted to ComfyUI types only at the edge.

STIV_MODEL = `STIVModel`, STIV_COND = `STIVConditioning`; ComfyUI's IMAGE is `[N, H, W, C]` in 0..1
and its LATENT a dict `{"samples": (B, C, T, h, w)}`.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from ..stiv_core.bundle import SamplingDefaults
from ..stiv_core.conditioning import FramesDoNotFit, Task, given_frames
from ..stiv_core.memory import MemoryHandle
from ..stiv_core.pipeline import FrameCondition, STIVPipeline
from ..stiv_core.video_io import fit_image
from .comfy_adapters import EncodedPrompts, MissingTextEncoder, RecordedVAE, with_comfy_vae

log = logging.getLogger("stiv.nodes")


class STIVInputError(ValueError):
    """A bad input, with a message written for the person at the ComfyUI canvas."""


@dataclass(frozen=True)
class STIVModel:
    """STIV_MODEL: the pipeline (transformer + its text encoder and VAE) with memory options applied; a bare
    model's pipeline has a `MissingTextEncoder` and a `RecordedVAE` (ComfyUI's CLIP and VAE are connected)."""

    pipeline: STIVPipeline
    defaults: SamplingDefaults
    name: str
    memory: Optional[MemoryHandle] = None


class FramePosition(str, enum.Enum):
    """Which frames of the video the condition images are: the widget's words for the tasks."""

    FIRST = "first"              # TI2V
    LAST = "last"
    FIRST_LAST = "first+last"    # interpolation
    FIRST_K = "first k"          # video prediction
    KEYFRAMES = "keyframes"      # every `stride`-th frame from 0

    @property
    def task(self) -> Task:
        return _TASKS[self]


_TASKS = {FramePosition.FIRST: Task.TI2V, FramePosition.LAST: Task.LAST_FRAME,
          FramePosition.FIRST_LAST: Task.INTERPOLATION, FramePosition.FIRST_K: Task.PREDICTION,
          FramePosition.KEYFRAMES: Task.KEYFRAMES}


@dataclass(frozen=True)
class ImageCondition:
    """Condition images `(k, 3, H, W)` in [-1, 1] and where they go (indices need the frame count)."""

    pixels: torch.Tensor
    position: FramePosition
    stride: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", FramePosition(self.position))
        k, need = self.pixels.shape[0], self.position.task.fixed_count
        if need is not None and k != need:
            raise STIVInputError(f"'{self.position.value}' takes {need} image{'s' * (need > 1)}, got a batch "
                                 f"of {k}; pick 'first k' or 'keyframes' to give several frames")
        if self.stride < 1:
            raise STIVInputError(f"keyframe stride must be >= 1, got {self.stride}")

    def frame_condition(self, num_frames: int, height: int, width: int) -> FrameCondition:
        """The pipeline's FrameCondition; images of another size are centre-cropped and resized."""
        k, p = self.pixels.shape[0], self.position
        try:
            indices = given_frames(p.task, num_frames, count=k, stride=self.stride)
        except FramesDoNotFit as err:
            raise STIVInputError(f"{k} image(s) as '{p.value}' (stride {self.stride}) need frames {list(err.indices)}, "
                                 f"but the video has {num_frames} (0..{num_frames - 1}); give fewer images "
                                 f"or more frames") from None
        except ValueError as err:
            raise STIVInputError(f"{k} image(s) as '{p.value}': {err}") from None
        pixels = self.pixels
        if pixels.shape[-2:] != (height, width):
            log.warning("condition images are %dx%d px; centre-cropped and resized to the video's %dx%d",
                        pixels.shape[-1], pixels.shape[-2], width, height)
            pixels = torch.stack([fit_image(p, height, width) for p in pixels])
        return FrameCondition(pixels.permute(1, 0, 2, 3)[None], indices)


@dataclass(frozen=True)
class STIVConditioning:
    """STIV_COND: the prompt, an optional negative prompt, and the given frames (None = text-to-video).

    It carries prompts and pixels, not tokens and a frame-replacement plan (as DESIGN.md's data flow has it),
    on purpose: the conditioner nodes take no model, so the model's own text encoder and VAE are only at hand
    in the sampler, and a plan's latent frame indices need the frame count and size set there. The sampler
    turns this into `TextEmbedding`s and a `FrameReplacementPlan` (`conditioning.given_frames`).

    `encoded`: the prompts as a ComfyUI CLIP encoded them (None = the model's own text encoder, at
    sampling); `vae`: a ComfyUI VAE that encodes the given frames (None = the model's own VAE).
    """

    prompt: str
    negative_prompt: Optional[str] = None
    images: Optional[ImageCondition] = None
    encoded: Optional[EncodedPrompts] = None
    vae: Any = None

    def with_images(self, images: Optional[ImageCondition], vae: Any = None) -> STIVConditioning:
        """These images given; `vae` (if any) replaces the VAE an earlier node set."""
        return replace(self, images=images, vae=vae if vae is not None else self.vae)

    def pipeline_for(self, model: STIVModel) -> STIVPipeline:
        """The model's pipeline with what this conditioning brings from ComfyUI (errors: ValueError)."""
        pipeline = model.pipeline
        if self.encoded is None and isinstance(pipeline.text_encoder, MissingTextEncoder):
            raise ValueError(pipeline.text_encoder.message)
        if self.images is not None and self.vae is None and isinstance(pipeline.vae, RecordedVAE):
            raise ValueError(f"{pipeline.vae.message} on STIV Image Condition, to encode the condition images")
        if self.encoded is not None:
            self.encoded.check_widths(pipeline.model.config)
            pipeline = replace(pipeline, text_encoder=self.encoded)
        return with_comfy_vae(pipeline, self.vae)


def require_inputs(node: str, **inputs: Any) -> None:
    """Each of a node's STIV inputs (`model`, `conditioning`) connected and of its type, else a STIVInputError
    naming the input and what gives it (an API prompt or a broken link can pass None or another type)."""
    expected = {"model": (STIVModel, "STIV_MODEL", "STIV Loader"),
                "conditioning": (STIVConditioning, "STIV_COND", "STIV Text Encode or STIV Image Condition")}
    for name, value in inputs.items():
        kind, type_name, source = expected[name]
        if not isinstance(value, kind):
            got = "nothing (not connected)" if value is None else type(value).__name__
            raise STIVInputError(f"{node}: {name} must be a {type_name} from {source}, got {got}; connect it")


def image_to_pixels(image: torch.Tensor, name: str = "images") -> torch.Tensor:
    """ComfyUI IMAGE `[N, H, W, C]` in 0..1 -> `(N, 3, H, W)` in [-1, 1] (alpha dropped, grey expanded).
    NaN or inf anywhere is refused with the input's `name` (they would come out as black frames)."""
    if not isinstance(image, torch.Tensor):
        raise STIVInputError(f"{name}: expected an IMAGE batch [N, H, W, C], got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        raise STIVInputError(f"{name}: expected an IMAGE batch [N, H, W, C], got shape {tuple(image.shape)}")
    bad = ~torch.isfinite(image)
    if bad.any():
        frames = sorted({int(i) for i in bad.flatten(1).any(1).nonzero().flatten()})
        raise STIVInputError(f"{name} holds {int(bad.sum())} NaN or infinite values (image(s) {frames} of the "
                             f"batch); fix the node that made them, they would become black frames")
    rgb = image[..., :3] if image.shape[-1] != 1 else image.expand(*image.shape[:3], 3)
    return (rgb.float().permute(0, 3, 1, 2) * 2 - 1).clamp(-1, 1)


def video_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Videos `(B, 3, T, H, W)` in [-1, 1] -> IMAGE `[B*T, H, W, 3]` in 0..1 (videos one after another)."""
    return ((pixels.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1).contiguous()
