"""Exponential moving average of the model's weights, used for sampling and for the saved model."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of `model` whose floating tensors follow `ema = decay * ema + (1 - decay) * p`.

    Buffers that are not floating point (and parameters that do not train) are copied as they are.
    The shadow is kept in float32 whatever the training dtype, so tiny updates (1 - 0.9999) are not
    rounded away.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadow = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = shadow[name]
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.dtype), 1 - self.decay)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
