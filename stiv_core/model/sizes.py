"""Parameter and byte counts of STIV models, on the meta device (shapes only, no memory allocated).

    python -m stiv_core.model.sizes

prints every preset with its parameter count beside the paper's (Table 1). The memory planner counts
the bytes of a (quantized) meta model with `tensor_bytes`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import PAPER_PARAMETERS, PRESETS, STIVConfig
from .transformer import STIVTransformer


def meta_model(config: STIVConfig, dtype: Optional[torch.dtype] = None) -> STIVTransformer:
    """The model of `config` on the meta device (in `dtype` when given): every shape, no storage."""
    with torch.device("meta"):
        model = STIVTransformer(config)
    return model if dtype is None else model.to(dtype)


def count_parameters(config: STIVConfig) -> int:
    """Parameters of the model built from `config`, counted on the meta device."""
    return sum(p.numel() for p in meta_model(config).parameters())


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (meta tensors count as their would-be size)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    print(f"{'preset':<6} {'depth':>5} {'width':>6} {'heads':>5} {'params':>10} {'+MaskDiT 2':>11}  paper")
    for name, config in PRESETS.items():
        n = count_parameters(config)
        n_mask = count_parameters(config.replace(maskdit_extra_blocks=2))
        paper = PAPER_PARAMETERS.get(name)
        note = f"{paper / 1e9:.2f}B ({(n / paper - 1) * 100:+.1f}%)" if paper else "-"
        print(f"{name:<6} {config.depth:>5} {config.hidden_size:>6} {config.num_heads:>5} "
              f"{n / 1e9:>9.3f}B {n_mask / 1e9:>10.3f}B  {note}")


if __name__ == "__main__":
    main()
