"""The one typed sample every dataset yields, and how a list of them becomes a batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..conditioning import MicroConditions


@dataclass(frozen=True)
class SampleKey:
    """Which sample to produce: dataset `index`, resized to `bucket` (frames, H, W), with per-sample
    randomness (crop, start frame, stride) seeded by `seed` so any worker reproduces it exactly."""

    index: int
    bucket: tuple[int, int, int]
    seed: int


@dataclass(frozen=True)
class VideoSample:
    """pixels `(3, T, H, W)` in [-1, 1]; micro: original size, crop and stride (pixels / frames).

    skipped: files that failed before this sample was produced (unreadable or too short), so the
    trainer can count them even when the dataset runs in worker processes.
    """

    pixels: torch.Tensor
    caption: str
    micro: MicroConditions
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pixels.dim() != 4 or self.pixels.shape[0] != 3:
            raise ValueError(f"VideoSample pixels must be (3, T, H, W), got {tuple(self.pixels.shape)}")


@dataclass(frozen=True)
class SampleBatch:
    """pixels `(B, 3, T, H, W)`, one caption per sample, micro `(B, 6)` in MICRO_CONDITIONS order."""

    pixels: torch.Tensor
    captions: tuple[str, ...]
    micro: torch.Tensor
    skipped: tuple[str, ...] = ()


def collate(samples: Sequence[VideoSample]) -> SampleBatch:
    shapes = {tuple(s.pixels.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch needs samples of one shape (one bucket), got {sorted(shapes)}")
    return SampleBatch(torch.stack([s.pixels for s in samples]), tuple(s.caption for s in samples),
                       torch.cat([s.micro.tensor(1) for s in samples]),
                       tuple(path for s in samples for path in s.skipped))
