"""The data section of the trainer's configuration (`[data]` in its TOML file), the dataset kinds, and
the validation error every config section raises. The trainer's whole config (`training/config.py`)
composes `DataConfig`; the data layer reads only this.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names the field."""


class DataKind(str, enum.Enum):
    SHAPES = "shapes"              # the procedural domain of the built-in model (data/shapes.py)
    SQUARES = "squares"            # synthetic moving squares (a tiny, fast stand-in for tests)
    VIDEO_FOLDER = "video_folder"  # clip.mp4 + clip.txt, or metadata.jsonl / metadata.csv
    IMAGE_FOLDER = "image_folder"  # image + .txt caption: 1-frame samples for the T2I stage
    CACHE = "cache"                # pre-encoded latent/text shards (python -m stiv_core.training.cache)
    OBJECTS = "objects"            # the multi-view 3D object domain (data/objects.py): 8-view clips


@dataclass(frozen=True)
class DataConfig:
    kind: DataKind = DataKind.SQUARES
    path: str = ""                      # folder (video/image), or the cache folder
    buckets: tuple[tuple[int, int, int], ...] = ((8, 32, 32),)  # (frames, height, width) in pixels
    frame_strides: tuple[int, ...] = (1,)   # sampled per clip, recorded as the stride micro-condition
    random_crop: bool = True            # False = centre crop
    num_samples: int = 64               # shapes / squares: clips in the procedural set
    num_workers: int = 0
    cache_dir: str = ""                 # used instead of decoding when it holds shards

    def __post_init__(self) -> None:
        coerce_enum(self, "kind", DataKind)
        buckets = tuple(tuple(int(v) for v in b) for b in self.buckets)
        need(len(buckets) > 0 and all(len(b) == 3 and min(b) > 0 for b in buckets), "data.buckets",
             "must be a non-empty list of [frames, height, width] positive ints", self.buckets)
        object.__setattr__(self, "buckets", buckets)
        strides = tuple(int(s) for s in self.frame_strides)
        need(len(strides) > 0 and min(strides) >= 1, "data.frame_strides", "must be ints >= 1", strides)
        object.__setattr__(self, "frame_strides", strides)
        need(self.num_samples >= 1, "data.num_samples", "must be >= 1", self.num_samples)
        need(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        if self.kind in (DataKind.VIDEO_FOLDER, DataKind.IMAGE_FOLDER, DataKind.CACHE):
            need(bool(self.path), "data.path", f"is required for data.kind={self.kind.value!r}", self.path)


def need(ok: bool, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} {message}, got {value!r}")


def coerce_enum(obj: Any, key: str, kind: type[enum.Enum]) -> None:
    value = getattr(obj, key)
    try:
        object.__setattr__(obj, key, kind(value))
    except ValueError as err:
        raise ConfigError(f"{key} must be one of {[m.value for m in kind]}, got {value!r}") from err
