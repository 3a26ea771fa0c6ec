"""A trainer checkpoint rewritten in the format written before FSDP support (optimizer state keyed by
index): the resume tests' reference for checkpoints already on disk. No tests here."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from stiv_core.checkpoint import save_state_dict
from stiv_core.model.transformer import STIVTransformer
from stiv_core.training.config import TrainConfig
from stiv_core.training.full_state import load_full_optimizer_state, parameter_names
from stiv_core.training.optim import build_optimizer, build_scheduler
from stiv_core.training.state import TrainerState, read_checkpoint


def legacy_pack_state(optimizer, scheduler, state: TrainerState):
    """state.safetensors as written before FSDP support (optimizer state keyed by index), verbatim:
    the reference for checkpoints already on disk, e.g. of runs that are resumed with newer code."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng/torch_cpu": torch.get_rng_state()}
    scalars: dict[str, dict] = {}
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    metadata = {"param_groups": json.dumps(opt["param_groups"]), "scalars": json.dumps(scalars),
                "scheduler": json.dumps(sched), "trainer": json.dumps(vars(state))}
    return tensors, metadata


def rewrite_as_legacy(checkpoint: Path, config: TrainConfig) -> None:
    """Rewrite a checkpoint's state.safetensors in the old format (model and EMA files are unchanged)."""
    model = STIVTransformer(config.model)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim)
    snapshot = read_checkpoint(checkpoint, parameter_names=parameter_names(model, optimizer))
    load_full_optimizer_state(model, optimizer, snapshot.optimizer)
    scheduler.load_state_dict({**scheduler.state_dict(), **snapshot.scheduler})
    rng = torch.get_rng_state()
    torch.set_rng_state(snapshot.rng["torch_cpu"])
    try:
        save_state_dict(checkpoint / "state.safetensors", *legacy_pack_state(optimizer, scheduler, snapshot.trainer))
    finally:
        torch.set_rng_state(rng)
    with safe_open(str(checkpoint / "state.safetensors"), framework="pt") as f:
        assert "optimizer_keys" not in f.metadata() and "optimizer/0/exp_avg" in f.keys()
