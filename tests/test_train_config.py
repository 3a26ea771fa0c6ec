"""The trainer's TOML config: validated before anything is built, with messages naming the field."""
import subprocess
import sys
from pathlib import Path

import pytest

from stiv_core.training.config import (ConfigError, DataKind, OptimizerKind, TrainConfig, build_config,
                                       load_config, valid_keys)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "stiv_core" / "configs").glob("*.toml"))


def test_required_keys_exist_under_their_names():
    for key in ("output_dir", "max_steps", "batch_size", "seed", "checkpoint_every", "resume"):
        assert key in valid_keys()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.model.hidden_size % config.model.num_heads == 0


def test_shipped_configs_cover_the_stages():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "t2i", "t2v", "stiv", "xl_finetune"} <= names


def test_overrides_are_parsed_as_toml_values(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "max_steps=7", "optim.lr=1e-4", "resume=false",
                                "optim.name=adamw", "data.buckets=[[4, 8, 8]]", "model.depth=2"])
    assert (config.max_steps, config.optim.lr, config.resume) == (7, 1e-4, False)
    assert config.optim.name is OptimizerKind.ADAMW
    assert config.data.buckets == ((4, 8, 8),) and config.data.kind is DataKind.SQUARES
    assert config.model.depth == 2 and config.model.name == "tiny"


@pytest.mark.parametrize("override, field", [
    ("optim.lr=-1", "optim.lr"),
    ("batch_size=0", "batch_size"),
    ("max_steps=2.5", "max_steps"),
    ("resume=maybe", "resume"),
    ("optim.name=sgd", "name"),
    ("recipe.text_dropout=1.5", "recipe.text_dropout"),
    ("recipe.task_t2v=-1", "recipe.task_"),
    ("data.buckets=[[5, 8, 8]]", "data.buckets"),      # 5 frames do not fit temporal patch 2
    ("recipe.maskdit_ratio=0.5", "recipe.maskdit_ratio"),  # needs maskdit_extra_blocks
    ("model.num_heads=3", "num_heads"),
    ("data.kind=video_folder", "data.path"),
])
def test_bad_values_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"output_dir={tmp_path}", override])
    assert field in str(err.value)


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'.*optim.lr"):
        load_config(None, [f"output_dir={tmp_path}", "learning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.betas'\].*optim.beta1"):
        build_config({"output_dir": str(tmp_path), "optim": {"betas": [0.9, 0.99]}})
    with pytest.raises(ConfigError, match="output_dir is required"):
        build_config({})


def test_bad_toml_file_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("output_dir = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_rejects_a_bad_value_before_training(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "stiv_core/train.py", "--config", str(CONFIGS[0]),
                           f"output_dir={out}", "optim.warmup_steps=-3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.warmup_steps" in proc.stderr
    assert not out.exists()  # nothing was built or written
