"""Training with real encoders from local folders: HF text encoders (a tiny T5, a tiny CLIP for the pooled
embedding) and a diffusers VAE, all small, random and saved in the test (offline)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stiv_core.bundle import SamplingDefaults, TrainedWith, load_defaults, read_trained_with
from stiv_core.checkpoint import load_model
from stiv_core.encoders.combined import CombinedTextEncoder
from stiv_core.encoders.hf import HFTextEncoder
from stiv_core.train import train, trained_with
from stiv_core.training.config import ConfigError, load_config
from stiv_core.training.encoders import build_encoders
from tests.tiny_hf import save_tiny_clip, save_tiny_t5, sd_family_autoencoder, to_ldm

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
CONFIG = str(Path(__file__).resolve().parents[1] / "stiv_core" / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.13025
                            ).save_pretrained(root / "tiny-kl")
    return {"vae": root / "tiny-kl", "t5": save_tiny_t5(root / "t5"), "clip": save_tiny_clip(root / "clip", "projection")}


def overrides(tmp_path, folders, **changes):
    base = {"output_dir": f'"{tmp_path}"', "max_steps": "2", "batch_size": "2", "resume": "false",
            "sample_every": "0", "checkpoint_every": "2", "text_encoder": '"hf"',
            "text_encoder_path": f'"{folders["t5"]}"', "vae": '"diffusers"', "vae_path": f'"{folders["vae"]}"',
            "model.depth": "1", "model.hidden_size": "32", "model.num_heads": "2", "model.latent_channels": "4",
            "model.patch_size": "2", "model.text_dim": "32", "model.pooled_text_dim": "32",
            "data.buckets": "[[2, 16, 16]]", "export_dtype": '"float32"'}
    return [f"{k}={v}" for k, v in {**base, **changes}.items()]


def test_training_with_a_t5_and_an_sd_like_vae(tmp_path, folders):
    result = train(load_config(CONFIG, overrides(tmp_path, folders)))
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    model = load_model(result.model_path)
    assert model.config.latent_channels == 4 and model.config.text_dim == 32
    # the bare export records its encoders and size, for the STIV Loader node
    assert read_trained_with(result.model_path) == TrainedWith(
        vae_kind="diffusers", latent_channels=4, spatial_factor=2, scaling_factor=0.13025, shift_factor=0.0,
        vae_family="", text_encoder="hf", text_encoder_name="t5", text_dim=32, pooled_text_dim=32,
        pooled_from_clip=False)
    assert load_defaults(result.model_path) == SamplingDefaults(num_frames=2, height=16, width=16, steps=25)


def test_t5_tokens_with_a_clip_pooled_embedding(tmp_path, folders):
    clip = f'"{folders["clip"]}"'
    config = load_config(CONFIG, overrides(tmp_path, folders, pooled_text_encoder_path=clip,
                                           **{"model.pooled_text_dim": "24"}))
    text, _ = build_encoders(config)
    assert isinstance(text, CombinedTextEncoder) and (text.dim, text.pooled_dim) == (32, 24)
    prompts = ["a red circle", "blue"]
    e = text.encode(prompts)
    torch.testing.assert_close(e.pooled, HFTextEncoder(folders["clip"]).encode(prompts).pooled)
    torch.testing.assert_close(e.tokens, HFTextEncoder(folders["t5"]).encode(prompts).tokens)
    result = train(config)
    assert result.step == 2 and load_model(result.model_path).config.pooled_text_dim == 24
    recorded = read_trained_with(result.model_path)
    assert recorded.pooled_from_clip and (recorded.text_dim, recorded.pooled_text_dim) == (32, 24)


def test_a_single_original_format_vae_file_with_its_family(tmp_path, folders):
    from stiv_core.encoders.vae import DiffusersVAE

    save_file(to_ldm(sd_family_autoencoder().state_dict(), levels=2), str(tmp_path / "sdxl_vae.safetensors"))
    config = load_config(CONFIG, overrides(tmp_path, folders, vae_path=f'"{tmp_path / "sdxl_vae.safetensors"}"',
                                           vae_config='"sdxl"'))
    _, vae = build_encoders(config)
    assert isinstance(vae, DiffusersVAE) and (vae.latent_channels, vae.scaling_factor) == (4, 0.13025)
    recorded = trained_with(config, *build_encoders(config))
    assert (recorded.vae_family, recorded.scaling_factor, recorded.latent_channels) == ("sdxl", 0.13025, 4)
    with pytest.raises(ConfigError, match="vae_config needs vae='diffusers'"):
        load_config(CONFIG, ['vae_config="sdxl"'])


@pytest.mark.parametrize("change,message", [
    ({"model.text_dim": "128"}, "gives 32 / 32"),
    ({"model.latent_channels": "3"}, "gives 4 channels"),
    ({"data.buckets": "[[2, 18, 18]]"}, "not a multiple of 4"),
    ({"pooled_text_encoder_path": "CLIP"}, r"\(pooled\) gives 32 / 24"),
])
def test_widths_that_do_not_fit_the_encoders_are_named(tmp_path, folders, change, message):
    change = {k: f'"{folders["clip"]}"' if v == "CLIP" else v for k, v in change.items()}
    config = load_config(CONFIG, overrides(tmp_path, folders, **change))
    with pytest.raises(ConfigError, match=message):
        build_encoders(config)


def test_paths_are_required():
    with pytest.raises(ConfigError, match="vae_path"):
        load_config(CONFIG, ['vae="diffusers"'])
    with pytest.raises(ConfigError, match="text_encoder_path"):
        load_config(CONFIG, ['text_encoder="hf"'])
    with pytest.raises(ConfigError, match="pooled_text_encoder_path needs text_encoder='hf'"):
        load_config(CONFIG, ['pooled_text_encoder_path="models/clip"'])
