"""Frame sampling with a stride, and resize + crop to a (frames, H, W) bucket.

Micro-conditions follow SDXL's convention: `height`/`width` are the source's size before any resize,
`crop_top`/`crop_left` are the crop's offset in the resized frame (the one the bucket is cut from).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


class TooShortError(ValueError):
    """A clip with fewer frames than the bucket needs at every allowed stride."""


@dataclass(frozen=True)
class FrameWindow:
    start: int
    stride: int
    count: int

    @property
    def indices(self) -> list[int]:
        return [self.start + i * self.stride for i in range(self.count)]


def choose_window(available: int, frames: int, strides: Sequence[int], generator: torch.Generator) -> FrameWindow:
    """A random start and stride (among those that fit) for `frames` frames of an `available`-frame clip."""
    fits = [s for s in strides if (frames - 1) * s + 1 <= available]
    if not fits:
        raise TooShortError(f"{available} frames; {frames} frames at stride {min(strides)} need "
                            f"{(frames - 1) * min(strides) + 1}")
    stride = fits[int(torch.randint(len(fits), (1,), generator=generator))]
    span = (frames - 1) * stride + 1
    start = int(torch.randint(available - span + 1, (1,), generator=generator))
    return FrameWindow(start, stride, frames)


@dataclass(frozen=True)
class Crop:
    resized: tuple[int, int]   # (H, W) after the aspect-preserving resize
    top: int
    left: int


def plan_crop(source: tuple[int, int], target: tuple[int, int], *, random: bool,
              generator: Optional[torch.Generator]) -> Crop:
    """Resize `source` (H, W) so it covers `target` (H, W) keeping its aspect, then crop `target`."""
    (sh, sw), (th, tw) = source, target
    scale = max(th / sh, tw / sw)
    rh, rw = max(th, round(sh * scale)), max(tw, round(sw * scale))
    if random:
        top = int(torch.randint(rh - th + 1, (1,), generator=generator))
        left = int(torch.randint(rw - tw + 1, (1,), generator=generator))
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    return Crop((rh, rw), top, left)


def resize_crop(frames: torch.Tensor, crop: Crop, target: tuple[int, int]) -> torch.Tensor:
    """frames `(T, 3, H, W)` uint8 or float -> `(3, T, th, tw)` float in [-1, 1]."""
    x = frames.float()
    if frames.dtype == torch.uint8:
        x = x / 127.5 - 1
    if tuple(x.shape[-2:]) != crop.resized:
        x = F.interpolate(x, size=crop.resized, mode="bilinear", antialias=True, align_corners=False)
    th, tw = target
    x = x[:, :, crop.top : crop.top + th, crop.left : crop.left + tw]
    return x.clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
