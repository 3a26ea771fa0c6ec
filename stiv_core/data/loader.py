"""The data order: a pure function of (seed, step), so a resumed run reads exactly what it would have.

Global sample position p = (step * world + rank) * batch + i is mapped to epoch p // N and to the
p % N-th entry of that epoch's permutation (seeded by seed and epoch). Each step draws its bucket
(frames, H, W) from the same seed, and each sample's own randomness (crop, start, stride) from a seed
of (seed, epoch, position), so worker processes reproduce it. No iterator state needs saving.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..training.config import DataConfig, DataKind
from .sample import SampleKey, collate


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class PositionSampler(Sampler):
    """Yields one list of SampleKeys per step, from `start_step` on, forever."""

    def __init__(self, num_entries: int, batch_size: int, buckets: tuple[tuple[int, int, int], ...], *,
                 seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch, self.buckets = num_entries, batch_size, buckets
        self.seed, self.start_step, self.rank, self.world = seed, start_step, rank, world
        self._perm: tuple[int, torch.Tensor] = (-1, torch.empty(0))

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return self._perm[1]

    def keys(self, step: int) -> list[SampleKey]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, step, 2))
        bucket = self.buckets[int(torch.randint(len(self.buckets), (1,), generator=gen))]
        first = (step * self.world + self.rank) * self.batch
        keys = []
        for position in range(first, first + self.batch):
            epoch = position // self.n
            index = int(self.permutation(epoch)[position % self.n])
            keys.append(SampleKey(index, bucket, mix_seed(self.seed, epoch, position, 3)))
        return keys

    def __iter__(self) -> Iterator[list[SampleKey]]:
        step = self.start_step
        while True:
            yield self.keys(step)
            step += 1

    def __len__(self) -> int:  # an endless stream; DataLoader only needs a number
        return 2**62


def build_dataset(config: DataConfig) -> Dataset:
    from .cache import CachedDataset, has_shards
    if config.cache_dir and has_shards(config.cache_dir):  # pre-encoded: no decoding, no encoders
        return CachedDataset(config.cache_dir)
    if config.kind == DataKind.SHAPES:
        from .shapes import ShapesDataset
        return ShapesDataset(config.num_samples, split="train", frame_strides=config.frame_strides)
    if config.kind == DataKind.SQUARES:
        from .squares import MovingSquares
        return MovingSquares(config.num_samples, frame_strides=config.frame_strides)
    if config.kind == DataKind.VIDEO_FOLDER:
        from .folders import VideoFolder
        return VideoFolder(config.path, frame_strides=config.frame_strides, random_crop=config.random_crop)
    if config.kind == DataKind.IMAGE_FOLDER:
        from .folders import ImageFolder
        return ImageFolder(config.path, random_crop=config.random_crop)
    if config.kind == DataKind.CACHE:
        return CachedDataset(config.path)
    raise ValueError(f"unknown data kind {config.kind!r}")


def build_loader(dataset: Dataset, config: DataConfig, *, batch_size: int, seed: int, start_step: int,
                 rank: int = 0, world: int = 1) -> DataLoader:
    buckets = getattr(dataset, "buckets", None) or config.buckets  # a cache fixes its own shape
    sampler = PositionSampler(len(dataset), batch_size, buckets, seed=seed, start_step=start_step,
                              rank=rank, world=world)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=getattr(dataset, "collate", collate),
                      num_workers=config.num_workers, persistent_workers=config.num_workers > 0)
