"""A deterministic stand-in text encoder for tests and quick runs (the built-in one is `words.py` beside it).

`HashedTextEncoder` maps each lower-cased word to a fixed pseudo-random vector (seeded by a stable
hash of the word), so the same caption always gives the same embedding in any process, with no
weights to ship. It carries no word positions: use the word encoder where word order matters.
"""
from __future__ import annotations

import hashlib
import re

import torch

from ..interfaces import TextEmbedding

WORD = re.compile(r"[a-z0-9]+")


class HashedTextEncoder:
    """Follows the TextEncoder protocol; tokens `(B, max_tokens, dim)`, pooled = mean of real tokens."""

    def __init__(self, dim: int, pooled_dim: int, max_tokens: int = 16):
        if pooled_dim > dim:
            raise ValueError(f"pooled_dim {pooled_dim} cannot exceed the token width {dim}")
        self.dim, self.pooled_dim, self.max_tokens = dim, pooled_dim, max_tokens
        self._cache: dict[str, torch.Tensor] = {}

    def word_vector(self, word: str) -> torch.Tensor:
        if word not in self._cache:
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little") & (2**63 - 1)
            gen = torch.Generator().manual_seed(seed)
            self._cache[word] = torch.randn(self.dim, generator=gen)
        return self._cache[word]

    def encode(self, prompts: list[str]) -> TextEmbedding:
        tokens = torch.zeros(len(prompts), self.max_tokens, self.dim)
        mask = torch.zeros(len(prompts), self.max_tokens, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            words = WORD.findall(prompt.lower())[: self.max_tokens]
            for i, word in enumerate(words):
                tokens[row, i] = self.word_vector(word)
            mask[row, : len(words)] = True
        count = mask.sum(1, keepdim=True).clamp_min(1)
        pooled = (tokens.sum(1) / count)[:, : self.pooled_dim]
        return TextEmbedding(tokens, mask, pooled)
