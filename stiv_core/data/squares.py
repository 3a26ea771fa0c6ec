"""A synthetic stand-in for the procedural domain: coloured squares moving on a dark background.

Each index is one clip, fully determined by the index (colour, size, start, direction, speed), with
a caption that names the colour and the direction, so text conditioning matters. It yields the same
`VideoSample` as the real datasets; a later issue replaces it with the procedural domain.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..conditioning import MicroConditions
from .sample import SampleKey, VideoSample
from .transforms import choose_window

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "yellow": (1.0, 1.0, -1.0), "white": (1.0, 1.0, 1.0)}
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
SOURCE_FRAMES = 32


class MovingSquares(Dataset):
    def __init__(self, num_samples: int, *, frame_strides: tuple[int, ...] = (1,), background: float = -0.8):
        self.num_samples, self.frame_strides, self.background = num_samples, frame_strides, background

    def __len__(self) -> int:
        return self.num_samples

    def clip_params(self, index: int) -> tuple[str, str, float, float, float, float]:
        """(colour, direction, size, start_y, start_x, speed) as fractions of the frame."""
        gen = torch.Generator().manual_seed(1_000_003 * index + 17)
        colour = list(COLOURS)[index % len(COLOURS)]
        direction = list(DIRECTIONS)[(index // len(COLOURS)) % len(DIRECTIONS)]
        size, y, x, speed = (0.2 + 0.15 * torch.rand(4, generator=gen)).tolist()
        return colour, direction, size, 0.1 + y, 0.1 + x, 0.01 + speed / 20

    def __getitem__(self, key: SampleKey) -> VideoSample:
        frames, height, width = key.bucket
        gen = torch.Generator().manual_seed(key.seed)
        window = choose_window(SOURCE_FRAMES, frames, self.frame_strides, gen)
        colour, direction, size, y, x, speed = self.clip_params(key.index)
        dy, dx = DIRECTIONS[direction]
        pixels = torch.full((3, frames, height, width), self.background)
        side_h, side_w = max(1, round(size * height)), max(1, round(size * width))
        for out, source in enumerate(window.indices):
            # Positions wrap around the frame, so every clip moves for its whole length.
            top = round(((y + dy * speed * source) % 1.0) * height)
            left = round(((x + dx * speed * source) % 1.0) * width)
            rows = torch.arange(top, top + side_h) % height
            cols = torch.arange(left, left + side_w) % width
            for c, value in enumerate(COLOURS[colour]):
                pixels[c, out, rows[:, None], cols[None, :]] = value
        micro = MicroConditions(height, width, frames, frame_stride=window.stride)
        return VideoSample(pixels, f"a {colour} square moving {direction}", micro)
