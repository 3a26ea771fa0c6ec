"""The built-in word-level text encoder: an embedding per word plus its position, and one transformer
layer that gives each word its context, so "blue" before "background" differs from "blue" before
"circle". The trainer keeps it frozen at a seeded initialisation (like the frozen T5 of the real
model; the STIV blocks learn to read it) and saves it in the exported bundle: weights under
`text_encoder.`, vocabulary in the metadata. A finetune from a bundle reads text with that bundle's
encoder.

Positions are drawn as large as the words (std 0.5 each): the built-in model up to 2026-11 was trained
with positions 25x smaller, so a word read the same wherever it stood (cos 0.998 between "blue" as the
object's colour and as the background's), and its only colour errors were the two colours swapped.

Words outside the vocabulary, and characters no word is made of (emoji, accented letters), are warned
about and ignored (never an error: users type freely).
"""
from __future__ import annotations

import json
import logging
import re
import unicodedata
from typing import Sequence

import torch
from torch import nn

from ..interfaces import TextEmbedding, masked_mean

log = logging.getLogger(__name__)
PREFIX = "text_encoder."
VOCAB_KEY = "text_vocab"
EMBED_STD = 0.5  # words and positions alike
WORD = r"[a-z0-9]+"


def split_words(prompt: str) -> list[str]:
    return re.findall(WORD, prompt.lower())


def unreadable_characters(prompt: str) -> set[str]:
    """The characters `split_words` drops that are neither ASCII nor whitespace nor punctuation (which
    separate words): emoji, accented and non-Latin letters, other symbols."""
    return {c for c in re.sub(WORD, "", prompt.lower())
            if not (c.isascii() or c.isspace() or unicodedata.category(c).startswith("P"))}


def prompt_start(prompt: str, words: int = 8) -> str:
    """The first `words` words of `prompt`, quoted, with "..." when there are more."""
    parts = prompt.split()
    return repr(" ".join(parts[:words]) + (" ..." if len(parts) > words else ""))


def first_of(items: Sequence[str], limit: int = 20) -> str:
    """`items` joined with commas, the first `limit` only and then how many more."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class WordTextEncoder(nn.Module):
    def __init__(self, vocab: Sequence[str], *, dim: int = 128, max_tokens: int = 16, heads: int = 4):
        super().__init__()
        if len(set(vocab)) != len(vocab) or not vocab:
            raise ValueError("the vocabulary must be a non-empty list of distinct words")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.dim = self.pooled_dim = dim
        self.max_tokens = max_tokens
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.position = nn.Parameter(torch.randn(max_tokens, dim) * EMBED_STD)
        self.context = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True,
                                                  norm_first=True)
        self.pool = nn.Linear(dim, dim)
        nn.init.normal_(self.embed.weight, std=EMBED_STD)

    def token_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, L)` ids and mask; unknown words and characters are dropped with one warning each per call."""
        rows, unknown, strange = [], [], set()
        for prompt in prompts:
            words = split_words(prompt)
            unknown += [w for w in words if w not in self.index]
            strange |= unreadable_characters(prompt)
            ids = [self.index[w] for w in words if w in self.index]
            if len(ids) > self.max_tokens:
                log.warning("prompt %s (%d words) has %d known words; only the first %d are used",
                            prompt_start(prompt), len(words), len(ids), self.max_tokens)
            rows.append(ids[: self.max_tokens])
        if unknown:
            log.warning("unknown words ignored (not in the model's %d-word vocabulary): %s", len(self.vocab),
                        first_of(sorted(set(unknown))))
        if strange:
            log.warning("characters ignored (words are made of a-z and 0-9 only): %s",
                        first_of([f"{c} (U+{ord(c):04X})" for c in sorted(strange)]))
        length = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbedding:
        device = self.embed.weight.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.embed(ids) + self.position[: ids.shape[1]]
        empty = ~mask.any(dim=1)  # an all-unknown prompt: attend to slot 0 rather than to nothing
        attend = mask | (empty[:, None] & (torch.arange(mask.shape[1], device=device) == 0))
        x = self.context(x, src_key_padding_mask=~attend)
        pooled = self.pool(masked_mean(x, mask))
        return TextEmbedding(x * mask.to(x.dtype)[..., None], mask, pooled)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        return self(*self.token_ids(prompts))

    def metadata(self) -> dict[str, str]:
        return {VOCAB_KEY: json.dumps({"vocab": self.vocab, "dim": self.dim, "max_tokens": self.max_tokens})}

    @classmethod
    def seeded(cls, vocab: Sequence[str], *, dim: int, max_tokens: int, seed: int) -> WordTextEncoder:
        """The encoder a training run with this `seed` builds (frozen, eval), leaving the global RNG as it was."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(vocab, dim=dim, max_tokens=max_tokens).eval().requires_grad_(False)

    def with_words(self, words: Sequence[str], *, seed: int) -> WordTextEncoder:
        """This encoder with `words` it lacks appended to the vocabulary (frozen, eval): the known words keep
        their vectors exactly, each new one gets a seeded vector drawn as the originals were (a finetune on
        a domain with new words, e.g. the multi-view objects)."""
        new = [w for w in dict.fromkeys(words) if w not in self.index]
        if not new:
            return self
        grown = type(self)(self.vocab + new, dim=self.dim, max_tokens=self.max_tokens,
                           heads=self.context.self_attn.num_heads)
        state = {k: v for k, v in self.state_dict().items() if k != "embed.weight"}
        grown.load_state_dict(state, strict=False)
        extra = torch.randn(len(new), self.dim, generator=torch.Generator().manual_seed(seed)) * EMBED_STD
        with torch.no_grad():
            grown.embed.weight.copy_(torch.cat([self.embed.weight.detach().cpu(), extra.to(self.embed.weight.dtype)]))
        return grown.to(self.embed.weight.device).eval().requires_grad_(False)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> WordTextEncoder:
        return cls.from_spec(json.loads(metadata[VOCAB_KEY]))

    @classmethod
    def from_spec(cls, spec: dict) -> WordTextEncoder:
        """The (untrained) encoder a `metadata()` spec describes: vocabulary, width, token count."""
        return cls(list(spec["vocab"]), dim=int(spec["dim"]), max_tokens=int(spec["max_tokens"]))
