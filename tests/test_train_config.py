"""The trainer's TOML config: validated before anything is built, with messages naming the field."""
import subprocess
import sys
from pathlib import Path

import tomllib

import pytest
import torch

from stiv_core.checkpoint import save_state_dict
from stiv_core.config import STIVConfig, preset
from stiv_core.data.config import DataKind
from stiv_core.training.config import (ConfigError, InitKind, OptimizerKind, TrainConfig, build_config,
                                       load_config, valid_keys)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "stiv_core" / "configs").glob("*.toml"))


def test_required_keys_exist_under_their_names():
    for key in ("output_dir", "max_steps", "batch_size", "seed", "checkpoint_every", "resume"):
        assert key in valid_keys()


def record(path, config: STIVConfig) -> str:
    """A file that records `config` as a converted or trained checkpoint does (config only: no tensors)."""
    save_state_dict(path, {}, {"format": "stiv", "stiv_config": config.to_json()})
    return str(path)


# What `python -m stiv_core.convert pixart PixArt-Sigma-XL-2-512-MS.safetensors --preset XL
# --maskdit-extra-blocks 2` records: PixArt's 16 heads of 72 and Sigma's 300 text tokens.
SIGMA_XL = preset("XL", num_heads=16, max_text_tokens=300, maskdit_extra_blocks=2)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path):
    with open(path, "rb") as f:
        init = tomllib.load(f).get("init", {})
    overrides = []
    shipped_source = init.get("path") and Path(init["path"]).is_file()  # e.g. tiny_mv.toml: the built-in model
    if init.get("kind", "none") != "none" and not shipped_source:  # the stage's source, as converted from PixArt-Sigma
        source = SIGMA_XL.replace(temporal_patch=1 if init["kind"] == "t2i" else 2)
        overrides = [f"init.path={record(tmp_path / 'init.safetensors', source)}"]
    config = load_config(path, overrides)
    assert isinstance(config, TrainConfig)
    assert config.model.hidden_size % config.model.num_heads == 0
    if overrides:
        assert (config.model.num_heads, config.model.max_text_tokens, config.model.maskdit_extra_blocks) == (16, 300, 2)
        assert config.model.temporal_patch == 2 and config.model.name == "XL"


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


@pytest.mark.slow  # a subprocess
def test_cli_rejects_a_bad_value_before_training(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "stiv_core/train.py", "--config", str(CONFIGS[0]),
                           f"output_dir={out}", "optim.warmup_steps=-3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.warmup_steps" in proc.stderr
    assert not out.exists()  # nothing was built or written


class TestModelFromTheInitCheckpoint:
    """[model] takes the shape an [init] checkpoint records; a conflicting explicit value is an error."""

    SOURCE = preset("tiny", num_heads=8, max_text_tokens=12, maskdit_extra_blocks=1,
                    rope_position_scale=(1.0, 0.5, 0.5))

    def load(self, tmp_path, *overrides, kind="full", source=None):
        path = record(tmp_path / "init.safetensors", source or self.SOURCE)
        return load_config(None, [f"output_dir={tmp_path}", f"init.kind={kind}", f"init.path={path}", *overrides])

    def test_the_recorded_shape_replaces_the_presets(self, tmp_path):
        for preset_override in ((), ("model.preset=tiny",)):
            model = self.load(tmp_path, *preset_override).model
            assert model == self.SOURCE  # heads, tokens, MaskDiT blocks and the RoPE scale: the file's
        assert self.load(tmp_path, "model.num_heads=8", "model.max_text_tokens=12").model == self.SOURCE

    def test_what_is_not_a_weight_may_be_set(self, tmp_path):
        model = self.load(tmp_path, "model.rope_position_scale=[0.5, 0.25, 0.25]").model
        assert model.rope_position_scale == (0.5, 0.25, 0.25) and model.num_heads == 8

    @pytest.mark.parametrize("override,message", [
        ("model.num_heads=4", "model.num_heads = 4 vs 8"),
        ("model.max_text_tokens=16", "model.max_text_tokens = 16 vs 12"),
        ("model.maskdit_extra_blocks=0", "model.maskdit_extra_blocks = 0 vs 1"),
        ("model.temporal_patch=1", "model.temporal_patch = 1 vs 2"),
        ("model.preset=XL", "model.preset 'XL' has depth 28 vs 4; model.preset 'XL' has hidden_size 1152 vs 128"),
    ])
    def test_a_conflicting_value_names_the_field(self, tmp_path, override, message):
        with pytest.raises(ConfigError, match="does not fit init.path") as err:
            self.load(tmp_path, override)
        assert message in str(err.value)

    def test_an_image_source_leaves_the_temporal_patch_free(self, tmp_path):
        image = self.SOURCE.replace(temporal_patch=1)
        config = self.load(tmp_path, "model.temporal_patch=2", kind="t2i", source=image)
        assert config.init.kind is InitKind.T2I and config.model == image.replace(temporal_patch=2)
        with pytest.raises(ConfigError, match="model.temporal_patch = 2 vs 1"):
            self.load(tmp_path, "model.temporal_patch=2", kind="full", source=image)

    def test_missing_and_config_less_files(self, tmp_path):
        with pytest.raises(ConfigError, match="init.path '.*nowhere.safetensors' does not exist"):
            load_config(None, [f"output_dir={tmp_path}", "init.kind=full", f"init.path={tmp_path}/nowhere.safetensors"])
        plain = tmp_path / "plain.safetensors"
        save_state_dict(plain, {"x": torch.zeros(1)}, {})
        config = load_config(None, [f"output_dir={tmp_path}", "init.kind=full", f"init.path={plain}", "model.depth=2"])
        assert config.model == preset("tiny", depth=2)  # nothing recorded: [model] as written
