"""Full (unsharded) state dicts of the live model and optimizer, whatever wraps them.

One code path for a plain module, DDP (pass the unwrapped module) and FSDP2 (accelerate
`fsdp_version=2`, parameters are DTensors): torch.distributed.checkpoint's get/set state-dict
functions with `full_state_dict=True`. Getting gathers the shards, so EVERY rank must call it; the
full CPU tensors land on rank 0 (other ranks may get an empty dict). Setting takes the full tensors
on every rank and keeps each rank's shard. The optimizer's state is keyed by parameter name (FQN),
so a checkpoint written by N sharded ranks loads in one process, and back.

FSDP1 is refused (`configure_sharding`): its flat parameters would need another EMA and state path, and
FSDP2 is what accelerate recommends.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

log = logging.getLogger(__name__)
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
SCATTER = StateDictOptions(full_state_dict=True)
# Parameters are checked by name here; a parameter without saved state is allowed (see below).
SCATTER_OPTIMIZER = StateDictOptions(full_state_dict=True, strict=False)
WRAPPERS = re.compile(r"(?:_checkpoint_wrapped_module|_orig_mod)\.")
OptimizerState = dict[str, Any]  # {"state": {fqn: {name: value}}, "param_groups": [{..., "params": [fqn]}]}


def configure_sharding(accelerator) -> None:
    """Check the distribution before prepare(): FSDP1 is refused with a clear error; FSDP2's
    `cpu_ram_efficient_loading` (on by default in `accelerate launch --use_fsdp`) is turned off:
    accelerate's loader expects a transformers model (`get_parameter_or_buffer`, dotted names), and
    it saves nothing here, since every rank builds the same full model and checkpoints are loaded
    after prepare()."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise ValueError("the STIV trainer supports FSDP version 2 only (sharded EMA and full checkpoints); "
                         "launch with `accelerate launch --use_fsdp --fsdp_version 2 ...`")
    plugin = accelerator.state.fsdp_plugin
    if plugin.cpu_ram_efficient_loading:
        log.info("FSDP2: cpu_ram_efficient_loading turned off (every rank builds the model; see full_state.py)")
        plugin.cpu_ram_efficient_loading = False


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as full CPU tensors on rank 0. Collective: every rank calls it."""
    return get_model_state_dict(model, options=GATHER)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every rank passes the full weights; each keeps its shard. Keys must match exactly."""
    set_model_state_dict(model, dict(state), options=SCATTER)  # it replaces the dict's values: a copy


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The FQN of each of the optimizer's parameters, per param group, in the optimizer's order.

    Wrapper modules (activation checkpointing, torch.compile) are left out of the names, as in the
    model's state_dict keys.
    """
    names = {id(p): WRAPPERS.sub("", name) for name, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not the model's") from None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerState:
    """The optimizer's state keyed by FQN, full CPU tensors on rank 0. Collective: every rank calls it."""
    if not optimizer.state:  # no step yet; the library would take a zero step to create the state
        return {"state": {}, "param_groups": [{**_hyper(group), "params": names} for group, names in
                                              zip(optimizer.param_groups, parameter_names(model, optimizer))]}
    return get_optimizer_state_dict(model, optimizer, options=GATHER)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: OptimizerState) -> None:
    """Every rank passes the full state (as `full_optimizer_state` returns it); each keeps its shard.

    A parameter without saved state (it had no gradient yet) gets none, as in the run that was saved:
    the library first gives every parameter a state (a zero step) and only overwrites the saved ones.
    """
    names = parameter_names(model, optimizer)
    saved_groups = state["param_groups"]
    if [g["params"] for g in saved_groups] != names:
        raise ValueError("the checkpoint's optimizer holds other parameters than this model's trainable ones "
                         "(a changed model or freezing?)")
    if not state["state"]:
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in _hyper(saved).items() if k in group})
        return
    # Hyperparameters this optimizer does not know (another torch version's) would break the load.
    known = [{k: v for k, v in saved.items() if k in group or k == "params"}
             for group, saved in zip(optimizer.param_groups, saved_groups)]
    set_optimizer_state_dict(model, optimizer, {"state": copy.deepcopy(state["state"]), "param_groups": known},
                             options=SCATTER_OPTIMIZER)
    for group, group_names in zip(optimizer.param_groups, names):
        for param, name in zip(group["params"], group_names):
            if name not in state["state"]:
                optimizer.state.pop(param, None)


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}
