"""The procedural 3D object domain of multi-view generation (the paper's last application of frame replacement).

A solid (cube, sphere, cone, cylinder) in two named colours, split by the plane x = 0 of the object (its
+x half in the first colour), on a plain background, seen from an orbiting camera. A clip is the camera
layout of Zero123++: frame 0 the input view (azimuth `a`, elevation `INPUT_ELEVATION`), frames 1-6 the
six novel views at azimuth a + 30 + 60k, elevations alternating 20 and -10 degrees, and frame 7, so the
count fits temporal patch 2, the back view (a + 180, the input's elevation). Which colour faces the
camera changes with the view, so views are not trivially equal. Multi-view generation is then the TI2V
plan (frame 0 given) on these clips, with no camera micro-condition (as in the paper): the layout is fixed.

Rendering is exact ray casting (analytic ray-solid intersections) with Lambert shading from a light fixed
to the camera, 2x2 supersampled; deterministic, on the CPU, no graphics context.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from ..conditioning import MicroConditions
from .procedural import ProceduralDataset
from .sample import SampleKey, VideoSample
from .shapes import BACKGROUNDS, COLORS

SOLIDS = ("cube", "sphere", "cone", "cylinder")
OBJECT_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
OBJECT_BACKGROUNDS = ("white", "black", "gray")
INPUT_ELEVATION = 10.0
# (azimuth relative to the input, elevation) in degrees, frame by frame.
VIEWS = ((0.0, INPUT_ELEVATION), *((30.0 + 60.0 * k, 20.0 if k % 2 == 0 else -10.0) for k in range(6)),
         (180.0, INPUT_ELEVATION))
NUM_VIEWS = len(VIEWS)
CAMERA_DISTANCE = 4.5
FIELD_OF_VIEW = 40.0            # degrees, vertical
SIZE = 0.8                      # the solids' half-extent (object units)
AMBIENT, DIFFUSE = 0.45, 0.55
HELD_OUT_EVERY = 7              # about 1 in 7 (solid, colours, background) combinations is never trained on
VOCABULARY = tuple(sorted({"a", "and", "on", "background", *OBJECT_COLORS, *OBJECT_BACKGROUNDS, *SOLIDS}))


@dataclass(frozen=True)
class ObjectParams:
    solid: str
    colors: tuple[str, str]     # the object's +x half, its -x half
    background: str
    azimuth: float = 0.0        # of the input view, degrees

    def __post_init__(self) -> None:
        if self.solid not in SOLIDS:
            raise ValueError(f"{self.solid!r} is not one of {list(SOLIDS)}")
        for color in self.colors:
            if color not in OBJECT_COLORS:
                raise ValueError(f"{color!r} is not one of {list(OBJECT_COLORS)}")
        if len(self.colors) != 2 or self.colors[0] == self.colors[1]:
            raise ValueError(f"an object has two different colours, got {self.colors}")
        if self.background not in OBJECT_BACKGROUNDS:
            raise ValueError(f"{self.background!r} is not one of {list(OBJECT_BACKGROUNDS)}")

    @property
    def combination(self) -> tuple[str, str, str, str]:
        return self.solid, *self.colors, self.background

    @property
    def caption(self) -> str:
        return f"a {self.colors[0]} and {self.colors[1]} {self.solid} on a {self.background} background"


def parse_caption(caption: str) -> ObjectParams:
    """The object a caption of this domain names ("a red and blue cube on a gray background"; azimuth 0)."""
    words = caption.lower().split()
    if len(words) != 9 or [words[i] for i in (0, 2, 5, 6, 8)] != ["a", "and", "on", "a", "background"]:
        raise ValueError(f"caption {caption!r} is not of the form 'a COLOUR and COLOUR SOLID on a BACKGROUND "
                         f"background'")
    return ObjectParams(words[4], (words[1], words[3]), words[7])


def all_combinations() -> list[tuple[str, str, str, str]]:
    """Every (solid, colour of +x, colour of -x, background)."""
    return [(s, a, b, g) for s in SOLIDS for a in OBJECT_COLORS for b in OBJECT_COLORS if a != b
            for g in OBJECT_BACKGROUNDS]


def held_out(combination: tuple[str, str, str, str]) -> bool:
    """Deterministic: about 1 in HELD_OUT_EVERY combinations is reserved for evaluation."""
    return zlib.crc32(" ".join(combination).encode()) % HELD_OUT_EVERY == 0


def camera_rays(azimuth: float, elevation: float, height: int, width: int, *, supersample: int = 2
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ray origin `(3,)`, unit directions `(H*s, W*s, 3)` and the camera-to-light direction `(3,)` of a camera
    orbiting the origin at CAMERA_DISTANCE, looking at it, y up (degrees)."""
    az, el = math.radians(azimuth), math.radians(elevation)
    eye = CAMERA_DISTANCE * torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)],
                                         dtype=torch.float64)
    forward = -eye / eye.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    h, w = height * supersample, width * supersample
    half = math.tan(math.radians(FIELD_OF_VIEW) / 2)
    ys = (1 - 2 * (torch.arange(h, dtype=torch.float64) + 0.5) / h) * half
    xs = (2 * (torch.arange(w, dtype=torch.float64) + 0.5) / w - 1) * half * width / height
    dirs = forward + xs[None, :, None] * right + ys[:, None, None] * up
    light = -forward + 0.6 * up - 0.4 * right  # a light over the camera's left shoulder
    return eye, dirs / dirs.norm(dim=-1, keepdim=True), light / light.norm()


def intersect(solid: str, origin: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit distance `(...)` (inf where the ray misses) and the unit outward normal `(..., 3)` there."""
    o = origin.expand_as(dirs)
    if solid == "sphere":
        return _sphere(o, dirs)
    if solid == "cube":
        return _cube(o, dirs)
    if solid == "cylinder":
        return _nearest(_tube(o, dirs, cone=False), _cap(o, dirs, SIZE), _cap(o, dirs, -SIZE))
    if solid == "cone":
        return _nearest(_tube(o, dirs, cone=True), _cap(o, dirs, -SIZE))
    raise ValueError(f"unknown solid {solid!r}; choose one of {list(SOLIDS)}")


def _sphere(o, d):
    b = (o * d).sum(-1)
    disc = b.square() - (o.square().sum(-1) - SIZE ** 2)
    t = -b - disc.clamp_min(0).sqrt()
    t = torch.where((disc >= 0) & (t > 0), t, torch.inf)
    p = o + t[..., None].nan_to_num(posinf=0.0) * d
    return t, p / SIZE


def _cube(o, d):
    safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t1, t2 = (-SIZE - o) / safe, (SIZE - o) / safe
    near, far = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = near.max(-1)
    t_far = far.min(-1).values
    hit = (t_near <= t_far) & (t_near > 0)
    normal = torch.zeros_like(d).scatter(-1, axis[..., None], 1.0) * -torch.sign(safe)
    return torch.where(hit, t_near, torch.inf), normal


def _tube(o, d, *, cone: bool):
    """The side of a cylinder (radius SIZE, |y| <= SIZE) or of a cone (apex at y = SIZE, base radius SIZE)."""
    if cone:  # x^2 + z^2 = (k (SIZE - y))^2, k = radius / height = 1/2
        k2 = 0.25
        yo, yd = SIZE - o[..., 1], -d[..., 1]
        a = d[..., 0] ** 2 + d[..., 2] ** 2 - k2 * yd ** 2
        b = 2 * (o[..., 0] * d[..., 0] + o[..., 2] * d[..., 2] - k2 * yo * yd)
        c = o[..., 0] ** 2 + o[..., 2] ** 2 - k2 * yo ** 2
    else:
        a = d[..., 0] ** 2 + d[..., 2] ** 2
        b = 2 * (o[..., 0] * d[..., 0] + o[..., 2] * d[..., 2])
        c = o[..., 0] ** 2 + o[..., 2] ** 2 - SIZE ** 2
    disc = b.square() - 4 * a * c
    root = disc.clamp_min(0).sqrt()
    a_safe = torch.where(a.abs() < 1e-12, torch.full_like(a, 1e-12), a)
    best = torch.full_like(a, torch.inf)
    for t in sorted_roots((-b - root) / (2 * a_safe), (-b + root) / (2 * a_safe)):
        y = o[..., 1] + t * d[..., 1]
        ok = (disc >= 0) & (t > 0) & (y >= -SIZE) & (y <= SIZE) & torch.isinf(best)
        best = torch.where(ok, t, best)
    p = o + best[..., None].nan_to_num(posinf=0.0) * d
    ny = 0.5 * torch.sqrt(p[..., 0] ** 2 + p[..., 2] ** 2) if cone else torch.zeros_like(p[..., 1])
    normal = torch.stack([p[..., 0], ny, p[..., 2]], -1)
    return best, normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def sorted_roots(r1: torch.Tensor, r2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.minimum(r1, r2), torch.maximum(r1, r2)


def _cap(o, d, y0: float):
    """The disc of radius SIZE at height y0 (normal away from the solid's centre)."""
    dy = torch.where(d[..., 1].abs() < 1e-12, torch.full_like(d[..., 1], 1e-12), d[..., 1])
    t = (y0 - o[..., 1]) / dy
    p = o + t[..., None] * d
    inside = (t > 0) & (p[..., 0] ** 2 + p[..., 2] ** 2 <= SIZE ** 2)
    normal = torch.zeros_like(d)
    normal[..., 1] = math.copysign(1.0, y0)
    return torch.where(inside, t, torch.inf), normal


def _nearest(*hits):
    t = torch.stack([h[0] for h in hits], -1)
    best, which = t.min(-1)
    normals = torch.stack([h[1] for h in hits], -2)
    return best, normals.gather(-2, which[..., None, None].expand(*which.shape, 1, 3))[..., 0, :]


def render_view(params: ObjectParams, azimuth: float, elevation: float, height: int, width: int) -> torch.Tensor:
    """One view `(3, H, W)` in [-1, 1]: `azimuth` absolute (the object's +x half faces azimuth 90)."""
    eye, dirs, light = camera_rays(azimuth, elevation, height, width)
    t, normal = intersect(params.solid, eye, dirs)
    hit = torch.isfinite(t)
    p = eye + t.nan_to_num(posinf=0.0)[..., None] * dirs
    first, second = (torch.tensor(COLORS[c], dtype=torch.float64) for c in params.colors)
    albedo = torch.where((p[..., 0] >= 0)[..., None], first, second)
    shade = AMBIENT + DIFFUSE * (normal * light).sum(-1).clamp_min(0)
    color = torch.where(hit[..., None], albedo * shade[..., None],
                        torch.tensor(BACKGROUNDS[params.background], dtype=torch.float64))
    s = dirs.shape[0] // height
    image = color.view(height, s, width, s, 3).mean(dim=(1, 3))  # 2x2 supersampling
    return (image.permute(2, 0, 1) * 2 - 1).float()


def render(params: ObjectParams, height: int, width: int) -> torch.Tensor:
    """The clip `(3, NUM_VIEWS, H, W)` in [-1, 1]: the input view, then the novel views of `VIEWS`."""
    return torch.stack([render_view(params, params.azimuth + da, el, height, width) for da, el in VIEWS], dim=1)


def random_params(generator: torch.Generator, combination: tuple[str, str, str, str]) -> ObjectParams:
    solid, first, second, background = combination
    azimuth = float(torch.rand(1, generator=generator)) * 360.0
    return ObjectParams(solid, (first, second), background, azimuth)


class ObjectsDataset(ProceduralDataset):
    """Multi-view clips of the domain, made on the fly; `split` 'train' or 'heldout' picks the combinations.

    Indexed by `SampleKey` (`key.index` picks the combination and azimuth, `key.bucket` the size); the
    bucket's frame count must be NUM_VIEWS.
    """

    def __init__(self, num_samples: int, *, split: str = "train", seed: int = 0):
        super().__init__(num_samples, all_combinations(), held_out, random_params, split=split, seed=seed)

    def __getitem__(self, key: SampleKey) -> VideoSample:
        frames, height, width = key.bucket
        if frames != NUM_VIEWS:
            raise ValueError(f"a multi-view clip has {NUM_VIEWS} frames (the input view and {NUM_VIEWS - 1} "
                             f"novel views), the bucket asks for {frames}")
        params = self.params(key.index)
        return VideoSample(render(params, height, width), params.caption, MicroConditions(height, width, frames))
