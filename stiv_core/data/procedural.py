"""What the procedural domains (the shapes of the built-in video model, the objects of the multi-view one)
share as datasets: their combinations split into train and held-out, and parameters seeded per index."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

SPLITS = ("train", "heldout")


class ProceduralDataset(Dataset):
    """`num_samples` samples of a domain, made on the fly: `split` 'train' or 'heldout' keeps the
    combinations `held_out` says are not / are reserved for evaluation; `params(index)` is
    `random_params(generator, combination)` with a generator seeded by (`seed`, index)."""

    def __init__(self, num_samples: int, combinations: Sequence[tuple], held_out: Callable[[tuple], bool],
                 random_params: Callable[[torch.Generator, tuple], Any], *, split: str = "train", seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.combinations = [c for c in combinations if held_out(c) == (split == "heldout")]
        self.num_samples, self.seed, self._random_params = num_samples, seed, random_params

    def __len__(self) -> int:
        return self.num_samples

    def params(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self._random_params(g, self.combinations[index % len(self.combinations)])
