"""Every command line over a table of bad inputs: exit status 2, ONE line `error: ...` that names what was
wrong, no traceback, and for generate / evaluate before the model's weights load (the recorded config,
read from the file's header, is enough to judge sizes and frame counts)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stiv_core.generate as generate
import stiv_core.train as trainer
from stiv_core import bundle, convert, evaluate
from stiv_core.data import prepare
from stiv_core.model.transformer import _nearest_multiples

ROOT = Path(__file__).resolve().parents[1]
TINY_TOML = str(ROOT / "stiv_core/configs/tiny.toml")
GEN = ["--prompt", "a red circle", "--out", "{tmp}/x.gif"]   # the built-in tiny model: 16 frames, 32x32, patch 4 / 2

ROWS = [
    # generate: issue 22
    ("generate", GEN + ["--fps", "-1"], r"--fps: -1: must be a number > 0"),
    ("generate", GEN + ["--fps", "nan"], r"--fps: 'nan' is not a finite number"),
    ("generate", GEN + ["--fps", "0"], r"--fps: 0: must be a number > 0"),
    ("generate", ["--prompt", "x", "--out", "{tmp}/afile/x.gif"], r"cannot write .*afile' is a file, not a folder"),
    ("generate", ["--prompt", "x", "--out", "{tmp}/afile"], r"afile' is a file; give a folder"),
    ("generate", GEN + ["--device", "bogus"], r"unknown device 'bogus'; available here: cpu, cuda"),
    ("generate", GEN + ["--device", "meta"], r"device 'meta' is not supported; available here: cpu"),
    # generate: issue 24, zeros and negatives
    ("generate", GEN + ["--frames", "0"], r"--frames: 0: must be a whole number >= 1"),
    ("generate", GEN + ["--frames", "-1"], r"--frames: -1: must be a whole number >= 1"),
    ("generate", GEN + ["--steps", "0"], r"--steps: 0: must be a whole number >= 1"),
    ("generate", GEN + ["--steps", "-1"], r"--steps: -1: must be a whole number >= 1"),
    ("generate", GEN + ["--width", "0"], r"--width: 0: must be a whole number >= 1"),
    ("generate", GEN + ["--height", "0"], r"--height: 0: must be a whole number >= 1"),
    ("generate", GEN + ["--upscale", "-3"], r"--upscale: -3: must be a whole number >= 1"),
    ("generate", GEN + ["--upscale", "0"], r"--upscale: 0: must be a whole number >= 1"),
    ("generate", GEN + ["--shift", "0"], r"--shift: 0: must be a number > 0"),
    ("generate", GEN + ["--shift", "-2"], r"--shift: -2: must be a number > 0"),
    ("generate", GEN + ["--keyframe-stride", "0", "--keyframes", "2"], r"--keyframe-stride: 0: must be a whole number"),
    ("generate", GEN + ["--seed", "-1"], r"--seed: -1: must be a whole number >= 0"),
    ("generate", GEN + ["--scale", "inf"], r"--scale: 'inf' is not a finite number"),
    ("generate", GEN + ["--steps", "ten"], r"--steps: 'ten' is not a number"),
    ("generate", GEN + ["--block-swap", "-1"], r"block_swap must be a block count >= 0 or 'auto'"),
    # generate: issue 24, checked against the recorded config before the weights load
    ("generate", GEN + ["--frames", "15"], r"15 latent frames do not fit temporal patch 2: .*\(e\.g\. 14 or 16\)"),
    ("generate", GEN + ["--width", "33"], r"33x32 px: width and height must be multiples of 4 .*e\.g\. 32x32"),
    ("generate", GEN + ["--frames", "2", "--temporal-upsample", "2"], r"temporal upsampling needs an even window"),
    ("generate", GEN + ["--keyframes", "3"], r"must be multiples of 2"),
    ("generate", GEN + ["--keyframes", "1"], r"at least 2 keyframes"),
    ("generate", GEN + ["--image", "{tmp}/missing.png"], r"(?i)no such file"),
    ("generate", ["--prompt", "x", "--out", "{tmp}/x.avi"], r"supported outputs"),
    ("generate", GEN + ["--model", "{tmp}/none.safetensors"], r"no model file"),
    ("generate", GEN + ["--guidance", "bogus"], r"--guidance: invalid choice"),
    # evaluate
    ("evaluate", ["--seeds", "0"], r"--seeds: 0: must be a whole number >= 1"),
    ("evaluate", ["--steps", "0"], r"--steps: 0: must be a whole number >= 1"),
    ("evaluate", ["--limit", "-1"], r"--limit: -1: must be a whole number >= 1"),
    ("evaluate", ["--keyframes", "3"], r"keyframe count \(3\) .* must be multiples of 2"),
    ("evaluate", ["--keyframe-stride", "0"], r"--keyframe-stride: 0: must be a whole number >= 1"),
    ("evaluate", ["--guidance", "bogus"], r"--guidance: invalid choice"),
    ("evaluate", ["--json", "{tmp}/afile/r.json"], r"cannot write .*afile' is a file, not a folder"),
    ("evaluate", ["--prompts", "{tmp}/missing.txt"], r"(?i)no such file"),
    ("evaluate", ["--prompts", "{tmp}/empty.txt"], r"no captions in it"),
    # convert
    ("convert", ["pixart", "{tmp}/missing.safetensors", "--out", "{tmp}/o.safetensors"], r"does not exist"),
    ("convert", ["pixart", "{tmp}/afile", "--out", "{tmp}/o.safetensors", "--heads", "0"], r"--heads: 0: must be"),
    ("convert", ["pixart", "{tmp}/afile", "--out", "{tmp}/o.safetensors"], r"not a safetensors file"),
    ("convert", ["pixart"], r"required: src|the following arguments are required"),
    # data.prepare
    ("prepare", ["{tmp}/missing", "{tmp}/out"], r"src_dir .*missing' is not a folder"),
    ("prepare", ["{tmp}", "{tmp}/afile"], r"afile' is a file; give a folder"),
    ("prepare", ["{tmp}", "{tmp}/out", "--min-frames", "-1"], r"--min-frames: -1: must be a whole number >= 0"),
    ("prepare", ["{tmp}", "{tmp}/out", "--max-motion", "0"], r"--max-motion: 0: must be a number > 0"),
    # train.py
    ("train", ["--config", TINY_TOML, "output_dir={tmp}/afile"], r"output_dir: .*afile' is a file"),
    ("train", ["--config", TINY_TOML, "output_dir={tmp}/afile/run"], r"output_dir: cannot write"),
    ("train", ["--config", TINY_TOML, "output_dir={tmp}/run", "max_steps=0"], r"max_steps must be >= 1, got 0"),
    ("train", ["--config", TINY_TOML, "output_dir={tmp}/run", "lr=1"], r"unknown config key 'lr'"),
    ("train", ["--config", "{tmp}/missing.toml", "output_dir={tmp}/run"], r"missing\.toml"),
    # found while building (the VAE's factor is known once it is built): one line too, before any step
    ("train", ["--config", TINY_TOML, "output_dir={tmp}/run", "data.buckets=[[4, 18, 18]]"],
     r"data\.buckets: 18x18 px is not a multiple of 4"),
]
MAINS = {"generate": generate.main, "evaluate": evaluate.main, "convert": convert.main, "prepare": prepare.main,
         "train": trainer.main}


@pytest.fixture
def no_weights(monkeypatch):
    """generate / evaluate must judge these without loading a model's weights, trainer rows without a step."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad input")
    for module in (generate, evaluate, bundle):
        monkeypatch.setattr(module, "load_pipeline", refuse, raising=False)
    monkeypatch.setattr(trainer, "train_step", refuse)


@pytest.mark.parametrize("command,argv,expected", ROWS, ids=[f"{c}:{' '.join(a[-2:])}" for c, a, _ in ROWS])
def test_a_bad_input_is_one_line_and_exit_status_2(command, argv, expected, tmp_path, capsys, no_weights):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "empty.txt").write_text("\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exited:
        MAINS[command](argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert re.search(expected, errors[0]), errors[0]
    assert "e.g. )" not in err and "(e.g. )" not in err


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="unknown device"):
        generate.main(["--prompt", "x", "--out", str(tmp_path / "x.gif"), "--device", "bogus", "--debug"])


def test_a_size_suggestion_is_never_empty():
    assert _nearest_multiples(-1, 2) == [2] and _nearest_multiples(0, 4) == [4] and _nearest_multiples(7, 2) == [6, 8]


def test_a_missing_output_folder_is_created_and_said(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "x.gif"
    generate.main(["--prompt", "x", "--out", str(out), "--plan-only"])   # a plan creates nothing
    assert not out.parent.exists()
    args = generate.build_parser().parse_args(["--prompt", "x", "--out", str(out)])
    generate.make_job(args, bundle.resolve_model_path("tiny"))
    assert out.parent.is_dir() and f"created the folder {out.parent}" in capsys.readouterr().err


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("module,argv", [
    ("stiv_core.generate", ["--prompt", "x", "--out", "{tmp}/x.gif", "--fps", "-1"]),
    ("stiv_core.generate", ["--prompt", "x", "--out", "{tmp}/x.gif", "--device", "bogus"]),
    ("stiv_core.generate", ["--prompt", "x", "--out", "{tmp}/x.gif", "--frames", "15"]),
])
def test_the_real_command_line_prints_one_line(module, argv, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "memory plan" not in proc.stdout.lower() and not proc.stdout.strip()
