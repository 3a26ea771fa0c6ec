"""The STIV diffusion transformer (PixArt-alpha-style DiT with factorized space/time attention)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MICRO_CONDITIONS, STIVConfig
from ..flow import TIMESTEP_SCALE
from ..interfaces import TextEmbedding
from .attention import AttentionBackend
from .layers import (CrossAttention, FeedForward, ScalarEmbedder, SelfAttention, modulate,
                     stateless_norm)
from .rope import Rope, grid_positions, rope_tables


class STIVBlock(nn.Module):
    """Spatial self-attn -> cross-attn to text -> temporal self-attn -> FFN, on `(B, T, S, D)`.

    Spatial attention and FFN use sandwich norm and the shared adaLN-single modulation:
    `x + gate * norm(Sub(modulate(norm(x), shift, scale)))`.
    """

    def __init__(self, config: STIVConfig):
        super().__init__()
        dim, heads, eps = config.hidden_size, config.num_heads, config.norm_eps
        self.eps = eps
        self.spatial_attn = SelfAttention(dim, heads, eps)
        self.cross_attn = CrossAttention(dim, heads, eps)
        self.temporal_attn = SelfAttention(dim, heads, eps)
        self.ffn = FeedForward(dim, config.mlp_hidden)
        # Per-block offsets added to the shared modulation (PixArt's scale_shift_table).
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor, spatial_rope: Rope, temporal_rope: Rope,
                backend: AttentionBackend) -> torch.Tensor:
        b, t, s, d = x.shape
        norm = lambda y: stateless_norm(y, self.eps)
        params = (self.scale_shift_table[None] + modulation)[:, :, None, None]  # (B, 6, 1, 1, D)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = params.unbind(1)

        h = modulate(norm(x), shift_sa, scale_sa).flatten(0, 1)           # (B*T, S, D)
        h = self.spatial_attn(h, spatial_rope, backend).view(b, t, s, d)
        x = x + gate_sa * norm(h)

        h = self.cross_attn(norm(x).flatten(1, 2), text, text_mask, backend)  # (B, T*S, D)
        x = x + h.view(b, t, s, d)

        x = x + self.temporal_attn.forward_over_time(norm(x), temporal_rope, backend)  # over T, per S

        h = self.ffn(modulate(norm(x), shift_ff, scale_ff))
        return x + gate_ff * norm(h)


class STIVTransformer(nn.Module):
    """Predicts velocity (or clean data, per `config.prediction`) for latents `(B, C, T, H, W)`."""

    def __init__(self, config: STIVConfig, *, attention_backend: AttentionBackend = AttentionBackend.SDPA):
        super().__init__()
        self.config = config
        self.attention_backend = AttentionBackend(attention_backend)
        self.gradient_checkpointing = False
        dim, c, p, pt = config.hidden_size, config.latent_channels, config.patch_size, config.temporal_patch

        self.patch_embed = nn.Conv3d(c, dim, kernel_size=(pt, p, p), stride=(pt, p, p))
        # Which latent frames are given (frame replacement), per temporal patch: zero-initialised.
        self.given_frame_embed = nn.Linear(pt, dim, bias=False)
        self.caption_proj = FeedForward(config.text_dim, dim, dim)
        self.null_text = nn.Parameter(torch.randn(config.max_text_tokens, config.text_dim) / config.text_dim ** 0.5)
        self.null_pooled = nn.Parameter(torch.zeros(config.pooled_text_dim))
        self.pooled_proj = nn.Sequential(nn.Linear(config.pooled_text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_embedder = ScalarEmbedder(dim, eps=config.norm_eps)
        self.micro_embedders = nn.ModuleList(ScalarEmbedder(dim, eps=config.norm_eps) for _ in MICRO_CONDITIONS)
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

        self.blocks = nn.ModuleList(STIVBlock(config) for _ in range(config.depth))
        self.extra_blocks = nn.ModuleList(STIVBlock(config) for _ in range(config.maskdit_extra_blocks))
        self.mask_token = nn.Parameter(torch.zeros(dim)) if config.maskdit_extra_blocks else None

        self.final_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.final_linear = nn.Linear(dim, pt * p * p * c)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for linears; zero for adaLN, gates, cross/temporal outputs and the final layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for embedder in [self.t_embedder, *self.micro_embedders]:
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        zero = [self.given_frame_embed.weight, self.adaln_single[1].weight, self.adaln_single[1].bias,
                self.final_linear.weight, self.final_linear.bias]
        for block in self.all_blocks():
            zero += [block.scale_shift_table, block.cross_attn.proj.weight, block.cross_attn.proj.bias,
                     block.temporal_attn.proj.weight, block.temporal_attn.proj.bias]
        for param in zero:
            nn.init.zeros_(param)

    def named_blocks(self) -> list[tuple[str, STIVBlock]]:
        """Every transformer block with its state-dict prefix ("blocks.3", "extra_blocks.0"), in the order a
        forward runs them: the main blocks, then MaskDiT's extra blocks. The one definition of that order
        (block swap streams, quantization and the planner count blocks by it)."""
        return [*((f"blocks.{i}", b) for i, b in enumerate(self.blocks)),
                *((f"extra_blocks.{i}", b) for i, b in enumerate(self.extra_blocks))]

    def all_blocks(self) -> list[STIVBlock]:
        """The blocks of `named_blocks()`, without their names."""
        return [block for _, block in self.named_blocks()]

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        self.attention_backend = AttentionBackend(backend)

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(T', H', W') token grid for latents `(..., T, H, W)`; raises on sizes that don't fit."""
        return token_grid(self.config, latent_shape)

    def rope(self, grid: tuple[int, int, int], device) -> tuple[Rope, Rope]:
        """Spatial (2D) tables `(H'*W', hd/2)` and temporal (1D) tables `(T', hd/2)`."""
        t, h, w = grid
        st, sh, sw = self.config.rope_position_scale
        hd, theta = self.config.head_dim, self.config.rope_theta
        spatial = rope_tables(grid_positions(h, w, scale=(sh, sw), device=device), (hd // 2, hd // 2), theta)
        temporal = rope_tables(grid_positions(t, scale=(st,), device=device), (hd,), theta)
        return spatial, temporal

    def condition(self, t: torch.Tensor, micro: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The singleton condition `(B, D)`: timestep + micro-conditions + pooled text."""
        c = self.t_embedder(t * TIMESTEP_SCALE) + self.pooled_proj(pooled)
        for i, embedder in enumerate(self.micro_embedders):
            c = c + embedder(micro[:, i])
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding, micro: torch.Tensor, *,
                frame_mask: Optional[torch.Tensor] = None, text_drop: Optional[torch.Tensor] = None,
                keep_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        x: `(B, C, T, H, W)` latents (given frames already replaced by their clean latents);
        t: `(B,)` flow time in [0, 1] (see flow.py); text: tokens `(B, L, text_dim)` with L <= max_text_tokens,
        mask `(B, L)` (True = real token) and pooled `(B, pooled_text_dim)`;
        micro: `(B, 6)` in MICRO_CONDITIONS order; frame_mask: `(B, T)` bool, True = given frame;
        text_drop: `(B,)` bool, True = use the learned null text (CFG / condition dropout);
        keep_index: `(B, S_keep)` spatial tokens kept by MaskDiT (the same for every frame).
        Returns `(B, C, T, H, W)` in the model's dtype.
        """
        cfg = self.config
        b = x.shape[0]
        grid = self.token_grid(x.shape)
        dtype = self.patch_embed.weight.dtype
        text, text_mask, pooled_text = self._drop_text(text.tokens.to(dtype), text.mask, text.pooled.to(dtype),
                                                       text_drop)

        tokens = self.patch_embed(x.to(dtype)).flatten(3).permute(0, 2, 3, 1).contiguous()  # (B, T', S, D)
        if frame_mask is not None:
            given = frame_mask.to(dtype).view(b, grid[0], cfg.temporal_patch)
            tokens = tokens + self.given_frame_embed(given)[:, :, None]
        c = self.condition(t, micro, pooled_text)
        modulation = self.adaln_single(c).view(b, 6, -1)
        text = self.caption_proj(text)
        spatial_rope, temporal_rope = self.rope(grid, x.device)

        args = (modulation, text, text_mask)
        if keep_index is not None:
            tokens = self._run(self.blocks, self._keep(tokens, keep_index), args,
                               self._kept_rope(spatial_rope, keep_index, grid[0]), temporal_rope)
            tokens = self._unmask(tokens, keep_index, grid[1] * grid[2])
        else:
            tokens = self._run(self.blocks, tokens, args, spatial_rope, temporal_rope)
        tokens = self._run(self.extra_blocks, tokens, args, spatial_rope, temporal_rope)
        return self._unpatchify(self._final(tokens, c), grid)

    def _run(self, blocks: nn.ModuleList, tokens, args, spatial_rope, temporal_rope) -> torch.Tensor:
        for block in blocks:
            call = (block, tokens, *args, spatial_rope, temporal_rope, self.attention_backend)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(*call, use_reentrant=False)
            else:
                tokens = block(*call[1:])
        return tokens

    def _drop_text(self, text, text_mask, pooled, text_drop):
        if text.shape[1] > self.config.max_text_tokens:
            raise ValueError(f"{text.shape[1]} text tokens given; this model takes at most "
                             f"{self.config.max_text_tokens} (truncate when encoding)")
        if text_drop is None:
            return text, text_mask.bool(), pooled
        drop = text_drop.bool()
        null = self.null_text[: text.shape[1]].expand_as(text)
        text = torch.where(drop[:, None, None], null, text)
        text_mask = torch.where(drop[:, None], True, text_mask.bool())
        pooled = torch.where(drop[:, None], self.null_pooled.expand_as(pooled), pooled)
        return text, text_mask, pooled

    def _keep(self, tokens: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        if not self.extra_blocks:
            raise ValueError("MaskDiT token dropping needs maskdit_extra_blocks > 0 in the config")
        b, t, _, d = tokens.shape
        index = keep_index[:, None, :, None].expand(b, t, keep_index.shape[1], d)
        return tokens.gather(2, index)

    @staticmethod
    def _kept_rope(rope: Rope, keep_index: torch.Tensor, frames: int) -> Rope:
        kept = rope.index_tokens(keep_index)  # (B, S_keep, hd/2); spatial batch is B*T'
        return Rope(*(table.repeat_interleave(frames, dim=0)[:, None] for table in kept))

    def _unmask(self, tokens: torch.Tensor, keep_index: torch.Tensor, num_spatial: int) -> torch.Tensor:
        b, t, _, d = tokens.shape
        full = self.mask_token.to(tokens.dtype).expand(b, t, num_spatial, d).clone()
        index = keep_index[:, None, :, None].expand_as(tokens)
        return full.scatter(2, index, tokens)

    def _final(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.final_table[None] + c[:, None]).unbind(1)
        return self.final_linear(modulate(stateless_norm(tokens, self.config.norm_eps),
                                          shift[:, None, None], scale[:, None, None]))

    def _unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        cfg = self.config
        pt, p, c = cfg.temporal_patch, cfg.patch_size, cfg.latent_channels
        x = tokens.reshape(tokens.shape[0], t, h, w, pt, p, p, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], c, t * pt, h * p, w * p)


def sample_keep_index(batch: int, num_spatial: int, *, keep_ratio: float = 0.5,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random MaskDiT keep index `(B, round(keep_ratio * S))`, sorted, on the generator's device."""
    keep = max(1, round(keep_ratio * num_spatial))
    device = generator.device if generator is not None else None
    scores = torch.rand(batch, num_spatial, generator=generator, device=device)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


def inflate_patch_embed(weight_2d: torch.Tensor, temporal_patch: int) -> torch.Tensor:
    """Inflate a T2I patch-embed weight `(D, C, p, p)` to `(D, C, pt, p, p)` along time.

    The weight is repeated and divided by `pt`, so a static clip (one image repeated) embeds exactly
    as the image does in the 2D model.
    """
    if weight_2d.dim() != 4:
        raise ValueError(f"expected a 2D patch-embed weight (D, C, p, p), got shape {tuple(weight_2d.shape)}")
    return weight_2d[:, :, None].repeat(1, 1, temporal_patch, 1, 1) / temporal_patch


def token_grid(config: STIVConfig, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(T', H', W') token grid of a `config` model for latents `(..., T, H, W)`; raises with the sizes that
    fit when they don't (needs only the config: the CLI checks sizes before loading weights)."""
    t, h, w = latent_shape[-3:]
    p, pt = config.patch_size, config.temporal_patch
    if t % pt:
        raise ValueError(f"{t} latent frames do not fit temporal patch {pt}: use a multiple of {pt} "
                         f"(e.g. {' or '.join(map(str, _nearest_multiples(t, pt)))})")
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}: height and width "
                         f"must be multiples of {p} (e.g. {_nearest_multiples(h, p)[0]}x"
                         f"{_nearest_multiples(w, p)[0]})")
    return t // pt, h // p, w // p


def _nearest_multiples(n: int, m: int) -> list[int]:
    """The positive multiples of `m` just below and above `n` (7, 2 -> [6, 8]; 1, 2 -> [2])."""
    below = n - n % m
    return [k for k in (below, below + m) if k > 0] or [m]


def num_spatial_tokens(config: STIVConfig, height: int, width: int) -> int:
    """Spatial tokens per frame for latents of `height x width`."""
    return math.prod(s // config.patch_size for s in (height, width))
