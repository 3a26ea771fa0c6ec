"""Resume is bit-identical to an uninterrupted run, also after a SIGKILL at an arbitrary moment."""
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file

import stiv_core.train as trainer
from stiv_core.checkpoint import save_state_dict
from stiv_core.train import train
from stiv_core.training.config import ConfigError, load_config
from stiv_core.training.state import list_checkpoints, usable_checkpoint
from tests.legacy_checkpoint import rewrite_as_legacy

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


@pytest.mark.slow  # a subprocess
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
    resumed_from = usable_checkpoint(killed)[0]
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


def test_a_checkpoint_in_the_legacy_format_resumes_bit_identically(tmp_path):
    full = run(tmp_path / "full", "max_steps=6", "checkpoint_every=2")
    run(tmp_path / "split", "max_steps=4", "checkpoint_every=2")
    rewrite_as_legacy(tmp_path / "split/checkpoints/step_00000004", load_config(None, TINY + ["output_dir=x"]))
    second = run(tmp_path / "split", "max_steps=6", "checkpoint_every=2")
    assert second.losses == full.losses[4:]
    assert_identical(tmp_path / "full/checkpoints/step_00000006", tmp_path / "split/checkpoints/step_00000006")


class ScaledAccelerator(Accelerator):
    """accelerate keeps no GradScaler on the CPU (fp16 autocast needs a GPU there: `scaler` stays None);
    this one has a CPU GradScaler, so the trainer's fp16 path runs here: scaled backward, unscale before
    clipping, the scaler's step and update. The scale doubles after every 3 good steps, so at step 4 it
    is 2048 with a growth tracker of 1; a scaler that started afresh there ends elsewhere (and so do the
    weights: gradients that small round differently under another scale)."""

    INIT_SCALE = 1024.0
    made: list[torch.amp.GradScaler] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=self.INIT_SCALE, growth_interval=3)
        ScaledAccelerator.made.append(self.scaler)


def scaler_state(checkpoint: Path) -> dict:
    with safe_open(str(checkpoint / "state.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["scaler"])


def test_fp16_grad_scaler_state_is_saved_and_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "Accelerator", ScaledAccelerator)
    full = run(tmp_path / "full", "max_steps=6", "checkpoint_every=2")
    run(tmp_path / "split", "max_steps=4", "checkpoint_every=2")
    saved = scaler_state(tmp_path / "split/checkpoints/step_00000004")
    assert saved == ScaledAccelerator.made[-1].state_dict()  # what the live scaler held at step 4
    assert (saved["scale"], saved["_growth_tracker"]) == (2048.0, 1)
    second = run(tmp_path / "split", "max_steps=6", "checkpoint_every=2")
    assert second.losses == full.losses[4:]
    assert_identical(tmp_path / "full/checkpoints/step_00000006", tmp_path / "split/checkpoints/step_00000006")
    ended = [scaler_state(tmp_path / f"{run}/checkpoints/step_00000006") for run in ("full", "split")]
    assert ended[0] == ended[1] == ScaledAccelerator.made[-1].state_dict()
    assert (ended[0]["scale"], ended[0]["_growth_tracker"]) == (4096.0, 0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_step_saves_a_consistent_checkpoint_after_that_step(tmp_path, monkeypatch, signum):
    # The signal lands after optimizer.step() but before the step counter moves: the checkpoint must hold
    # that whole step (model, EMA, optimizer and counter agreeing), so resuming equals never stopping.
    full = run(tmp_path / "full", "max_steps=5", "checkpoint_every=100")
    step_once = trainer.train_step

    def signalled(accelerator, model, optimizer, scheduler, batch, config, step):
        loss = step_once(accelerator, model, optimizer, scheduler, batch, config, step)
        if step == 2:
            os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(trainer, "train_step", signalled)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", "max_steps=5", "checkpoint_every=100")
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000003"]
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers   # the caller's handlers are back
    monkeypatch.undo()
    second = run(tmp_path / "split", "max_steps=5", "checkpoint_every=100")
    assert second.losses == full.losses[3:]
    assert_identical(tmp_path / "full/checkpoints/step_00000005", tmp_path / "split/checkpoints/step_00000005")


def test_the_command_line_stops_quietly_with_the_signal_status(tmp_path, monkeypatch, caplog):
    # `python stiv_core/train.py` asked to stop: the checkpoint, one line saying how to resume, exit status
    # 128 + signal (what shells and schedulers expect), and no KeyboardInterrupt traceback.
    step_once = trainer.train_step

    def signalled(accelerator, model, optimizer, scheduler, batch, config, step):
        loss = step_once(accelerator, model, optimizer, scheduler, batch, config, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(trainer, "train_step", signalled)
    config = tmp_path / "run.toml"
    config.write_text("max_steps = 5\ncheckpoint_every = 100\n")
    with pytest.raises(SystemExit) as exited:
        trainer.main(["--config", str(config), *TINY, f"output_dir={tmp_path / 'cli'}"])
    assert exited.value.code == 128 + signal.SIGTERM
    assert exited.value.__suppress_context__   # `from None`: no chained KeyboardInterrupt printed
    assert [p.name for p in list_checkpoints(tmp_path / "cli")] == ["step_00000002"]
    assert any("at step 2" in r.getMessage() and "resumes" in r.getMessage() for r in caplog.records)


def test_a_step_the_grad_scaler_skipped_moves_neither_the_schedule_nor_the_ema(tmp_path, monkeypatch):
    # fp16 on a GPU: GradScaler skips an optimizer step whose gradients overflowed. Simulated on the CPU by
    # reporting steps 1 and 2 as skipped (the optimizer itself still runs here).
    from accelerate import Accelerator

    skipped_steps, current = {1, 2}, {"step": None}
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped",
                        property(lambda self: current["step"] in skipped_steps))
    step_once = trainer.train_step
    lrs, updates = [], []

    def recorded(accelerator, model, optimizer, scheduler, batch, config, step):
        current["step"] = step
        loss = step_once(accelerator, model, optimizer, scheduler, batch, config, step)
        lrs.append(scheduler.get_last_lr()[0])
        return loss

    monkeypatch.setattr(trainer.EMA, "update", lambda self, model: updates.append(current["step"]))
    monkeypatch.setattr(trainer, "train_step", recorded)
    run(tmp_path, "max_steps=5", "checkpoint_every=100")
    assert lrs[0] == lrs[1] == lrs[2] < lrs[3]   # the warmup holds still on the two skipped steps
    assert updates == [0, 3, 4]                           # and the EMA takes no update from them


def test_resuming_on_another_process_count_warns_that_the_data_order_shifts(tmp_path, caplog):
    run(tmp_path, "max_steps=2", "checkpoint_every=100")
    checkpoint = tmp_path / "checkpoints/step_00000002"
    with safe_open(str(checkpoint / "state.safetensors"), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(metadata["trainer"])["world"] == 1
    save_state_dict(checkpoint / "state.safetensors", tensors,
                    {**metadata, "trainer": json.dumps({**json.loads(metadata["trainer"]), "world": 4})})
    with caplog.at_level("WARNING", logger="stiv_core.train"):
        run(tmp_path, "max_steps=3", "checkpoint_every=100")
    assert "resumed on 1 process(es) from a checkpoint written by 4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stiv_core.train"):
        run(tmp_path, "max_steps=4", "checkpoint_every=100")   # its own checkpoint: no warning
    assert "written by" not in caplog.text


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def damage(step_dir: Path, how: str) -> None:
    """A bad disk or an interrupted copy: a truncated file, or a step folder whose files never arrived."""
    if how == "empty":
        for f in step_dir.iterdir():
            f.unlink()
    else:
        truncate(step_dir / f"{how}.safetensors")


@pytest.mark.parametrize("how", ["model", "state", "ema", "empty"])
def test_resume_skips_a_damaged_newest_checkpoint_bit_identically(tmp_path, caplog, how):
    """Resuming past a damaged step_4 = resuming from step_2 directly; step_4 is logged, kept, not deleted."""
    run(tmp_path / "damaged", "max_steps=4", "checkpoint_every=2")
    direct = tmp_path / "direct"
    shutil.copytree(tmp_path / "damaged", direct)
    shutil.rmtree(direct / "checkpoints/step_00000004")
    damage(tmp_path / "damaged/checkpoints/step_00000004", how)
    assert usable_checkpoint(tmp_path / "damaged")[0].name == "step_00000002"
    with caplog.at_level("WARNING", logger="stiv_core.train"):
        resumed = run(tmp_path / "damaged", "max_steps=6", "checkpoint_every=2")
    assert f"skipping the damaged checkpoint step_00000004 ({how if how != 'empty' else 'model'}" in caplog.text
    again = run(direct, "max_steps=6", "checkpoint_every=2")
    assert resumed.losses == again.losses and len(resumed.losses) == 4
    assert_identical(tmp_path / "damaged/checkpoints/step_00000006", direct / "checkpoints/step_00000006")
    assert (tmp_path / "damaged/checkpoints/step_00000004.damaged").is_dir()   # kept aside when step 4 was saved again


def test_no_usable_checkpoint_is_one_clear_error(tmp_path):
    run(tmp_path, "max_steps=2", "checkpoint_every=1", "keep_last=2")
    for step in (1, 2):
        truncate(tmp_path / f"checkpoints/step_{step:08d}/model.safetensors")
    with pytest.raises(ConfigError, match="no usable checkpoint to resume from .*step_00000002: model.safetensors "
                                          "truncated.*another output_dir"):
        run(tmp_path, "max_steps=3")
    assert len(list_checkpoints(tmp_path)) == 2   # nothing deleted


def test_an_output_dir_that_is_a_file_or_under_one_fails_before_any_work(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(trainer, "Accelerator", lambda *a, **k: built.append(1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="output_dir: .*afile' is a file"):
        run(afile)
    with pytest.raises(ConfigError, match="output_dir: cannot write .*afile' is a file, not a folder"):
        run(afile / "sub")
    assert not built


def test_a_read_only_output_dir_fails_before_any_work(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(trainer, "Accelerator", lambda *a, **k: built.append(1))
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as root: chmod does not stop writing (a path under a file is tested instead)")
        with pytest.raises(ConfigError, match="output_dir: cannot write .*not writable"):
            run(readonly / "run")
    finally:
        readonly.chmod(0o700)
    assert not built


@pytest.mark.slow  # a subprocess
def test_the_command_line_reports_a_damaged_run_in_one_line(tmp_path):
    run(tmp_path, "max_steps=1")
    truncate(tmp_path / "checkpoints/step_00000001/state.safetensors")
    proc = subprocess.run([sys.executable, "stiv_core/train.py", "--config", str(ROOT / "stiv_core/configs/tiny.toml"),
                           *TINY, f"output_dir={tmp_path}", "max_steps=2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no usable checkpoint to resume from")
