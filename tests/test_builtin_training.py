"""The built-in model's path end to end: train on the shapes domain -> bundle -> the generate command."""
import json
from pathlib import Path

import pytest
import torch

from stiv_core import evaluate
from stiv_core import generate as cli
from stiv_core.bundle import load_defaults, load_pipeline
from stiv_core.data.shapes import VOCABULARY
from stiv_core.train import train
from stiv_core.training.encoders import build_encoders
from stiv_core.training.config import load_config

pytestmark = pytest.mark.slow  # subprocesses / real training runs (CI runs them; -m 'not slow' skips)

CONFIG = str(Path(__file__).resolve().parents[1] / "stiv_core" / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    overrides = [f'output_dir="{out}"', "max_steps=3", "batch_size=2", "resume=false", "sample_every=0",
                 "checkpoint_every=2", "model.depth=1", "model.hidden_size=32", "model.num_heads=2",
                 "model.text_dim=32", "model.pooled_text_dim=32", "data.buckets=[[4, 16, 16]]"]
    return train(load_config(CONFIG, overrides))


def test_the_shipped_config_trains_and_exports_a_bundle(trained):
    assert trained.step == 3 and all(torch.isfinite(torch.tensor(trained.losses)))
    pipe = load_pipeline(trained.model_path)  # float32 by default: CPUs without native float16 run it far slower
    assert pipe.model.patch_embed.weight.dtype == torch.float32
    assert pipe.model.config.prediction == "data" and pipe.text_encoder.vocab == list(VOCABULARY)
    assert load_pipeline(trained.model_path, dtype=None).model.patch_embed.weight.dtype == torch.float16
    defaults = load_defaults(trained.model_path)
    assert (defaults.num_frames, defaults.height, defaults.width) == (4, 16, 16)


def test_every_process_and_every_resume_builds_the_same_word_encoder(trained):
    config = load_config(CONFIG, ["model.text_dim=32", "model.pooled_text_dim=32"])
    first, _ = build_encoders(config)
    second, _ = build_encoders(config)
    shipped = load_pipeline(trained.model_path).text_encoder
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])
        assert torch.equal(value.half().float(), shipped.state_dict()[key])  # shipped as float16
    assert not any(p.requires_grad for p in first.parameters())  # frozen: the model learns on top


def test_a_finetune_reads_text_with_the_encoder_saved_in_its_init_bundle(trained, tmp_path):
    """init.path's bundle brings its word encoder: another seed must not swap in a different one."""
    shipped = load_pipeline(trained.model_path).text_encoder
    base = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.text_dim=32",
            "model.pooled_text_dim=32", "seed=7"]
    fresh, _ = build_encoders(load_config(CONFIG, base))
    config = load_config(CONFIG, base + ['init.kind="full"', f'init.path="{trained.model_path}"'])
    kept, _ = build_encoders(config)
    state = kept.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in shipped.state_dict().items())
    assert not all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())  # the seed does matter
    assert not any(p.requires_grad for p in kept.parameters())
    out = tmp_path / "finetune"
    result = train(load_config(CONFIG, base + ['init.kind="full"', f'init.path="{trained.model_path}"',
                                               f'output_dir="{out}"', "max_steps=1", "batch_size=2",
                                               "sample_every=0", "data.buckets=[[4, 16, 16]]"]))
    exported = load_pipeline(result.model_path).text_encoder.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in shipped.state_dict().items())


def test_generate_runs_the_exported_bundle(trained, tmp_path):
    out = tmp_path / "frames"  # PNGs: GIF merges identical frames, which an untrained model makes
    assert cli.main(["--model", str(trained.model_path), "--prompt", "a red circle moving left on a blue background",
                     "--steps", "2", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 4


def test_shapes_bench_runs_a_bundle_and_writes_its_json(trained, tmp_path):
    out = tmp_path / "bench.json"
    results = evaluate.main(["--model", str(trained.model_path), "--limit", "2", "--steps", "2", "--keyframes", "2",
                             "--keyframe-stride", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    rows = saved.pop("rows")   # and one row per video: 2 prompts x 4 tasks
    assert saved == results
    assert [(row["task"], row["seed"]) for row in rows] == [(t, s) for t in ("t2v", "ti2v", "interp", "long")
                                                            for s in (0, 1)]
    for key in ("color_acc", "shape_acc", "direction_acc"):
        assert 0.0 <= saved["t2v"][key] <= 1.0
    assert saved["ti2v"]["frame0_psnr"] >= 99  # pixel space + frame replacement: frame 0 is exact
    assert saved["interp"]["endpoint_psnr"] >= 99 and saved["long"]["frames"] == 4
    assert set(saved["interp"]) >= {"endpoint_psnr", "monotone_rate"} and "color_drift" in saved["long"]
    assert saved["seconds_per_video"] > 0


def test_training_samples_are_videos_and_strips_of_the_same_frames(trained, tmp_path):
    from stiv_core.training.samples import write_samples
    from stiv_core.video_io import read_video

    config = load_config(CONFIG, [f'output_dir="{tmp_path}"', "sample_steps=2", "model.depth=1", "model.hidden_size=32",
                                  "model.num_heads=2", "model.text_dim=32", "model.pooled_text_dim=32",
                                  "data.buckets=[[4, 16, 16]]"])
    pipe = load_pipeline(trained.model_path)
    paths = write_samples(pipe.model, pipe.text_encoder, pipe.vae, config, step=7)
    assert [p.name for p in paths] == ["step_00000007_0.mp4", "step_00000007_1.mp4"]
    video = read_video(paths[0])
    assert video.shape == (3, 4, 256, 256)  # upscaled for viewing
    assert (tmp_path / "samples" / "step_00000007_0.png").is_file()
