"""The main job: bundles (model + word encoder + pixel VAE) and the generate command line."""
import numpy as np
import pytest
import torch
from PIL import Image

from stiv_core import generate as cli
from stiv_core.bundle import SamplingDefaults, load_defaults, load_pipeline, save_bundle
from stiv_core.checkpoint import CheckpointError, load_model, read_metadata, save_model
from stiv_core.config import preset
from stiv_core.data.shapes import ShapeParams, render
from stiv_core.encoders.words import WordTextEncoder
from stiv_core.model.transformer import STIVTransformer
from stiv_core.video_io import read_video
from tests.fakes import randomize

VOCAB = ["a", "red", "blue", "circle", "moving", "left", "on", "background"]
DEFAULTS = SamplingDefaults(num_frames=4, height=16, width=16, fps=4.0, steps=2)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    config = preset("tiny", depth=1, hidden_size=32, num_heads=2, text_dim=32, pooled_text_dim=32, max_text_tokens=8)
    model = randomize(STIVTransformer(config))
    torch.manual_seed(0)
    words = WordTextEncoder(VOCAB, dim=32, max_tokens=8)
    path = tmp_path_factory.mktemp("bundle") / "tiny.safetensors"
    save_bundle(path, model, words, defaults=DEFAULTS, dtype=torch.float16)
    return path, model, words


def test_bundle_round_trip(bundle):
    path, model, words = bundle
    pipe = load_pipeline(path, dtype=torch.float32)
    assert load_defaults(path) == DEFAULTS
    for key, value in model.state_dict().items():
        torch.testing.assert_close(pipe.model.state_dict()[key], value.half().float())
    for key, value in words.state_dict().items():
        torch.testing.assert_close(pipe.text_encoder.state_dict()[key], value.half().float())
    # the bare model loads from a bundle too; a bare model is not a bundle
    assert isinstance(load_model(path), STIVTransformer)
    bare = path.with_name("bare.safetensors")
    save_model(bare, model)
    with pytest.raises(CheckpointError, match="without its text encoder"):
        load_pipeline(bare)


def rewrite_metadata(path, **changes):
    from safetensors import safe_open

    from stiv_core.checkpoint import save_state_dict

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_state_dict(path, tensors, {**meta, **changes})


def test_bundle_metadata_from_a_newer_version_or_malformed(bundle, tmp_path):
    import json
    import shutil

    from stiv_core.bundle import DEFAULTS_KEY
    from stiv_core.encoders.words import VOCAB_KEY

    path = tmp_path / "newer.safetensors"
    shutil.copy(bundle[0], path)
    meta = read_metadata(path)
    rewrite_metadata(path, **{DEFAULTS_KEY: json.dumps({**json.loads(meta[DEFAULTS_KEY]), "new_field": 1})})
    assert load_defaults(path) == DEFAULTS and load_pipeline(path).text_encoder.vocab == VOCAB   # unknown: dropped
    for key, bad in ((DEFAULTS_KEY, "{not json"), (DEFAULTS_KEY, "[1, 2]"), (VOCAB_KEY, json.dumps({"dim": 32}))):
        rewrite_metadata(path, **{key: bad})
        with pytest.raises(CheckpointError, match=f"unreadable '{key}' metadata"):
            load_defaults(path) if key == DEFAULTS_KEY else load_pipeline(path)
        rewrite_metadata(path, **{key: meta[key]})


def run(args):
    """The command's exit status: 0 from main, or the status a user error exits with (2)."""
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as exit:
        return exit.code


def test_t2v_writes_a_video_with_the_model_defaults(bundle, tmp_path):
    path, *_ = bundle
    out = tmp_path / "t2v.gif"
    assert run(["--model", path, "--prompt", "a red circle moving left", "--out", out, "--seed", 1]) == 0
    assert read_video(out).shape == (3, 4, 16, 16)


def shape_image(path, params):
    """The first frame of a shapes clip written as a 16x16 PNG; returns its uint8 `(H, W, 3)` pixels."""
    frame = render(params, 1, 16, 16)[:, 0]
    image = ((frame.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    Image.fromarray(image).save(path)
    return image


def test_ti2v_keeps_the_image_and_long_video_and_upsampling_have_their_lengths(bundle, tmp_path):
    path, *_ = bundle
    image = shape_image(tmp_path / "first.png", ShapeParams("circle", "red", "blue", "left"))
    assert run(["--model", path, "--prompt", "a red circle", "--image", tmp_path / "first.png",
                "--out", tmp_path / "ti2v.webp"]) == 0
    video = read_video(tmp_path / "ti2v.webp")
    assert np.array_equal(((video[:, 0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), image)
    assert run(["--model", path, "--prompt", "red", "--keyframes", 2, "--keyframe-stride", 3,
                "--temporal-upsample", 2, "--out", tmp_path / "long"]) == 0
    assert len(list((tmp_path / "long").glob("*.png"))) == 2 * ((2 - 1) * 3 + 1) - 1


def test_a_long_videos_last_image_is_its_last_keyframe(bundle, tmp_path):
    # the condition belongs to the keyframe pass: --last-image goes to keyframe K-1, the video's last frame
    path, *_ = bundle
    image = shape_image(tmp_path / "last.png", ShapeParams("square", "red", "blue", "up"))
    assert run(["--model", path, "--prompt", "a red square", "--last-image", tmp_path / "last.png",
                "--frames", 2, "--keyframes", 4, "--keyframe-stride", 3, "--out", tmp_path / "long"]) == 0
    frames = sorted((tmp_path / "long").glob("*.png"))
    assert len(frames) == (4 - 1) * 3 + 1
    assert np.array_equal(np.asarray(Image.open(frames[-1])), image)
    assert not np.array_equal(np.asarray(Image.open(frames[3 * 3 - 3])), image)


def test_the_plan_covers_a_long_videos_keyframe_pass(bundle):
    path, *_ = bundle
    args = cli.build_parser().parse_args(["--prompt", "red", "--out", "x.gif", "--frames", "4", "--keyframes", "8",
                                          "--keyframe-stride", "3"])
    assert cli.run_shape(cli.make_job(args, path), 1).frames == 8       # keyframes > --frames
    args = cli.build_parser().parse_args(["--prompt", "red", "--out", "x.gif", "--frames", "4", "--keyframes", "2",
                                          "--keyframe-stride", "7"])
    assert cli.run_shape(cli.make_job(args, path), 1).frames == 8       # an interpolation window of stride + 1


@pytest.mark.parametrize("extra,message", [
    (["--out", "x.avi"], "supported outputs"),
    (["--keyframes", "1"], "at least 2 keyframes"),
    (["--image", "missing.png"], "no such file"),
    (["--frames", "5"], "multiple of 2"),
    (["--height", "18"], "multiples of 4"),
    (["--keyframes", "3"], "must be multiples of 2"),                       # before the model loads
    (["--image", "a.png", "--condition-frames", "b.png"], "a task of its own"),
    (["--keyframes", "4", "--condition-frames", "b.png"], "a stride apart"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(bundle, tmp_path, capsys, extra, message):
    path, *_ = bundle
    args = ["--model", path, "--prompt", "red", "--out", tmp_path / "x.gif", *extra]
    assert run(args) == 2
    assert message in capsys.readouterr().err


def test_unknown_models_and_words(bundle, tmp_path, capsys, caplog):
    path, *_ = bundle
    assert run(["--model", tmp_path / "nope.safetensors", "--prompt", "x", "--out", tmp_path / "x.gif"]) == 2
    assert "no model file" in capsys.readouterr().err
    assert run(["--model", path, "--prompt", "a red zebra", "--out", tmp_path / "z.gif"]) == 0
    assert "zebra" in caplog.text


def test_plan_only_prints_the_plan_without_sampling(bundle, tmp_path, capsys):
    path, *_ = bundle
    assert run(["--model", path, "--prompt", "red", "--out", tmp_path / "never.gif", "--plan-only",
                "--quant", "fp8-scaled", "--block-swap", "auto"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: fits" in out and "VAE decode" in out and not (tmp_path / "never.gif").exists()


@pytest.mark.parametrize("extra", [["--quant", "fp8-scaled"], ["--block-swap", "1"], ["--attention", "math"],
                                   ["--device", "cuda"]])
def test_low_vram_options_run_on_the_cpu(bundle, tmp_path, extra, caplog):
    path, *_ = bundle
    out = tmp_path / "frames"
    assert run(["--model", path, "--prompt", "a red circle", "--out", out, *extra]) == 0
    assert len(list(out.glob("*.png"))) == 4
    if extra[0] == "--device" and not torch.cuda.is_available():
        assert "using the CPU" in caplog.text


def test_swapped_and_resident_runs_make_the_same_video(bundle, tmp_path):
    path, *_ = bundle
    for name, extra in (("resident", []), ("swapped", ["--block-swap", "1"])):
        assert run(["--model", path, "--prompt", "a red circle", "--out", tmp_path / name, *extra]) == 0
    a = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "resident").glob("*.png"))]
    b = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "swapped").glob("*.png"))]
    assert len(a) == len(b) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_run_that_cannot_fit_says_so(bundle, tmp_path, capsys, monkeypatch):
    from stiv_core.memory.planner import Budget

    path, *_ = bundle
    monkeypatch.setattr(Budget, "probe", classmethod(lambda cls, device: cls(1024, 1 << 34, "cpu")))
    assert run(["--model", path, "--prompt", "red", "--out", tmp_path / "x.gif"]) == 2
    assert "DOES NOT FIT" in capsys.readouterr().err
