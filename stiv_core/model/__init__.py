"""The STIV transformer and its parts."""
from .attention import AttentionBackend, attention
from .transformer import STIVTransformer, inflate_patch_embed, sample_keep_index

__all__ = ["AttentionBackend", "STIVTransformer", "attention", "inflate_patch_embed", "sample_keep_index"]
