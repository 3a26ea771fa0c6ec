"""Resume is bit-identical to an uninterrupted run, also after a SIGKILL at an arbitrary moment."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stiv_core.train import train
from stiv_core.training.config import ConfigError, load_config
from stiv_core.training.state import latest_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
# Every recipe feature on, so their randomness is part of what must resume exactly.
TINY = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.text_dim=16",
        "model.pooled_text_dim=16", "model.max_text_tokens=8", "model.maskdit_extra_blocks=1",
        "data.buckets=[[4, 16, 16], [4, 16, 8]]", "data.frame_strides=[1, 2]", "batch_size=2",
        "recipe.maskdit_ratio=0.5", "recipe.task_ti2v=1.0", "recipe.task_interpolation=1.0",
        "optim.warmup_steps=3", "optim.ema_decay=0.9", "data.num_samples=5", "log_every=1000"]


def run(out, *extra):
    return train(load_config(None, TINY + [f"output_dir={out}", *extra]))


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    found = {}
    for name in ("model", "ema", "state"):
        for key, value in load_file(str(checkpoint / f"{name}.safetensors")).items():
            found[f"{name}/{key}"] = value
    return found


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


def test_stop_and_resume_is_bit_identical(tmp_path):
    full = run(tmp_path / "full", "max_steps=6", "checkpoint_every=2", "keep_last=2")
    first = run(tmp_path / "split", "max_steps=4", "checkpoint_every=2")
    second = run(tmp_path / "split", "max_steps=6", "checkpoint_every=2")
    assert len(first.losses) == 4 and len(second.losses) == 2
    assert first.losses + second.losses == full.losses
    assert_identical(tmp_path / "full/checkpoints/step_00000006", tmp_path / "split/checkpoints/step_00000006")
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step_00000004", "step_00000006"]
    again = run(tmp_path / "split", "max_steps=6")  # already complete: nothing runs, nothing breaks
    assert again.step == 6 and again.losses == []


def test_existing_checkpoints_without_resume_is_an_error(tmp_path):
    run(tmp_path, "max_steps=1")
    with pytest.raises(ConfigError, match="resume is false"):
        run(tmp_path, "max_steps=2", "resume=false")


def test_sigkill_at_any_moment_resumes_from_the_last_complete_checkpoint(tmp_path):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "stiv_core/train.py", "--config", str(ROOT / "stiv_core/configs/tiny.toml"),
           *TINY, f"output_dir={killed}", "max_steps=100000", "checkpoint_every=1", "sample_every=0",
           "recipe.maskdit_until_step=-1", "recipe.task_prediction=0", "recipe.task_keyframes=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list_checkpoints(killed)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.13)  # an arbitrary moment: mid-step or mid-save
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None, "the run never wrote a checkpoint"
    target = int(resumed_from.name.split("_")[1]) + 2
    extra = ["recipe.maskdit_until_step=-1", "recipe.task_prediction=0", "recipe.task_keyframes=0",
             "checkpoint_every=100000"]
    # The config file's other keys (tiny.toml) must match the uninterrupted run's: pass it too.
    config_file = ["--config", str(ROOT / "stiv_core/configs/tiny.toml")]
    for out in (killed, tmp_path / "full"):
        subprocess.run([sys.executable, "stiv_core/train.py", *config_file, *TINY, f"output_dir={out}",
                        f"max_steps={target}", "sample_every=0", *extra], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert not list((killed / "checkpoints").glob("*.tmp*"))  # the interrupted save was cleaned up
    assert_identical(killed / f"checkpoints/step_{target:08d}", tmp_path / f"full/checkpoints/step_{target:08d}")
