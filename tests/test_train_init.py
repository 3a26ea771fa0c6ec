"""Progressive initialisation: T2I -> video keeps the image model's output; split sources; RoPE scale."""
import pytest
import torch

from stiv_core.checkpoint import CheckpointError, save_model
from stiv_core.config import preset
from stiv_core.interfaces import TextEmbedding
from stiv_core.model.transformer import STIVTransformer
from stiv_core.training.config import InitConfig, InitKind
from stiv_core.training.init import initialize, rope_scale_for

BASE = dict(depth=2, hidden_size=32, num_heads=2, text_dim=16, pooled_text_dim=16, max_text_tokens=8)


def image_model():
    torch.manual_seed(0)
    model = STIVTransformer(preset("tiny", temporal_patch=1, **BASE))
    with torch.no_grad():  # a trained-looking image model: nothing left at its zero init but temporal attn
        for name, p in model.named_parameters():
            if ".temporal_attn." not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.double()


def inputs(frames, b=2, size=16):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 1, size, size, generator=gen, dtype=torch.float64).expand(-1, -1, frames, -1, -1)
    text = torch.randn(b, 5, 16, generator=gen, dtype=torch.float64)
    text = TextEmbedding(text, torch.ones(b, 5, dtype=torch.bool), torch.randn(b, 16, generator=gen, dtype=torch.float64))
    return x, torch.tensor([0.3, 0.8], dtype=torch.float64), text, torch.ones(b, 6, dtype=torch.float64)


@pytest.mark.parametrize("temporal_patch, frames", [(1, 1), (2, 2), (2, 4)])
def test_t2i_init_reproduces_the_image_model(tmp_path, temporal_patch, frames):
    image = image_model()
    save_model(tmp_path / "t2i.safetensors", image)
    video = STIVTransformer(preset("tiny", temporal_patch=temporal_patch, **BASE)).double()
    with torch.no_grad():  # make sure the init, not the random init, sets the temporal output to zero
        for block in video.blocks:
            block.temporal_attn.proj.weight.normal_()
    initialize(video, InitConfig(InitKind.T2I, str(tmp_path / "t2i.safetensors")))
    video = video.double()
    expected = image(*inputs(1))                                  # (B, C, 1, H, W)
    out = video(*inputs(frames))
    for f in range(frames):  # a static clip: every frame is the image model's output
        torch.testing.assert_close(out[:, :, f], expected[:, :, 0], rtol=1e-9, atol=1e-9)
    assert all(block.temporal_attn.proj.weight.abs().sum() == 0 for block in video.blocks)


def test_split_init_takes_temporal_attention_from_the_second_source(tmp_path):
    image = image_model()
    save_model(tmp_path / "t2i.safetensors", image)
    torch.manual_seed(5)
    t2v = STIVTransformer(preset("tiny", **BASE))
    with torch.no_grad():
        for p in t2v.parameters():
            p.normal_()
    save_model(tmp_path / "t2v.safetensors", t2v)
    video = STIVTransformer(preset("tiny", **BASE))
    initialize(video, InitConfig(InitKind.SPLIT, str(tmp_path / "t2i.safetensors"), str(tmp_path / "t2v.safetensors")))
    state, src_t, src_s = video.state_dict(), t2v.state_dict(), image.float().state_dict()
    for key, value in state.items():
        if ".temporal_attn." in key:
            assert torch.equal(value, src_t[key]), key
        elif key == "blocks.0.spatial_attn.qkv.weight":
            assert torch.equal(value, src_s[key])


def test_full_init_checks_shapes(tmp_path):
    save_model(tmp_path / "small.safetensors", STIVTransformer(preset("tiny", **BASE)))
    other = STIVTransformer(preset("tiny", **{**BASE, "depth": 3}))
    with pytest.raises(CheckpointError, match="missing"):
        initialize(other, InitConfig(InitKind.FULL, str(tmp_path / "small.safetensors")))


def test_rope_scale_maps_a_larger_grid_onto_the_trained_positions():
    assert rope_scale_for((10, 16, 16), (20, 32, 32)) == (0.5, 0.5, 0.5)
    assert rope_scale_for((10, 16, 16), (20, 32, 32), (0.5, 1.0, 1.0)) == (0.25, 0.5, 0.5)
