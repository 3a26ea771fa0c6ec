"""The trainer end to end on a tiny model: loss goes down, the EMA model is exported, logs, samples."""
import json

import av
import numpy as np

import torch

from stiv_core.checkpoint import load_model
from stiv_core.train import train
from stiv_core.training.config import load_config
from tests.fakes import TINY_TRAINING

TINY = TINY_TRAINING


def test_loss_goes_down_on_a_tiny_overfit_run(tmp_path):
    config = load_config(None, TINY + [
        f"output_dir={tmp_path}", "max_steps=150", "checkpoint_every=1000", "data.num_samples=4",
        "optim.lr=2e-3", "optim.warmup_steps=10", "optim.ema_decay=0.9", "recipe.text_dropout=0.0",
        "recipe.image_dropout=0.0", "log_every=50"])
    result = train(config)
    # Velocity loss starts near 2 (unit noise + data); memorising 4 clips removes most of it.
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-30:]) / 30
    assert result.step == 150 and len(result.losses) == 150
    assert last < 0.7 * first, (first, last)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [50, 100, 150]
    ema_model = load_model(result.model_path)  # the exported EMA weights load as a model
    ckpt = load_model(tmp_path / "checkpoints" / "step_00000150" / "ema.safetensors")
    for a, b in zip(ema_model.state_dict().values(), ckpt.state_dict().values()):
        assert torch.equal(a, b)


def test_sample_videos_and_stand_in_mismatch(tmp_path):
    config = load_config(None, TINY + [f"output_dir={tmp_path}", "max_steps=2", "sample_every=2",
                                       "sample_steps=2", 'sample_prompts=["a red square moving up"]'])
    train(config)
    strips = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in strips] == ["step_00000002_0.png"]


def test_training_on_a_video_folder_counts_skipped_files(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, frames in (("a", 6), ("b", 6)):
        with av.open(str(videos / f"{name}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
            for i in range(frames):
                image = np.full((24, 32, 3), 20 * i, dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode(None))
        (videos / f"{name}.txt").write_text(f"clip {name}")
    (videos / "corrupt.mp4").write_bytes(b"not a video at all" * 20)
    (videos / "corrupt.txt").write_text("corrupt")
    config = load_config(None, TINY + [f"output_dir={tmp_path / 'run'}", "max_steps=3", "data.kind=video_folder",
                                       f"data.path={videos}", "batch_size=3"])
    result = train(config)  # every batch of 3 from 3 entries meets the corrupt file: never fatal
    assert result.step == 3
    assert result.skipped == [str(videos / "corrupt.mp4")]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped"] == 1


def test_bf16_gradient_checkpointing_and_adamw_train(tmp_path):
    config = load_config(None, TINY + [f"output_dir={tmp_path}", "max_steps=2", "mixed_precision=bf16",
                                       "gradient_checkpointing=true", "optim.name=adamw", "optim.warmup_steps=0"])
    result = train(config)
    assert result.step == 2 and all(0 < loss < 10 for loss in result.losses)
    trained = load_model(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors")
    assert trained.final_linear.weight.abs().sum() > 0  # zero-initialised, so it moved
