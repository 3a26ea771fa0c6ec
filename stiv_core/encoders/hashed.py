"""A deterministic stand-in text encoder for tests and quick runs (the built-in one is `words.py` beside it).

`HashedTextEncoder` maps each lower-cased word to a fixed pseudo-random vector (seeded by a stable
hash of the word), so the same caption always gives the same embedding in any process, with no
weights to ship. It carries no word positions: use the word encoder where word order matters.
"""
from __future__ import annotations

import hashlib
import re
from typing import Optional

import torch

from ..interfaces import TextEmbedding, masked_mean

WORD = re.compile(r"[a-z0-9]+")


class HashedTextEncoder:
    """Follows the TextEncoder protocol; tokens `(B, max_tokens, dim)` (max_tokens None: as many as the
    longest prompt has words), pooled = the mean of the real tokens' first `pooled_dim` (default: all)
    features. `seed` picks another set of word vectors (0: the trainer's stand-in's)."""

    def __init__(self, dim: int, pooled_dim: Optional[int] = None, max_tokens: Optional[int] = 16, *,
                 seed: int = 0):
        pooled_dim = dim if pooled_dim is None else pooled_dim
        if pooled_dim > dim:
            raise ValueError(f"pooled_dim {pooled_dim} cannot exceed the token width {dim}")
        self.dim, self.pooled_dim, self.max_tokens, self.seed = dim, pooled_dim, max_tokens, seed
        self._cache: dict[str, torch.Tensor] = {}

    def word_vector(self, word: str) -> torch.Tensor:
        if word not in self._cache:
            key = word if self.seed == 0 else f"{self.seed}\0{word}"
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
            gen = torch.Generator().manual_seed(seed)
            self._cache[word] = torch.randn(self.dim, generator=gen)
        return self._cache[word]

    def encode(self, prompts: list[str]) -> TextEmbedding:
        split = [WORD.findall(prompt.lower())[: self.max_tokens] for prompt in prompts]
        length = self.max_tokens if self.max_tokens is not None else max([1, *map(len, split)])
        tokens = torch.zeros(len(prompts), length, self.dim)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, words in enumerate(split):
            for i, word in enumerate(words):
                tokens[row, i] = self.word_vector(word)
            mask[row, : len(words)] = True
        return TextEmbedding(tokens, mask, masked_mean(tokens, mask)[:, : self.pooled_dim])
