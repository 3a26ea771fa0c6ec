"""`accelerate launch` with two CPU processes (DDP over gloo): the multi-GPU path's logic, on the CPU.

`--cpu --num_processes 2` starts ONE process (accelerate's simple launcher); `--multi_gpu` with
ACCELERATE_USE_CPU=true starts two through torch.distributed.run, each on the CPU with gloo.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stiv_core.bundle import load_pipeline

pytestmark = pytest.mark.slow  # subprocesses / real training runs (CI runs them; -m 'not slow' skips)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["max_steps=3", "batch_size=2", "sample_every=0", "checkpoint_every=2", "model.depth=1",
        "model.hidden_size=32", "model.num_heads=2", "model.text_dim=32", "model.pooled_text_dim=32",
        "data.buckets=[[4, 16, 16]]", "log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_trains_checkpoints_and_exports(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           "stiv_core/train.py", "--config", "stiv_core/configs/tiny.toml", f'output_dir="{tmp_path}"', "resume=false",
           *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training on 2 process(es), DistributedType.MULTI_CPU" in done.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # one writer (the main process), not two
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert load_pipeline(tmp_path / "model.safetensors").model.config.depth == 1
    # resuming under DDP continues from the last checkpoint
    more = subprocess.run([*cmd[:-len(TINY) - 1], "resume=true", *TINY[1:], "max_steps=4"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resumed from" in more.stderr and (tmp_path / "checkpoints" / "step_00000004").is_dir()


def test_ddp_with_maskdit_extra_blocks_through_the_unmasked_phase(tmp_path):
    # mask_token only takes part while tokens are dropped: after maskdit_until_step DDP must not wait for
    # its gradient ("Expected to have finished reduction in the prior iteration")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           "stiv_core/train.py", "--config", "stiv_core/configs/tiny.toml", f'output_dir="{tmp_path}"', "resume=false",
           *TINY, "checkpoint_every=100", "model.maskdit_extra_blocks=1", "recipe.maskdit_ratio=0.5",
           "recipe.maskdit_until_step=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "step_00000003").is_dir()
