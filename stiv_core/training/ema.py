"""Exponential moving average of the model's weights, used for sampling and for the saved model."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA:
    """A float32 shadow of `model`'s state_dict that follows `ema = decay * ema + (1 - decay) * p`.

    Buffers that are not floating point are copied as they are. The shadow is float32 whatever the
    training dtype, so tiny updates (1 - 0.9999) are not rounded away. Keys are the model's
    state_dict keys (its FQNs), as in the saved `ema.safetensors`.

    Sharding (FSDP2): the model's parameters are then DTensors, each rank holding a shard. The shadow
    is made of DTensors with the same mesh and placements, and `update` averages each rank's own
    shard (`to_local()`): no communication per step and 1/world of the memory, where a full copy
    per rank would cost a model's worth of float32 on every GPU. The full weights are gathered only
    when asked (`full_state_dict`: saving, sampling, export). A plain module or DDP's unwrapped
    module gives plain tensors, and the same code does the same maths.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: value.detach().to(torch.float32 if value.is_floating_point() else value.dtype, copy=True)
                for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Call with the model as trained (unwrapped from DDP; FSDP2 modules as they are)."""
        for name, value in model.state_dict().items():
            target, value = _local(self.shadow[name]), _local(value.detach())
            if target.is_floating_point():
                target.lerp_(value.to(target.dtype), 1 - self.decay)
            else:
                target.copy_(value)

    @torch.no_grad()
    def full_state_dict(self, *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The shadow as full tensors on `device`, on rank 0; an empty dict on the other ranks.

        Collective when sharded: every rank must call it (one tensor gathered at a time, so a rank
        never holds more than one full tensor it does not keep).
        """
        keep = not dist.is_initialized() or dist.get_rank() == 0
        full = {}
        for name, value in self.shadow.items():
            value = value.full_tensor() if isinstance(value, DTensor) else value
            if keep:
                full[name] = value.to(device)
        return full

    @torch.no_grad()
    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Every rank passes the full tensors (as saved); each keeps its shard."""
        if state.keys() != self.shadow.keys():
            missing, unexpected = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        for name, target in self.shadow.items():
            value = state[name]
            if isinstance(target, DTensor):
                # Each rank cuts its own shard from the full tensor it holds (no scatter from rank 0).
                value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                          src_data_rank=None)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"EMA tensor {name}: saved shape {tuple(value.shape)}, model {tuple(target.shape)}")
            _local(target).copy_(_local(value))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops update the DTensor), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
