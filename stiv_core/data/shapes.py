"""The procedural video domain of the built-in model: one shape moving on a plain background.

A clip is fully determined by its `ShapeParams`; the caption names everything a viewer can check:
"a red circle moving left on a blue background". The world wraps around (a torus), so an object
keeps moving in its direction for any number of frames (long videos) and never leaves the picture.
Some combinations of colour, shape, direction and background are held out of training (`held_out`),
so the evaluator can test generalisation to unseen prompts.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from ..conditioning import MicroConditions
from .procedural import ProceduralDataset
from .sample import SampleKey, VideoSample

# RGB in [0, 1]. Colours are far apart, so colour segmentation can name them.
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
          "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.75), "orange": (1.0, 0.55, 0.0),
          "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "blue": (0.1, 0.15, 0.55),
               "gray": (0.5, 0.5, 0.5)}
SHAPES = ("circle", "square", "triangle")
# (dx, dy) in image coordinates (y grows downward).
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = (0.025, 0.035, 0.045)  # fraction of the frame width per original frame
RADIUS_RANGE = (0.16, 0.24)     # circumradius, fraction of the frame size
HELD_OUT_EVERY = 8              # about 1 in 8 combinations is never trained on
# Every word a caption of the domain uses: the built-in text encoder's vocabulary.
VOCABULARY = tuple(sorted({"a", "moving", "on", "background", *COLORS, *BACKGROUNDS, *SHAPES, *DIRECTIONS}))


@dataclass(frozen=True)
class ShapeParams:
    shape: str
    color: str
    background: str
    direction: str
    speed: float = SPEEDS[1]
    radius: float = 0.2
    start: tuple[float, float] = (0.5, 0.5)   # centre (x, y), fractions of the frame

    def __post_init__(self) -> None:
        for value, allowed in ((self.shape, SHAPES), (self.color, COLORS), (self.background, BACKGROUNDS),
                               (self.direction, DIRECTIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {sorted(allowed)}")
        if self.color == self.background:
            raise ValueError(f"a {self.color} object on a {self.background} background would be invisible")

    @property
    def caption(self) -> str:
        return caption_for(*self.combination)

    @property
    def combination(self) -> tuple[str, str, str, str]:
        return self.color, self.shape, self.direction, self.background


def caption_for(color, shape, direction, background) -> str:
    """The domain's caption of a (colour, shape, direction, background) combination."""
    return f"a {color} {shape} moving {direction} on a {background} background"


def all_combinations() -> list[tuple[str, str, str, str]]:
    """Every valid (colour, shape, direction, background)."""
    return [(c, s, d, b) for c in COLORS for s in SHAPES for d in DIRECTIONS for b in BACKGROUNDS if c != b]


def held_out(combination: tuple[str, str, str, str]) -> bool:
    """Deterministic: about 1 in HELD_OUT_EVERY combinations is reserved for evaluation."""
    return zlib.crc32(" ".join(combination).encode()) % HELD_OUT_EVERY == 0


def parse_caption(caption: str) -> ShapeParams:
    """The params a caption of this domain names (speed, size and start at their defaults)."""
    words = caption.lower().replace(",", " ").split()
    found = {}
    for key, vocab, anchor in (("color", COLORS, None), ("shape", SHAPES, None),
                               ("direction", DIRECTIONS, "moving"), ("background", BACKGROUNDS, "on")):
        candidates = [w for i, w in enumerate(words) if w in vocab and (anchor is None or anchor in words[:i])]
        if not candidates:
            raise ValueError(f"caption {caption!r} names no {key} (one of {sorted(vocab)})")
        found[key] = candidates[-1] if key in ("direction", "background") else candidates[0]
    return ShapeParams(**found)


def random_params(generator: torch.Generator, combination: tuple[str, str, str, str]) -> ShapeParams:
    """Speed, size and start position drawn from `generator` for a given combination."""
    u = torch.rand(4, generator=generator).tolist()
    color, shape, direction, background = combination
    return ShapeParams(shape, color, background, direction, speed=SPEEDS[int(u[0] * len(SPEEDS))],
                       radius=RADIUS_RANGE[0] + u[1] * (RADIUS_RANGE[1] - RADIUS_RANGE[0]), start=(u[2], u[3]))


def shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """Inside-mask for offsets (dx, dy) from the centre, all in pixels; `radius` is the circumradius."""
    if shape == "circle":
        return dx.square() + dy.square() <= radius ** 2
    if shape == "square":
        half = 0.8 * radius
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "triangle":  # apex up; each edge is at the inradius r/2 along its outward normal
        inside = dy <= radius / 2
        for nx, ny in ((-math.sqrt(3) / 2, -0.5), (math.sqrt(3) / 2, -0.5)):
            inside = inside & (dx * nx + dy * ny <= radius / 2)
        return inside
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def centres(params: ShapeParams, frame_indices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Object centres `(T, 2)` (x, y) in pixels at the given original-frame indices (wrapped)."""
    dx, dy = DIRECTIONS[params.direction]
    step = params.speed * width
    x = params.start[0] * width + dx * step * frame_indices
    y = params.start[1] * height + dy * step * frame_indices
    return torch.stack([x % width, y % height], dim=-1)


def render(params: ShapeParams, num_frames: int, height: int, width: int, *, stride: int = 1,
           first_frame: int = 0) -> torch.Tensor:
    """Pixels `(3, T, H, W)` in [-1, 1]: original frames first_frame, first_frame + stride, ..."""
    frames = first_frame + stride * torch.arange(num_frames, dtype=torch.float32)
    c = centres(params, frames, height, width)                                # (T, 2)
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
    dx = torch.remainder(xs - c[:, 0, None, None] + width / 2, width) - width / 2   # torus offsets
    dy = torch.remainder(ys - c[:, 1, None, None] + height / 2, height) - height / 2
    inside = shape_mask(params.shape, dx, dy, params.radius * min(height, width))  # (T, H, W)
    fg = torch.tensor(COLORS[params.color])[:, None, None, None]
    bg = torch.tensor(BACKGROUNDS[params.background])[:, None, None, None]
    return torch.where(inside[None], fg, bg) * 2 - 1


class ShapesDataset(ProceduralDataset):
    """Clips of the domain, made on the fly; `split` 'train' or 'heldout' picks the combinations.

    Indexed by `SampleKey`: `key.index` picks the combination and params, `key.bucket` the size,
    `key.seed` the frame stride (from `frame_strides`) and start frame.
    """

    def __init__(self, num_samples: int, *, split: str = "train", seed: int = 0,
                 frame_strides: tuple[int, ...] = (1,)):
        super().__init__(num_samples, all_combinations(), held_out, random_params, split=split, seed=seed)
        self.frame_strides = tuple(frame_strides)

    def __getitem__(self, key: SampleKey) -> VideoSample:
        frames, height, width = key.bucket
        g = torch.Generator().manual_seed(key.seed)
        stride = self.frame_strides[int(torch.randint(len(self.frame_strides), (1,), generator=g))]
        start = int(torch.randint(64, (1,), generator=g))
        params = self.params(key.index)
        pixels = render(params, frames, height, width, stride=stride, first_frame=start)
        return VideoSample(pixels, params.caption, MicroConditions(height, width, frames, frame_stride=stride))

