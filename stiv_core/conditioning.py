"""Frame-replacement plans: which latent frames are given, their clean latents, and the loss mask.

Every STIV task is one plan over the same sampler: no frames given = text-to-video, the first frame =
text+image-to-video, the first k = video prediction, first + last = interpolation, every S-th =
keyframe in-filling. The sampler puts the clean latents in place of the noisy ones before every
model call, and the trainer masks the given frames out of the loss.

What a task gives is decided in ONE place, `given_frames`; the CLI, the nodes, the pipeline's long
video and TUP passes, and the trainer's task mixture all call it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import flow
from .config import MICRO_CONDITIONS


class Task(str, enum.Enum):
    """What a clip is conditioned on: which of its frames are given."""

    T2V = "t2v"                       # nothing given
    TI2V = "ti2v"                     # the first frame
    LAST_FRAME = "last"               # the last frame (a video that ends on an image)
    PREDICTION = "prediction"         # the first k frames
    INTERPOLATION = "interpolation"   # the first and the last frame
    KEYFRAMES = "keyframes"           # k frames, every S-th from frame 0

    @property
    def fixed_count(self) -> Optional[int]:
        """How many frames the task gives when that is fixed; None where the caller picks k."""
        return _FIXED_COUNT.get(self)


_FIXED_COUNT = {Task.T2V: 0, Task.TI2V: 1, Task.LAST_FRAME: 1, Task.INTERPOLATION: 2}


class FramesDoNotFit(ValueError):
    """A task's given frames reach past the clip: `indices` it needs, `num_frames` the clip has."""

    def __init__(self, indices: tuple[int, ...], num_frames: int, message: str):
        super().__init__(message)
        self.indices, self.num_frames = indices, num_frames


def given_frames(task: Task, num_frames: int, *, count: Optional[int] = None, stride: int = 1) -> tuple[int, ...]:
    """The latent frame indices `task` gives in a `num_frames`-frame clip.

    count: the frames given by PREDICTION (0..k-1) and KEYFRAMES (0, S, ..., (k-1)S); the other tasks give a
    fixed number (`Task.fixed_count`), and a different `count` is an error. stride: S of KEYFRAMES.
    Raises ValueError saying which frames were needed when they do not fit the clip.
    """
    task = Task(task)
    fixed = task.fixed_count
    if fixed is not None and count is not None and count != fixed:
        raise ValueError(f"'{task.value}' gives {fixed} frame{'s' * (fixed != 1)}, got {count}")
    if fixed is None and (count is None or count < 1):
        raise ValueError(f"'{task.value}' needs the number of given frames (count >= 1), got {count}")
    if stride < 1:
        raise ValueError(f"keyframe stride must be >= 1, got {stride}")
    if task is Task.INTERPOLATION and num_frames < 2:
        raise ValueError(f"interpolation needs at least 2 frames, got {num_frames}")
    last = num_frames - 1
    indices = {Task.T2V: (), Task.TI2V: (0,), Task.LAST_FRAME: (last,), Task.INTERPOLATION: (0, last),
               Task.PREDICTION: tuple(range(count or 0)),
               Task.KEYFRAMES: tuple(range(0, (count or 0) * stride, stride))}[task]
    if indices and indices[-1] > last:
        raise FramesDoNotFit(indices, num_frames, f"{len(indices)} given frame{'s' * (len(indices) > 1)} as "
                             f"'{task.value}' (stride {stride}) need frames {list(indices)} and so need "
                             f"{indices[-1] + 1} frames; the clip has {num_frames} (0..{last})")
    return indices


@dataclass(frozen=True)
class FrameReplacementPlan:
    """`given` latent frame indices of a `num_frames` clip and their clean latents.

    clean: `(B, C, len(given), H, W)` in the order of `given` (None only when nothing is given).
    sample_mask: `(B, T)` bool when each sample has its own given frames (`per_sample`); then `given` is
    empty and `clean` holds the whole clip `(B, C, T, H, W)`.
    """

    num_frames: int
    given: tuple[int, ...] = ()
    clean: Optional[torch.Tensor] = field(default=None, compare=False)
    sample_mask: Optional[torch.Tensor] = field(default=None, compare=False)

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
        if self.sample_mask is not None:
            if given:
                raise ValueError("a per-sample plan keeps its given frames in sample_mask, not in given")
            return
        if given and self.clean is None:
            raise ValueError(f"frames {given} are given but no clean latents were supplied")
        if self.clean is not None:
            if self.clean.dim() != 5 or self.clean.shape[2] != len(given):
                raise ValueError(f"clean latents must be (B, C, {len(given)}, H, W) for the given frames "
                                 f"{given}, got shape {tuple(self.clean.shape)}")

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def for_task(cls, task: Task, num_frames: int, clean: Optional[torch.Tensor] = None, *,
                 stride: int = 1) -> FrameReplacementPlan:
        """The plan of `task`: `clean` `(B, C, k, H, W)` (or `(B, C, H, W)` for one frame) are its given
        frames in order (k = their count, see `given_frames`); None for T2V."""
        if clean is None:
            return cls(num_frames, given_frames(task, num_frames, stride=stride))
        clean = _as_frames(clean)
        return cls(num_frames, given_frames(task, num_frames, count=clean.shape[2], stride=stride), clean)

    @classmethod
    def interpolation(cls, clean_first: torch.Tensor, clean_last: torch.Tensor,
                      num_frames: int) -> FrameReplacementPlan:
        """Frame interpolation between two latent frames `(B, C, H, W)` (or `(B, C, 1, H, W)`)."""
        both = torch.cat([_as_frames(clean_first), _as_frames(clean_last)], dim=2)
        return cls.for_task(Task.INTERPOLATION, num_frames, both)

    @classmethod
    def frames_at(cls, clean: torch.Tensor, indices: Sequence[int], num_frames: int) -> FrameReplacementPlan:
        """Given frames at `indices` (already decided by `given_frames`): `clean` `(B, C, len(indices), H, W)`."""
        return cls(num_frames, tuple(indices), _as_frames(clean))

    @classmethod
    def per_sample(cls, clip: torch.Tensor, mask: torch.Tensor) -> FrameReplacementPlan:
        """Each sample its own given frames (the trainer's task mixture): `clip` `(B, C, T, H, W)` holds the
        clean latents of every frame, `mask` `(B, T)` bool marks the given ones."""
        if clip.dim() != 5 or mask.shape != (clip.shape[0], clip.shape[2]):
            raise ValueError(f"a per-sample plan needs a clip (B, C, T, H, W) and a mask (B, T); got "
                             f"{tuple(clip.shape)} and {tuple(mask.shape)}")
        return cls(clip.shape[2], clean=clip, sample_mask=mask.bool())

    # -- use ------------------------------------------------------------------------------------
    @property
    def gives_frames(self) -> bool:
        return bool(self.given) or self.sample_mask is not None

    def frame_mask(self, batch: int, device=None) -> torch.Tensor:
        """`(B, T)` bool, True for given frames."""
        if self.sample_mask is not None:
            if batch != self.sample_mask.shape[0]:
                raise ValueError(f"the plan is for a batch of {self.sample_mask.shape[0]}, got {batch}")
            return self.sample_mask.to(device)
        mask = torch.zeros(batch, self.num_frames, dtype=torch.bool, device=device)
        mask[:, list(self.given)] = True
        return mask

    def loss_weight(self, batch: int, device=None) -> torch.Tensor:
        """`(B, T)` float: 1 for generated frames, 0 for given ones."""
        return (~self.frame_mask(batch, device)).float()

    def replace(self, x: torch.Tensor) -> torch.Tensor:
        """x `(B, C, T, H, W)` with the given frames set to their clean latents (a new tensor)."""
        if not self.gives_frames:
            return x
        self._check_shape(x)
        clean = self.clean.to(device=x.device, dtype=x.dtype)
        if self.sample_mask is not None:
            return torch.where(self.sample_mask.to(x.device)[:, None, :, None, None], clean, x)
        out = x.clone()
        out[:, :, list(self.given)] = clean
        return out

    def renoise(self, x: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """x with the given frames set to their clean latents noised to time `t` (scalar) with `noise`
        (`flow.interpolate`). Keeps the sampler state of given frames on the path an unconditioned pass
        expects."""
        if not self.gives_frames:
            return x
        self._check_shape(x)
        clean = self.clean.to(device=x.device, dtype=x.dtype)
        if self.sample_mask is not None:
            noisy = flow.interpolate(clean, noise, t)
            return torch.where(self.sample_mask.to(x.device)[:, None, :, None, None], noisy, x)
        idx = list(self.given)
        out = x.clone()
        out[:, :, idx] = flow.interpolate(clean, noise[:, :, idx], t)
        return out

    def _check_shape(self, x: torch.Tensor) -> None:
        c = self.clean
        if self.sample_mask is not None and x.shape != c.shape:
            raise ValueError(f"latents {tuple(x.shape)} do not match the plan's clip {tuple(c.shape)}")
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
