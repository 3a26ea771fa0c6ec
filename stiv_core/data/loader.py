"""The data order: a pure function of (seed, step, rank, world), so a resumed run reads exactly what it
would have and DDP ranks agree on every step's bucket. No iterator state needs saving.

Aspect groups. The buckets (frames, H, W) are grouped by aspect ratio W / H. When they hold more than
one aspect and the dataset knows its entries' sizes (`entry_sizes()`: video and image folders), each
entry joins the group whose aspect is nearest its own in log aspect ratio, so a portrait clip is never
cut into a landscape bucket; an entry whose size cannot be read is left out (and counted as skipped),
a group that gets no entry is dropped. Otherwise (one aspect, or a dataset of one fixed shape) there is
one group of every entry and every bucket.

Per step s:
- the group g(s) is drawn from the seed with probability proportional to its entry count (the draws
  come in blocks of CHOICE_BLOCK steps from one generator seeded by (seed, block));
- the group's turn k = how many steps before s chose g: replayed from step 0 by counting the blocks'
  draws (s / CHOICE_BLOCK draws), so it needs no saved state;
- the bucket is drawn among the group's buckets from a generator seeded by (seed, s);
- group position p = (k * world + rank) * batch + i is mapped to the group's epoch p // n and to the
  p % n-th entry of that epoch's permutation of the group's n entries (seeded by seed, group, epoch);
  each sample's own randomness (crop, start, stride) comes from a seed of (seed, group, epoch, p), so
  worker processes reproduce it.
So every step's batch is of one bucket, ranks read disjoint entries of it, and every entry is read once
per epoch of its group. With a single group nothing is drawn for g, k = s, and the seeds leave the
group out: the order is exactly the one from before aspect groups.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig, DataKind
from .sample import SampleKey, collate

log = logging.getLogger(__name__)
Bucket = tuple[int, int, int]  # (frames, height, width) in pixels
CHOICE_BLOCK = 1024            # steps whose group choices are drawn together


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class BucketGroup:
    """Buckets of one aspect ratio and the dataset entries (indices) read into them."""

    buckets: tuple[Bucket, ...]
    entries: Sequence[int]


def buckets_by_aspect(buckets: Sequence[Bucket]) -> list[tuple[Bucket, ...]]:
    """The buckets grouped by exact aspect W / H, groups in order of first appearance."""
    groups: dict[Fraction, list[Bucket]] = {}
    for bucket in buckets:
        groups.setdefault(Fraction(bucket[2], bucket[1]), []).append(tuple(bucket))
    return [tuple(group) for group in groups.values()]


def group_by_aspect(sizes: Sequence[Optional[tuple[int, int]]],
                    buckets: Sequence[Bucket]) -> tuple[list[BucketGroup], list[int]]:
    """Each entry of `sizes` ((H, W), or None when unknown) joins the bucket group nearest its aspect in
    log W / H (the first on a tie). Returns the groups that got entries, and the entries left out."""
    by_aspect = buckets_by_aspect(buckets)
    logs = np.array([math.log(group[0][2] / group[0][1]) for group in by_aspect])
    members: list[list[int]] = [[] for _ in by_aspect]
    unsized = []
    for index, size in enumerate(sizes):
        if size is None:
            unsized.append(index)
            continue
        members[int(np.argmin(np.abs(logs - math.log(size[1] / size[0]))))].append(index)
    return [BucketGroup(b, tuple(m)) for b, m in zip(by_aspect, members) if m], unsized


def plan_groups(dataset: Dataset, buckets: Sequence[Bucket]) -> list[BucketGroup]:
    """The sampler's groups for `dataset` (see the module doc); reads entry sizes only when the buckets
    hold more than one aspect, and tells the dataset the groups (a bad file falls through in its own)."""
    single = [BucketGroup(tuple(buckets), range(len(dataset)))]
    if len(buckets_by_aspect(buckets)) == 1 or not hasattr(dataset, "entry_sizes"):
        return single
    groups, unsized = group_by_aspect(dataset.entry_sizes(), buckets)
    if not groups:
        raise RuntimeError(f"the size of none of the {len(dataset)} files could be read (aspect buckets need it)")
    log.info("aspect groups (W x H: files): %s; %d files of unreadable size",
             ", ".join(f"{g.buckets[0][2]}x{g.buckets[0][1]}: {len(g.entries)}" for g in groups), len(unsized))
    dataset.set_groups([group.entries for group in groups])
    return groups


class PositionSampler(Sampler):
    """Yields one list of SampleKeys per step, from `start_step` on, forever (order: module doc)."""

    def __init__(self, groups: Sequence[BucketGroup], batch_size: int, *, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1):
        if not groups or any(len(g.entries) == 0 or len(g.buckets) == 0 for g in groups):
            raise ValueError("PositionSampler needs groups that each have entries and buckets")
        self.groups, self.batch = tuple(groups), batch_size
        self.seed, self.start_step, self.rank, self.world = seed, start_step, rank, world
        self.weights = torch.tensor([float(len(g.entries)) for g in groups], dtype=torch.float64)
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}
        self._choices: tuple[int, torch.Tensor] = (-1, torch.empty(0))
        self._before = (0, torch.zeros(len(groups), dtype=torch.long))  # (block, turns of each group before it)

    @classmethod
    def uniform(cls, num_entries: int, batch_size: int, buckets: Sequence[Bucket], **kwargs) -> "PositionSampler":
        """One group: every entry, every bucket (the order for datasets of unknown or fixed sizes)."""
        return cls([BucketGroup(tuple(buckets), range(num_entries))], batch_size, **kwargs)

    def _salt(self, group: int) -> tuple[int, ...]:
        return () if len(self.groups) == 1 else (group,)

    def permutation(self, group: int, epoch: int) -> torch.Tensor:
        cached = self._perms.get(group)
        if cached is None or cached[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1, *self._salt(group)))
            cached = self._perms[group] = (epoch, torch.randperm(len(self.groups[group].entries), generator=gen))
        return cached[1]

    def block_choices(self, block: int) -> torch.Tensor:
        """The groups chosen by steps [block * CHOICE_BLOCK, (block + 1) * CHOICE_BLOCK)."""
        if self._choices[0] != block:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, block, 4))
            self._choices = (block, torch.multinomial(self.weights, CHOICE_BLOCK, replacement=True, generator=gen))
        return self._choices[1]

    def turn(self, step: int) -> tuple[int, int]:
        """(the group of `step`, how many earlier steps chose that group)."""
        if len(self.groups) == 1:
            return 0, step
        block, offset = divmod(step, CHOICE_BLOCK)
        if self._before[0] > block:  # asked about the past: replay from step 0
            self._before = (0, torch.zeros(len(self.groups), dtype=torch.long))
        done, before = self._before
        for b in range(done, block):
            before = before + torch.bincount(self.block_choices(b), minlength=len(self.groups))
        self._before = (block, before)
        choices = self.block_choices(block)
        group = int(choices[offset])
        return group, int(before[group]) + int((choices[:offset] == group).sum())

    def keys(self, step: int) -> list[SampleKey]:
        g, turn = self.turn(step)
        group = self.groups[g]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, step, 2))
        bucket = group.buckets[int(torch.randint(len(group.buckets), (1,), generator=gen))]
        n, first = len(group.entries), (turn * self.world + self.rank) * self.batch
        keys = []
        for position in range(first, first + self.batch):
            epoch = position // n
            index = group.entries[int(self.permutation(g, epoch)[position % n])]
            keys.append(SampleKey(index, bucket, mix_seed(self.seed, *self._salt(g), epoch, position, 3)))
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
    if config.kind == DataKind.OBJECTS:
        from .objects import ObjectsDataset
        return ObjectsDataset(config.num_samples, split="train")
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
    sampler = PositionSampler(plan_groups(dataset, buckets), batch_size, seed=seed, start_step=start_step,
                              rank=rank, world=world)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=getattr(dataset, "collate", collate),
                      num_workers=config.num_workers, persistent_workers=config.num_workers > 0)
