"""TensorBoard logs when tensorboard is installed (requirements-dev.txt installs it for CI)."""
import pytest

from stiv_core.train import train
from stiv_core.training.config import load_config
from tests.fakes import TINY_TRAINING as TINY

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_loss_and_lr_are_logged_to_tensorboard(tmp_path):
    config = load_config(None, TINY + [f"output_dir={tmp_path}", "max_steps=4", "log_every=2",
                                       "checkpoint_every=1000"])
    result = train(config)
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = event_accumulator.EventAccumulator(str(event_files[0].parent))
    events.Reload()
    assert {"loss", "lr", "skipped"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [2, 4]
    assert [e.value for e in losses] == pytest.approx([result.losses[1], result.losses[3]], rel=1e-6)
