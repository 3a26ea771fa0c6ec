"""Two text encoders as one: tokens from the first, the pooled embedding from the second.

The paper's (and PixArt-style models') pairing: T5 tokens for cross-attention, and the pooled embedding
of a CLIP-like encoder (its EOS token) for adaLN-single, since T5 has no pooled output.
"""
from __future__ import annotations

from ..interfaces import TextEmbedding, TextEncoder


class CombinedTextEncoder:
    """`encode(prompts)` -> `token_encoder`'s tokens and mask with `pooled_encoder`'s pooled embedding."""

    def __init__(self, token_encoder: TextEncoder, pooled_encoder: TextEncoder):
        self.token_encoder, self.pooled_encoder = token_encoder, pooled_encoder
        self.dim = token_encoder.dim
        self.pooled_dim = pooled_encoder.pooled_dim

    def encode(self, prompts: list[str]) -> TextEmbedding:
        tokens = self.token_encoder.encode(prompts)
        pooled = self.pooled_encoder.encode(prompts).pooled.to(tokens.tokens.device)
        return TextEmbedding(tokens.tokens, tokens.mask, pooled)
