"""Real per-frame VAEs (diffusers AutoencoderKL) from local files, on tiny random models saved in the test."""
from __future__ import annotations

import json
import socket
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from stiv_core.encoders.vae import DiffusersVAE, LatentSampling, VAEFamily  # noqa: E402
from stiv_core.interfaces import VideoVAE  # noqa: E402
from tests.tiny_hf import sd_family_autoencoder, to_ldm  # noqa: E402


def tiny_autoencoder(latent_channels: int = 4, scaling: float = 0.13025, shift=None):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=scaling, shift_factor=shift)


@pytest.fixture(scope="module")
def sdxl_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "sdxl-vae"
    tiny_autoencoder().save_pretrained(folder)
    return folder


def _pixels(b=2, t=5, seed=0):
    return torch.rand(b, 3, t, 16, 24, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class TestFolder:
    def test_shapes_and_protocol(self, sdxl_like):
        vae = DiffusersVAE(sdxl_like, chunk_frames=3)
        assert isinstance(vae, VideoVAE) and (vae.latent_channels, vae.spatial_factor) == (4, 2)
        latents = vae.encode(_pixels())
        assert latents.shape == (2, 4, 5, 8, 12) and latents.dtype == torch.float32
        pixels = vae.decode(latents)
        assert pixels.shape == (2, 3, 5, 16, 24) and pixels.abs().max() <= 1

    def test_scaling_is_applied_exactly(self, sdxl_like):
        vae = DiffusersVAE(sdxl_like)
        pixels = _pixels()
        raw = vae.vae.encode(pixels[:, :, 3]).latent_dist.mode()
        torch.testing.assert_close(vae.encode(pixels)[:, :, 3], raw * 0.13025)
        latents = torch.randn(1, 4, 2, 8, 12)
        expected = vae.vae.decode(latents[:, :, 1] / 0.13025).sample.clamp(-1, 1)
        torch.testing.assert_close(vae.decode(latents)[:, :, 1], expected.detach())

    def test_chunked_equals_unchunked(self, sdxl_like):
        pixels = _pixels(t=7)
        one, all_ = DiffusersVAE(sdxl_like, chunk_frames=1), DiffusersVAE(sdxl_like, chunk_frames=64)
        torch.testing.assert_close(one.encode(pixels), all_.encode(pixels), atol=1e-5, rtol=1e-5)
        latents = all_.encode(pixels)
        torch.testing.assert_close(one.decode(latents), all_.decode(latents), atol=1e-5, rtol=1e-5)

    def test_sampling_draws_from_the_posterior(self, sdxl_like):
        vae = DiffusersVAE(sdxl_like, sampling=LatentSampling.SAMPLE, generator=torch.Generator().manual_seed(0))
        pixels = _pixels()
        assert not torch.allclose(vae.encode(pixels), DiffusersVAE(sdxl_like).encode(pixels))


class TestSingleFileAndChannels:
    def test_sixteen_channels_with_shift_from_a_single_file(self, tmp_path):
        from safetensors.torch import save_file

        model = tiny_autoencoder(latent_channels=16, scaling=1.5, shift=0.25)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "flux_vae.safetensors"))
        (tmp_path / "flux_vae.json").write_text(json.dumps(dict(model.config)))
        vae = DiffusersVAE(tmp_path / "flux_vae.safetensors")
        pixels = _pixels(b=1, t=2)
        latents = vae.encode(pixels)
        assert latents.shape == (1, 16, 2, 8, 12)
        raw = model.encode(pixels[:, :, 0]).latent_dist.mode()
        torch.testing.assert_close(latents[:, :, 0], ((raw - 0.25) * 1.5).detach())

    def test_single_file_without_config_is_refused(self, tmp_path):
        from safetensors.torch import save_file

        save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
        with pytest.raises(FileNotFoundError, match="or its diffusers config.json"):
            DiffusersVAE(tmp_path / "vae.safetensors")


# ---- original (LDM / ComfyUI models/vae) key names, written here from the original Encoder/Decoder ----

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _save(state, path):
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def _assert_same_vae(vae: DiffusersVAE, model, scale: float, shift: float = 0.0):
    pixels = _pixels(b=1, t=3, seed=4)
    with torch.no_grad():
        raw = torch.stack([model.encode(pixels[:, :, t]).latent_dist.mode() for t in range(3)], 2)
        latents = vae.encode(pixels)
        torch.testing.assert_close(latents, (raw - shift) * scale, atol=1e-5, rtol=1e-4)
        expected = model.decode(latents[:, :, 1] / scale + shift).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(latents)[:, :, 1], expected, atol=1e-5, rtol=1e-4)


class TestOriginalFormatFile:
    @pytest.mark.parametrize("family,scale", [("sdxl", 0.13025), (VAEFamily.SD, 0.18215)])
    def test_family_file_equals_the_original_model(self, tmp_path, no_network, family, scale):
        model = sd_family_autoencoder(scaling=scale).eval()
        state = to_ldm(model.state_dict(), levels=2)
        assert "encoder.down.0.block.0.conv1.weight" in state and "decoder.up.1.upsample.conv.weight" in state
        assert state["encoder.mid.attn_1.q.weight"].dim() == 4
        vae = DiffusersVAE(_save(state, tmp_path / "sdxl_vae.safetensors"), config=family)
        cfg = vae.vae.config
        assert (tuple(cfg.block_out_channels), cfg.layers_per_block, cfg.latent_channels) == ((32, 64), 1, 4)
        assert (vae.scaling_factor, vae.shift_factor, vae.spatial_factor) == (scale, 0.0, 2)
        _assert_same_vae(vae, model, scale)

    def test_sixteen_channel_family_has_its_shift(self, tmp_path, no_network):
        model = sd_family_autoencoder(latent_channels=16, scaling=0.3611, shift=0.1159).eval()
        path = _save(to_ldm(model.state_dict(), levels=2), tmp_path / "ae.safetensors")
        vae = DiffusersVAE(path, config="flux")
        assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
        _assert_same_vae(vae, model, 0.3611, 0.1159)
        with pytest.raises(ValueError, match="sdxl VAEs have 4 latent channels, this file has 16"):
            DiffusersVAE(path, config="sdxl")

    def test_config_json_beside_the_file(self, tmp_path, no_network):
        model = tiny_autoencoder().eval()  # GroupNorm 4: not a family's architecture, so its config is needed
        path = _save(to_ldm(model.state_dict(), levels=2), tmp_path / "my_vae.safetensors")
        (tmp_path / "my_vae.json").write_text(json.dumps(dict(model.config)))
        _assert_same_vae(DiffusersVAE(path), model, 0.13025)

    def test_diffusers_names_with_a_family(self, tmp_path, no_network):
        model = sd_family_autoencoder(scaling=0.18215).eval()
        path = _save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "vae.safetensors")
        _assert_same_vae(DiffusersVAE(path, config="sd"), model, 0.18215)

    def test_neither_family_nor_config_is_a_clear_error(self, tmp_path):
        path = _save(to_ldm(sd_family_autoencoder().state_dict(), levels=2), tmp_path / "sdxl_vae.safetensors")
        with pytest.raises(FileNotFoundError, match=r"needs its family \(config = one of \['sd', 'sdxl'"):
            DiffusersVAE(path)
        other = _save({"model.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
        with pytest.raises(ValueError, match="is not an AutoencoderKL VAE file"):
            DiffusersVAE(other, config="sdxl")


class TestErrors:
    def test_missing_folder(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            DiffusersVAE(tmp_path / "nope")
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileNotFoundError, match="no config.json"):
            DiffusersVAE(tmp_path / "empty")

    def test_a_folder_with_only_a_pickle_is_refused_before_diffusers_loads_it(self, tmp_path, monkeypatch):
        folder = tmp_path / "old-vae"
        sd_family_autoencoder().save_pretrained(folder, safe_serialization=False)
        assert (folder / "diffusion_pytorch_model.bin").is_file()
        def no_pickles(*args, **kwargs):
            raise AssertionError("the library was asked to load the folder")
        monkeypatch.setattr(torch, "load", no_pickles)
        monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", no_pickles)
        with pytest.raises(FileNotFoundError, match=r"old-vae' has no diffusion_pytorch_model\.safetensors .*"
                                                    r"it holds diffusion_pytorch_model\.bin\. Only safetensors"):
            DiffusersVAE(folder)

    def test_missing_diffusers(self, sdxl_like, monkeypatch):
        monkeypatch.setitem(sys.modules, "diffusers", None)
        with pytest.raises(ImportError, match="pip install diffusers"):
            DiffusersVAE(sdxl_like)

    def test_bad_sizes(self, sdxl_like):
        vae = DiffusersVAE(sdxl_like)
        with pytest.raises(ValueError, match="not divisible by the VAE factor 2"):
            vae.encode(torch.zeros(1, 3, 1, 15, 16))
        with pytest.raises(ValueError, match=r"\(B, 4, T, h, w\)"):
            vae.decode(torch.zeros(1, 3, 1, 8, 8))
