"""generate(): encode -> sample -> decode, one pipeline for every task (a task is a plan).

A long video is keyframes first (a sparse clip with the frame stride as a micro-condition), then
interpolation between each consecutive pair, the pairs sharing their boundary frames exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from .conditioning import FrameReplacementPlan, MicroConditions, Task
from .interfaces import TextEmbedding, TextEncoder, VideoVAE
from .config import STIVConfig
from .model.transformer import STIVTransformer, token_grid
from .sampling import SampleInputs, SamplerConfig, sample
from .sampling.sampler import StepCallback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameCondition:
    """Given frames in pixels `(B, 3, k, H, W)` in [-1, 1] (B = 1 broadcasts) at frame `indices` (from
    `conditioning.given_frames`: the CLI and the nodes turn their task into indices with it)."""

    pixels: torch.Tensor
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.pixels.dim() != 5 or self.pixels.shape[1] != 3:
            raise ValueError(f"condition frames must be (B, 3, k, H, W), got {tuple(self.pixels.shape)}")
        if self.pixels.shape[2] != len(self.indices):
            raise ValueError(f"{self.pixels.shape[2]} condition frames for {len(self.indices)} indices "
                             f"{tuple(self.indices)}: give one frame per index")
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Sequence[str] | str
    num_frames: int
    height: int           # pixels
    width: int            # pixels
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    condition: Optional[FrameCondition] = None   # None = text-to-video
    negative_prompt: Optional[str] = None        # None = the model's learned null text
    frame_stride: int = 1                        # micro-condition: original frames between frames

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


@dataclass
class STIVPipeline:
    """A model with the text encoder and VAE it was trained with."""

    model: STIVTransformer
    text_encoder: TextEncoder
    vae: VideoVAE

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        """The prompts' embedding, fitted to the model; an empty prompt is the model's learned empty text (what
        text dropout trained it on: "nothing said"), not an encoder output for no words."""
        text = self.text_encoder.encode(prompts).fit(self.model.config.max_text_tokens)
        empty = torch.tensor([not p.strip() for p in prompts])
        if not empty.any():
            return text
        null = self.model.null_text.detach().to(text.tokens)
        tokens = torch.where(empty[:, None, None], null.expand_as(text.tokens), text.tokens)
        mask = torch.where(empty[:, None], True, text.mask)
        pooled = torch.where(empty[:, None], self.model.null_pooled.detach().to(text.pooled), text.pooled)
        return TextEmbedding(tokens, mask, pooled)

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """Latent shape for a pixel size; raises with the allowed sizes when they don't fit."""
        check_video_size(self.model.config, self.vae.spatial_factor, num_frames, height, width)
        f = self.vae.spatial_factor
        return (batch, self.vae.latent_channels, num_frames, height // f, width // f)

    def plan(self, request: GenerationRequest, batch: int) -> FrameReplacementPlan:
        cond = request.condition
        if cond is None:
            return FrameReplacementPlan.for_task(Task.T2V, request.num_frames)
        pixels = cond.pixels
        if pixels.shape[-2:] != (request.height, request.width):
            raise ValueError(f"condition frames are {pixels.shape[-1]}x{pixels.shape[-2]} px, the video "
                             f"is {request.width}x{request.height}: resize them first")
        if pixels.shape[0] not in (1, batch):
            raise ValueError(f"condition frames have batch {pixels.shape[0]}, prompts {batch}")
        with torch.inference_mode():
            clean = self.vae.encode(pixels.to(self.device)).float()
        return FrameReplacementPlan.frames_at(clean.expand(batch, *clean.shape[1:]), cond.indices,
                                              request.num_frames)

    def sample_latents(self, request: GenerationRequest, *, plan: Optional[FrameReplacementPlan] = None,
                       callback: Optional[StepCallback] = None) -> torch.Tensor:
        """Latents `(B, C, T, h, w)` for the request (B = number of prompts).

        `plan` (latent frames given directly) overrides the plan made from `request.condition`.
        """
        prompts = request.prompts
        shape = self.latent_shape(len(prompts), request.num_frames, request.height, request.width)
        text = self.encode_text(prompts)
        negative = None
        if request.negative_prompt is not None:
            negative = self.encode_text([request.negative_prompt]).repeat(len(prompts))
        micro = MicroConditions(request.height, request.width, request.num_frames,
                                frame_stride=request.frame_stride).tensor(len(prompts))
        plan = plan if plan is not None else self.plan(request, len(prompts))
        inputs = SampleInputs(text, micro, plan, negative, self.vae.latent_range)
        return sample(self.model, seeded_noise(shape, request.seed), inputs, request.sampler, callback=callback)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, *, chunk_frames: int = 16,
               on_chunk: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Pixels `(B, 3, T, H, W)` in [-1, 1], decoded `chunk_frames` frames at a time; `on_chunk(done,
        total)` after each chunk (a progress bar; raising in it stops the decode)."""
        starts = range(0, latents.shape[2], chunk_frames)
        chunks = []
        for done, i in enumerate(starts, 1):
            chunks.append(self.vae.decode(latents[:, :, i : i + chunk_frames]).float().clamp(-1, 1).cpu())
            if on_chunk is not None:
                on_chunk(done, len(starts))
        return torch.cat(chunks, dim=2)


def check_video_size(config: STIVConfig, spatial_factor: int, num_frames: int, height: int, width: int) -> None:
    """Whether a `config` model with a VAE of `spatial_factor` pixels per latent samples `num_frames` frames
    of `height x width` px; raises with the allowed sizes when not (the config suffices: no weights)."""
    f, p = spatial_factor, config.patch_size
    if min(num_frames, height, width) < 1:
        raise ValueError(f"{num_frames} frames of {width}x{height} px: frames, width and height must be >= 1")
    if height % (f * p) or width % (f * p):
        raise ValueError(f"{width}x{height} px: width and height must be multiples of {f * p} "
                         f"(VAE factor {f} x patch {p}); e.g. {width - width % (f * p) or f * p}x"
                         f"{height - height % (f * p) or f * p}")
    token_grid(config, (num_frames, height // f, width // f))


def seeded_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Gaussian noise from a seeded CPU generator: the same seed gives the same video on any device."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)))


def generate(pipeline: STIVPipeline, request: GenerationRequest, *,
             callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Pixels `(B, 3, T, H, W)` in [-1, 1] for any task; the task is `request.condition`."""
    return pipeline.decode(pipeline.sample_latents(request, callback=callback))


def generate_long(pipeline: STIVPipeline, request: GenerationRequest, *, keyframes: int, stride: int,
                  callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Pixels `(B, 3, (keyframes - 1) * stride + 1, H, W)` of a long video (see `long_video_latents`)."""
    return pipeline.decode(long_video_latents(pipeline, request, keyframes=keyframes, stride=stride,
                                              callback=callback))


def long_video_latents(pipeline: STIVPipeline, request: GenerationRequest, *, keyframes: int, stride: int,
                       callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Long video: `keyframes` frames at `stride`, then interpolation of every consecutive pair.

    Returns latents with `(keyframes - 1) * stride + 1` frames; frame `k * stride` is keyframe k exactly.
    The request's condition (e.g. a first frame) applies to the keyframe pass; `request.num_frames` is
    ignored. Window i is sampled with seed `request.seed + 1 + i`.
    """
    if keyframes < 2:
        raise ValueError(f"a long video needs at least 2 keyframes, got {keyframes}")
    check_long_video(pipeline.model.config.temporal_patch, keyframes, stride)
    keys = pipeline.sample_latents(replace(request, num_frames=keyframes, frame_stride=stride), callback=callback)
    return interpolate_keyframes(pipeline, request, keys, stride=stride, callback=callback)


def interpolate_keyframes(pipeline: STIVPipeline, request: GenerationRequest, keys: torch.Tensor, *, stride: int,
                          callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Fill `stride - 1` frames between each pair of keyframe latents `(B, C, K, h, w)`: K -> (K-1)*S+1.

    Each pair is one interpolation window of `stride + 1` frames; windows share their boundary frames.
    """
    check_long_video(pipeline.model.config.temporal_patch, None, stride)
    windows = [keys[:, :, :1]]
    for i in range(keys.shape[2] - 1):
        window_request = replace(request, num_frames=stride + 1, frame_stride=1, seed=request.seed + 1 + i,
                                 condition=None)
        plan = FrameReplacementPlan.interpolation(keys[:, :, i], keys[:, :, i + 1], stride + 1)
        window = pipeline.sample_latents(window_request, plan=plan, callback=callback)
        windows.append(window[:, :, 1:])  # its first frame is the previous window's last
    return torch.cat(windows, dim=2)


def check_long_video(pt: int, keyframes: Optional[int], stride: int) -> None:
    """Keyframe counts and strides a model with temporal patch `pt` can take (clear errors otherwise)."""
    if stride < 1:
        raise ValueError(f"keyframe stride must be >= 1, got {stride}")
    if (keyframes is not None and keyframes % pt) or (stride + 1) % pt:
        raise ValueError(f"with temporal patch {pt}, the keyframe count ({keyframes}) and stride + 1 "
                         f"({stride + 1}, the frames of each interpolated window) must be multiples of {pt}")


def check_temporal_upsample(pt: int, num_frames: int, video_frames: int) -> int:
    """The window (frames) in which TUP doubles the frame rate of a `video_frames`-frame video sampled in
    windows of at most `num_frames` frames by a model of temporal patch `pt`; a clear error if none fits."""
    if video_frames < 2:
        raise ValueError(f"temporal upsampling needs a video of at least 2 frames, got {video_frames}")
    window = min(num_frames, 2 * video_frames)
    window -= window % 2
    if window < 4 or window % pt:
        raise ValueError(f"temporal upsampling needs an even window of at least 4 frames that is a multiple of "
                         f"the temporal patch {pt}; got {num_frames} frames for a {video_frames}-frame video")
    return window


TUP_SEED_OFFSET = 1_000_003  # temporal-upsampling windows draw noise apart from every other pass


def temporal_upsample_latents(pipeline: STIVPipeline, request: GenerationRequest, latents: torch.Tensor, *,
                              callback: Optional[StepCallback] = None) -> torch.Tensor:
    """The paper's TUP: double the frame rate of `latents` `(B, C, T, h, w)` -> `2T - 1` frames.

    The given frames stay exactly at the even indices; every odd frame is in-filled by the keyframe
    plan at stride 2, in windows of `request.num_frames` (even) frames that overlap by two, so every new
    frame is made with both of its neighbours in view. Window i uses seed `request.seed + TUP_SEED_OFFSET + i`,
    so its noise never repeats the base pass's (seed) or a long video's windows (seed + 1 + i).
    """
    t = latents.shape[2]
    window = check_temporal_upsample(pipeline.model.config.temporal_patch, request.num_frames, t)
    length = 2 * t - 1
    starts = list(range(0, length - 1 - (window - 2), window - 2)) or [0]
    if starts[-1] + window - 2 < length - 1:
        starts.append(length - 1 - (window - 2))  # the last window ends on the last given frame
    pieces, done = [], 0
    for i, start in enumerate(starts):
        keys = latents[:, :, start // 2 : start // 2 + window // 2]
        plan = FrameReplacementPlan.for_task(Task.KEYFRAMES, window, keys, stride=2)
        out = pipeline.sample_latents(replace(request, num_frames=window, condition=None,
                                              seed=request.seed + TUP_SEED_OFFSET + i),
                                      plan=plan, callback=callback)
        end = length if i == len(starts) - 1 else start + window - 2
        pieces.append(out[:, :, done - start : end - start])
        done = end
    return torch.cat(pieces, dim=2)
