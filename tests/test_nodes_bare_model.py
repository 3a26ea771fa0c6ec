"""A bare model (trained with a Hugging Face text encoder and a diffusers VAE, exported without them) in the
STIV Loader: the text comes from a ComfyUI CLIP, pixels from a ComfyUI VAE at the latent scale its metadata
records, and a clear error names what to connect when one is missing."""
from __future__ import annotations

import pytest
import torch

from stiv_core.bundle import SamplingDefaults, TrainedWith, save_bare_model
from stiv_core.checkpoint import save_model
from stiv_core.config import preset
from stiv_core.model.transformer import STIVTransformer
from tests.fakes import ComfyCLIPStandIn, ComfyVAEStandIn, LinearVAE, ScaledLinearVAE, randomize
from tests.pack import SETTINGS, images, load, node, pack_module, sample

adapters = pack_module("nodes.comfy_adapters")
Err = pack_module("nodes.types").STIVInputError
BARE_FILE, UNRECORDED_FILE = "bare.safetensors", "unrecorded.safetensors"
DEFAULTS = SamplingDefaults(num_frames=4, height=16, width=16, steps=2)
# as `_export` records a run on a T5 (32-wide here) and an SDXL-like VAE (12 channels here, as the fakes)
TRAINED = TrainedWith(vae_kind="diffusers", latent_channels=12, spatial_factor=2, scaling_factor=0.5,
                      shift_factor=0.25, vae_family="sdxl", text_encoder="hf", text_encoder_name="t5-tiny",
                      text_dim=32, pooled_text_dim=32, pooled_from_clip=False)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    config = preset("tiny", depth=1, hidden_size=32, num_heads=2, latent_channels=12, patch_size=2, temporal_patch=2,
                    text_dim=32, pooled_text_dim=32, max_text_tokens=8)
    torch.manual_seed(0)
    model = randomize(STIVTransformer(config))
    save_bare_model(folder / BARE_FILE, model, TRAINED, defaults=DEFAULTS)
    save_model(folder / UNRECORDED_FILE, model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STIV_MODEL_DIRS", str(folder))
        yield load(BARE_FILE)


def encode(prompt="a red circle moving left", clip=None):
    return node("STIVTextEncode")(prompt, "", **({"clip": clip} if clip is not None else {}))[0]


def condition(cond, picture, vae=None):
    return node("STIVImageCondition")(cond, picture, "first", 2, **({"vae": vae} if vae is not None else {}))[0]


def decode(model, latent, vae=None):
    return node("STIVDecode")(model, latent, chunk_frames=3, **({"vae": vae} if vae is not None else {}))[0]


class TestLoad:
    def test_the_loader_opens_a_bare_model_with_what_it_records(self, bare):
        assert isinstance(bare.pipeline.text_encoder, adapters.MissingTextEncoder)
        assert isinstance(bare.pipeline.vae, adapters.RecordedVAE)
        assert (bare.pipeline.vae.latent_channels, bare.pipeline.vae.spatial_factor) == (12, 2)
        assert (bare.defaults.num_frames, bare.defaults.height, bare.defaults.width) == (4, 16, 16)
        # the one place scale/shift reach the ComfyUI VAE adapter reads the recorded ones
        assert adapters.LatentScaling.of(bare.pipeline.vae) == adapters.LatentScaling(0.5, 0.25)

    def test_a_bare_model_without_a_record_is_still_refused(self, bare):
        with pytest.raises(Err, match="bare STIV model without its text encoder and VAE"):
            load(UNRECORDED_FILE)


class TestWithComfyEncoders:
    def test_text_to_video_with_a_comfy_clip_decodes_with_the_recorded_scale(self, bare):
        latent = sample(bare, encode(clip=ComfyCLIPStandIn(32)))["samples"]
        assert latent.shape == (1, 12, 4, 8, 8) and torch.isfinite(latent).all()
        video = decode(bare, {"samples": latent}, vae=ComfyVAEStandIn())
        assert video.shape == (4, 16, 16, 3) and 0 <= video.min() and video.max() <= 1
        expected = (ScaledLinearVAE(scaling_factor=0.5, shift_factor=0.25).decode(latent).clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(video, expected.permute(0, 2, 3, 4, 1).flatten(0, 1), atol=1e-5, rtol=0)
        unscaled = (LinearVAE().decode(latent).clamp(-1, 1) + 1) / 2
        assert not torch.allclose(video, unscaled.permute(0, 2, 3, 4, 1).flatten(0, 1), atol=1e-3)

    def test_the_condition_image_is_encoded_at_the_recorded_scale(self, bare):
        picture = images(1, 3)
        cond = condition(encode(clip=ComfyCLIPStandIn(32)), picture, vae=ComfyVAEStandIn())
        latent = sample(bare, cond)["samples"]
        pixels = (picture.permute(0, 3, 1, 2) * 2 - 1).permute(1, 0, 2, 3)[None]  # (1, 3, 1, H, W)
        own = ScaledLinearVAE(scaling_factor=0.5, shift_factor=0.25).encode(pixels)
        torch.testing.assert_close(latent[:, :, :1], own, atol=1e-5, rtol=0)

    def test_sampling_without_a_vae_gives_latents_and_no_preview(self, bare, monkeypatch):
        previews = []

        class Bar:
            def update_absolute(self, value, total, preview=None):
                previews.append(preview)

        comfy = pack_module("nodes._comfy")
        monkeypatch.setattr(comfy, "progress_bar", lambda total: Bar())
        latent = sample(bare, encode(clip=ComfyCLIPStandIn(32)))["samples"]
        assert latent.shape == (1, 12, 4, 8, 8) and previews == [None] * SETTINGS["steps"]


class TestMissingEncoders:
    def test_no_clip_names_the_text_encoder_it_was_trained_with(self, bare):
        with pytest.raises(Err, match=r"STIV Sampler: this model has no bundled text encoder: connect a CLIP to "
                                      r"STIV Text Encode \(it was trained with hf 't5-tiny', 32-wide"):
            sample(bare, encode())

    def test_no_vae_for_the_condition_images(self, bare):
        cond = condition(encode(clip=ComfyCLIPStandIn(32)), images(1, 3))
        with pytest.raises(Err, match=r"STIV Sampler: this model has no bundled VAE: connect a ComfyUI VAE to vae "
                                      r"\(it was trained with a SDXL VAE, 12 latent channels, 2 pixels per latent\) "
                                      r"on STIV Image Condition"):
            sample(bare, cond)

    def test_no_vae_to_decode(self, bare):
        latent = {"samples": torch.zeros(1, 12, 2, 8, 8)}
        with pytest.raises(Err, match="STIV Decode: this model has no bundled VAE: connect a ComfyUI VAE"):
            decode(bare, latent)

    def test_a_clip_of_another_width_is_named(self, bare):
        with pytest.raises(Err, match="gives 16-wide text embeddings, but this model was trained on 32-wide"):
            sample(bare, encode(clip=ComfyCLIPStandIn(16)))


def test_a_pixel_space_bare_model_needs_no_vae(tmp_path, monkeypatch):
    config = preset("tiny", depth=1, hidden_size=32, num_heads=2, text_dim=32, pooled_text_dim=32, max_text_tokens=8)
    torch.manual_seed(0)
    pixel = TrainedWith(text_encoder="hf", text_dim=32, pooled_text_dim=32)
    save_bare_model(tmp_path / BARE_FILE, randomize(STIVTransformer(config)), pixel, defaults=DEFAULTS)
    monkeypatch.setenv("STIV_MODEL_DIRS", str(tmp_path))
    model = load(BARE_FILE)
    video = decode(model, sample(model, condition(encode(clip=ComfyCLIPStandIn(32)), images(1, 3))))
    assert video.shape == (4, 16, 16, 3)
