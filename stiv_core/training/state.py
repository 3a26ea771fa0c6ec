"""Resumable training checkpoints: safetensors only, each one a folder committed by a rename.

`output_dir/checkpoints/step_00000100/` holds
- `model.safetensors` and `ema.safetensors` (loadable with `checkpoint.load_model`),
- `state.safetensors`: the optimizer's tensors (`optimizer/<parameter name>/<state name>`), the RNG
  state, and in its metadata (JSON) the optimizer's scalars and param groups, the LR scheduler, the
  fp16 grad scaler, the step and the skipped-file list.
Every tensor is full (unsharded): a checkpoint written by sharded ranks (FSDP2) loads in one
process and back; `Snapshot` is what one process writes and every process reads, and
`full_state.py` moves it in and out of the live, possibly sharded, training objects.
Checkpoints written before the optimizer state was keyed by name (`optimizer/<index>/...`, no
`optimizer_keys` in the metadata) still load: the index is the parameter's place in the optimizer.
The folder is written under a temporary name, every file fsynced, then renamed: a run killed at any
moment leaves either a complete checkpoint or a temporary folder that the next run deletes. A checkpoint
damaged later (a bad disk, an interrupted copy) is skipped by resume, which takes the newest readable
one, and kept: saving its step again moves it aside to `step_NNNNNNNN.damaged`. The data position needs
no state: the data order is a function of (seed, step) (see data/loader.py).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..checkpoint import check_safetensors, model_metadata, safetensors_problem, save_state_dict
from ..config import STIVConfig
from .full_state import OptimizerState

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")
KEYS_BY_NAME = "fqn"  # metadata["optimizer_keys"] of checkpoints whose optimizer state is keyed by name


@dataclass
class TrainerState:
    step: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable / too-short files seen so far
    world: Optional[int] = None   # processes that wrote it (None: a checkpoint from before this was kept)


@dataclass
class Snapshot:
    """Everything a checkpoint holds, full (unsharded) CPU tensors."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: OptimizerState                 # keyed by parameter name, see full_state.py
    scheduler: dict[str, Any]
    trainer: TrainerState
    scaler: Optional[dict[str, Any]] = None   # the fp16 GradScaler's state_dict (None without one)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # "torch_cpu", "cuda_0", ...


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not complete)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint folder `path` cannot be resumed from (None: every file is there, its header
    parses and its size is the one the header gives). Reads headers only."""
    problems = [f"{name} {why}" for name in CHECKPOINT_FILES if (why := safetensors_problem(path / name))]
    return "; ".join(problems) or None


def usable_checkpoint(output_dir: str | Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest checkpoint that is complete and readable (None if none is), and the newer ones skipped
    as damaged, newest first, each with why."""
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def remove_incomplete(output_dir: str | Path) -> None:
    """Delete temporary folders left by a run killed while saving."""
    root = checkpoint_root(output_dir)
    for path in root.glob("step_*.tmp*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(output_dir: str | Path, snapshot: Snapshot, *, config: STIVConfig, keep_last: int) -> Path:
    """Write `snapshot` as `step_NNNNNNNN/` (one process writes; see the module docstring)."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{snapshot.trainer.step:08d}"
    tmp = root / f"{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = model_metadata(config, {"step": str(snapshot.trainer.step)})  # they load with `load_model`
    save_state_dict(tmp / "model.safetensors", _contiguous(snapshot.model), meta)
    save_state_dict(tmp / "ema.safetensors", _contiguous(snapshot.ema), meta)
    tensors, metadata = _pack_state(snapshot)
    save_state_dict(tmp / "state.safetensors", tensors, metadata)
    for path in tmp.iterdir():
        _fsync(path)
    if final.exists() and checkpoint_problem(final) is not None:   # resumed past it: keep it, aside
        aside = _free_name(final.with_name(f"{final.name}.damaged"))
        os.replace(final, aside)
        log.warning("the damaged checkpoint %s is kept as %s", final.name, aside.name)
    elif final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path, *, parameter_names: Sequence[Sequence[str]]) -> Snapshot:
    """Read what `save_checkpoint` wrote. `parameter_names`: the optimizer's parameter names per
    param group, in its order (`full_state.parameter_names`): they name the state of old checkpoints."""
    model = load_file(str(check_safetensors(path / "model.safetensors")))
    ema = load_file(str(check_safetensors(path / "ema.safetensors")))
    with safe_open(str(check_safetensors(path / "state.safetensors")), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return _unpack_state(tensors, metadata, model=model, ema=ema, parameter_names=parameter_names)


def _pack_state(snapshot: Snapshot) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"rng/{name}": value for name, value in snapshot.rng.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in snapshot.optimizer["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{param}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(param, {})[name] = value
    sched = {k: v for k, v in snapshot.scheduler.items() if k != "lr_lambdas"}
    metadata = {"optimizer_keys": KEYS_BY_NAME, "param_groups": json.dumps(snapshot.optimizer["param_groups"]),
                "scalars": json.dumps(scalars), "scheduler": json.dumps(sched),
                "trainer": json.dumps(vars(snapshot.trainer))}
    if snapshot.scaler is not None:
        metadata["scaler"] = json.dumps(snapshot.scaler)
    return tensors, metadata


def _unpack_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, model, ema,
                  parameter_names: Sequence[Sequence[str]]) -> Snapshot:
    groups = json.loads(metadata["param_groups"])
    state: dict[str, dict[str, Any]] = {}
    for param, entries in json.loads(metadata["scalars"]).items():
        state.setdefault(param, {}).update(entries)
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            param, name = key[len("optimizer/"):].rsplit("/", 1)
            state.setdefault(param, {})[name] = value
    if metadata.get("optimizer_keys") != KEYS_BY_NAME:
        state, groups = _name_legacy_state(state, groups, parameter_names)
    scaler = json.loads(metadata["scaler"]) if "scaler" in metadata else None
    rng = {key[len("rng/"):]: value for key, value in tensors.items() if key.startswith("rng/")}
    return Snapshot(model=model, ema=ema, optimizer={"state": state, "param_groups": groups},
                    scheduler=json.loads(metadata["scheduler"]), trainer=TrainerState(**json.loads(metadata["trainer"])),
                    scaler=scaler, rng=rng)


def _name_legacy_state(state: dict[str, dict[str, Any]], groups: list[dict[str, Any]],
                       parameter_names: Sequence[Sequence[str]]) -> tuple[dict, list]:
    """Old checkpoints key the state by `optimizer.state_dict()`'s index: the parameter's place in
    the optimizer's param groups. Map each index to the name of the parameter in that place."""
    if [len(g["params"]) for g in groups] != [len(names) for names in parameter_names]:
        raise ValueError(f"the checkpoint's optimizer has {[len(g['params']) for g in groups]} parameters per "
                         f"group, this model's {[len(n) for n in parameter_names]}: another model or freezing?")
    by_index = {str(index): name for group, names in zip(groups, parameter_names)
                for index, name in zip(group["params"], names)}
    named_groups = [{**group, "params": list(names)} for group, names in zip(groups, parameter_names)]
    return {by_index[index]: entries for index, entries in state.items()}, named_groups


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ...: the first that does not exist."""
    candidates = (path.with_name(f"{path.name}.{i}") if i else path for i in range(10 ** 6))
    return next(p for p in candidates if not p.exists())


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so the rename that commits it never precedes its data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
