"""Frame-replacement plans: which latent frames are given, their clean latents, and the loss mask.

Every STIV task is one plan over the same sampler: no frames given = text-to-video, the first frame =
text+image-to-video, the first k = video prediction, first + last = interpolation, every S-th =
keyframe in-filling. The sampler puts the clean latents in place of the noisy ones before every
model call, and the trainer masks the given frames out of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .config import MICRO_CONDITIONS

@dataclass(frozen=True)
class FrameReplacementPlan:
    """`given` latent frame indices of a `num_frames` clip and their clean latents.

    clean: `(B, C, len(given), H, W)` in the order of `given` (None only when nothing is given).
    """

    num_frames: int
    given: tuple[int, ...] = ()
    clean: Optional[torch.Tensor] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"a clip needs at least 1 frame, got num_frames={self.num_frames}")
        given = tuple(int(i) for i in self.given)
        if len(set(given)) != len(given):
            raise ValueError(f"given frame indices repeat: {given}")
        bad = [i for i in given if not 0 <= i < self.num_frames]
        if bad:
            raise ValueError(f"given frames {bad} are outside a {self.num_frames}-frame clip (0..{self.num_frames - 1})")
        object.__setattr__(self, "given", given)
        if given and self.clean is None:
            raise ValueError(f"frames {given} are given but no clean latents were supplied")
        if self.clean is not None:
            if self.clean.dim() != 5 or self.clean.shape[2] != len(given):
                raise ValueError(f"clean latents must be (B, C, {len(given)}, H, W) for the given frames "
                                 f"{given}, got shape {tuple(self.clean.shape)}")

    # -- constructors: one per task -------------------------------------------------------------
    @classmethod
    def text_to_video(cls, num_frames: int) -> FrameReplacementPlan:
        return cls(num_frames)

    @classmethod
    def first_frame(cls, clean_first: torch.Tensor, num_frames: int) -> FrameReplacementPlan:
        """TI2V: `clean_first` `(B, C, H, W)` or `(B, C, 1, H, W)` is frame 0."""
        return cls.frames_at(clean_first, [0], num_frames)

    @classmethod
    def prediction(cls, clean_context: torch.Tensor, num_frames: int) -> FrameReplacementPlan:
        """Video prediction: `clean_context` `(B, C, k, H, W)` are frames 0..k-1."""
        return cls.frames_at(clean_context, range(clean_context.shape[2]), num_frames)

    @classmethod
    def interpolation(cls, clean_first: torch.Tensor, clean_last: torch.Tensor,
                      num_frames: int) -> FrameReplacementPlan:
        """Frame interpolation: the first and last frames are given."""
        if num_frames < 2:
            raise ValueError(f"interpolation needs at least 2 frames, got {num_frames}")
        both = torch.cat([_as_frames(clean_first), _as_frames(clean_last)], dim=2)
        return cls.frames_at(both, [0, num_frames - 1], num_frames)

    @classmethod
    def keyframes(cls, clean_keys: torch.Tensor, num_frames: int, stride: int) -> FrameReplacementPlan:
        """Keyframe in-filling: `clean_keys` `(B, C, K, H, W)` are frames 0, S, 2S, ..."""
        if stride < 1:
            raise ValueError(f"keyframe stride must be >= 1, got {stride}")
        indices = list(range(0, num_frames, stride))[: clean_keys.shape[2]]
        if len(indices) != clean_keys.shape[2]:
            raise ValueError(f"{clean_keys.shape[2]} keyframes at stride {stride} need "
                             f"{(clean_keys.shape[2] - 1) * stride + 1} frames, clip has {num_frames}")
        return cls.frames_at(clean_keys, indices, num_frames)

    @classmethod
    def frames_at(cls, clean: torch.Tensor, indices: Sequence[int], num_frames: int) -> FrameReplacementPlan:
        return cls(num_frames, tuple(indices), _as_frames(clean))

    # -- use ------------------------------------------------------------------------------------
    def frame_mask(self, batch: int, device=None) -> torch.Tensor:
        """`(B, T)` bool, True for given frames."""
        mask = torch.zeros(batch, self.num_frames, dtype=torch.bool, device=device)
        mask[:, list(self.given)] = True
        return mask

    def loss_weight(self, batch: int, device=None) -> torch.Tensor:
        """`(B, T)` float: 1 for generated frames, 0 for given ones."""
        return (~self.frame_mask(batch, device)).float()

    def replace(self, x: torch.Tensor) -> torch.Tensor:
        """x `(B, C, T, H, W)` with the given frames set to their clean latents (a new tensor)."""
        if not self.given:
            return x
        self._check_shape(x)
        out = x.clone()
        out[:, :, list(self.given)] = self.clean.to(device=x.device, dtype=x.dtype)
        return out

    def renoise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x with the given frames set to their clean latents noised to time `t` (scalar) with `noise`.

        Keeps the sampler state of given frames on the path an unconditioned pass expects.
        """
        if not self.given:
            return x
        self._check_shape(x)
        idx = list(self.given)
        clean = self.clean.to(device=x.device, dtype=x.dtype)
        out = x.clone()
        out[:, :, idx] = t * clean + (1 - t) * noise[:, :, idx]
        return out

    def _check_shape(self, x: torch.Tensor) -> None:
        c = self.clean
        if x.shape[2] != self.num_frames or x.shape[0] != c.shape[0] or x.shape[1] != c.shape[1] \
                or x.shape[3:] != c.shape[3:]:
            raise ValueError(f"latents {tuple(x.shape)} do not match the plan: {self.num_frames} frames, "
                             f"clean latents {tuple(c.shape)}")


@dataclass(frozen=True)
class MicroConditions:
    """The paper's micro-conditions, in pixels and frames of the original (pre-crop) video."""

    height: int
    width: int
    num_frames: int
    crop_top: int = 0
    crop_left: int = 0
    frame_stride: int = 1

    def tensor(self, batch: int) -> torch.Tensor:
        """`(B, 6)` float in `MICRO_CONDITIONS` order."""
        row = torch.tensor([float(getattr(self, name)) for name in MICRO_CONDITIONS])
        return row.expand(batch, -1).clone()


def _as_frames(latent: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, C, 1, H, W)`; 5-D latents pass through."""
    if latent.dim() == 4:
        return latent[:, :, None]
    if latent.dim() == 5:
        return latent
    raise ValueError(f"expected latents (B, C, H, W) or (B, C, T, H, W), got shape {tuple(latent.shape)}")
