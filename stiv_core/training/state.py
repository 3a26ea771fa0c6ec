"""Resumable training checkpoints: safetensors only, each one a folder committed by a rename.

`output_dir/checkpoints/step_00000100/` holds
- `model.safetensors` and `ema.safetensors` (loadable with `checkpoint.load_model`),
- `state.safetensors`: the optimizer's tensors, the RNG state, and in its metadata (JSON) the
  optimizer's scalars and param groups, the LR scheduler, the step and the skipped-file list.
The folder is written under a temporary name, every file fsynced, then renamed: a run killed at any
moment leaves either a complete checkpoint or a temporary folder that the next run deletes. The data
position needs no state: the data order is a function of (seed, step) (see data/loader.py).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..checkpoint import check_safetensors, save_model, save_state_dict
from ..model.transformer import STIVTransformer

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainerState:
    step: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable / too-short files seen so far


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not complete)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_incomplete(output_dir: str | Path) -> None:
    """Delete temporary folders left by a run killed while saving."""
    root = checkpoint_root(output_dir)
    for path in root.glob("step_*.tmp*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(output_dir: str | Path, *, model: STIVTransformer, ema_model: STIVTransformer,
                    optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainerState,
                    keep_last: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:08d}"
    tmp = root / f"{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"step": str(state.step)}
    save_model(tmp / "model.safetensors", model, metadata=meta)
    save_model(tmp / "ema.safetensors", ema_model, metadata=meta)
    tensors, metadata = _pack_state(optimizer, scheduler, state)
    save_state_dict(tmp / "state.safetensors", tensors, metadata)
    for path in tmp.iterdir():
        _fsync(path)
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, *, model: STIVTransformer, ema_model: STIVTransformer,
                    optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Restore everything saved by `save_checkpoint` in place; returns the trainer state."""
    model.load_state_dict(load_file(str(check_safetensors(path / "model.safetensors"))))
    ema_model.load_state_dict(load_file(str(check_safetensors(path / "ema.safetensors"))))
    with safe_open(str(check_safetensors(path / "state.safetensors")), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return _unpack_state(tensors, metadata, optimizer, scheduler)


def _pack_state(optimizer, scheduler, state: TrainerState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng/torch_cpu": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda_{i}"] = rng
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    metadata = {"param_groups": json.dumps(opt["param_groups"]), "scalars": json.dumps(scalars),
                "scheduler": json.dumps(sched), "trainer": json.dumps(vars(state))}
    return tensors, metadata


def _unpack_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], optimizer,
                  scheduler) -> TrainerState:
    opt_state: dict[int, dict[str, Any]] = {}
    for index, entries in json.loads(metadata["scalars"]).items():
        opt_state.setdefault(int(index), {}).update(entries)
    for key, value in tensors.items():
        kind, *rest = key.split("/")
        if kind == "optimizer":
            opt_state.setdefault(int(rest[0]), {})[rest[1]] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": json.loads(metadata["param_groups"])})
    sched = scheduler.state_dict()
    sched.update(json.loads(metadata["scheduler"]))
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return TrainerState(**json.loads(metadata["trainer"]))


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so the rename that commits it never precedes its data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
