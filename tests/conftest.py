"""Shared fixtures: a tiny STIV config, models with random non-zero weights, and matching inputs.

`initialize_weights` zero-inits every gate and output layer, so a freshly built model outputs exactly
zero; `make_model` therefore adds seeded noise to every parameter to make the tests see real maths.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from stiv_core.config import STIVConfig
from stiv_core.interfaces import TextEmbedding
from stiv_core.model.transformer import STIVTransformer
from tests.fakes import randomize

# head_dim 16 (divisible by 4 for 2D RoPE); text_dim != hidden_size != pooled_text_dim on purpose,
# so a projection that forgets to map text width to model width fails loudly.
TINY = STIVConfig(name="test-tiny", depth=2, hidden_size=32, num_heads=2, latent_channels=4, patch_size=2,
                  temporal_patch=2, mlp_ratio=2.0, text_dim=24, pooled_text_dim=16, max_text_tokens=8)


@pytest.fixture
def tiny_config() -> STIVConfig:
    return TINY


@pytest.fixture
def make_model():
    """`make_model(config=TINY, seed=0, dtype=float32, **config_changes)` -> a random model in eval mode.

    Parameters do not require grad (as after `load_model`); call `requires_grad_(True)` to train.
    """

    def build(config: STIVConfig = TINY, *, seed: int = 0, dtype: torch.dtype = torch.float32,
              **changes: Any) -> STIVTransformer:
        torch.manual_seed(seed)
        model = STIVTransformer(config.replace(**changes) if changes else config)
        return randomize(model, seed, std=0.1).to(dtype).eval().requires_grad_(False)

    return build


@pytest.fixture
def make_inputs():
    """`make_inputs(config, batch, frames, height, width, text_len)` -> forward() keyword arguments.

    x `(B, C, T, H, W)`, t `(B,)`, text `(B, L, text_dim)` with row i masked after `L - i` tokens,
    pooled_text `(B, pooled_text_dim)`, micro `(B, 6)` (pixel sizes, crops, stride, frames).
    """

    def build(config: STIVConfig = TINY, *, batch: int = 2, frames: int = 4, height: int = 8,
              width: int = 8, text_len: int = 5, seed: int = 1,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        text_mask = torch.ones(batch, text_len, dtype=torch.bool)
        for i in range(batch):
            text_mask[i, max(1, text_len - i):] = False
        micro = torch.tensor([8.0 * height, 8.0 * width, 0.0, 0.0, 1.0, float(frames)]).expand(batch, -1)
        return dict(
            x=torch.randn(batch, config.latent_channels, frames, height, width, generator=g, dtype=dtype),
            t=torch.rand(batch, generator=g, dtype=dtype),
            text=TextEmbedding(torch.randn(batch, text_len, config.text_dim, generator=g, dtype=dtype), text_mask,
                               torch.randn(batch, config.pooled_text_dim, generator=g, dtype=dtype)),
            micro=micro.clone().to(dtype),
        )

    return build


@pytest.fixture(autouse=True)
def fixed_host_ram(monkeypatch):
    """No test depends on this machine's free RAM: every loaded copy of the RAM probe (stiv_core's, and the
    node pack's own import of it) reads 64 GiB, 32 GiB available. A test that needs another reading
    patches `host_ram` again."""
    import sys

    from stiv_core.memory.ram import HostRAM

    reading = HostRAM(64 * 2 ** 30, 32 * 2 ** 30, "tests")
    for name, module in list(sys.modules.items()):
        if name.endswith("stiv_core.memory.ram"):
            monkeypatch.setattr(module, "host_ram", lambda: reading)
