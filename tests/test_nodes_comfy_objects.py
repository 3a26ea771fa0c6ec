"""ComfyUI's own CLIP and VAE on the STIV nodes (optional `clip` / `vae` inputs), with stand-ins that have
ComfyUI's method signatures: used when connected, ignored when not, the model's latent scale applied, and
clear errors for a text width or latent channel count the model was not trained with."""
from __future__ import annotations

import pytest
import torch

from stiv_core.bundle import SamplingDefaults
from stiv_core.encoders.hashed import HashedTextEncoder
from tests.fakes import (ComfyCLIPStandIn, ComfyPixelSpaceVAEStandIn, ComfyVAEStandIn,
                         ScaledLinearVAE, randomize)
from tests.pack import SETTINGS, images, load, node, pack_module, sample, write_small_bundle

nodes = pack_module("nodes")
types = pack_module("nodes.types")
adapters = pack_module("nodes.comfy_adapters")
Err = types.STIVInputError
PROMPT, NEGATIVE = "a red circle moving left", "a blue square"


@pytest.fixture(scope="module")
def model():
    """A random model whose own VAE scales its latents (0.5, shift 0.25) and whose text is hashed words,
    built from the pack's copy of stiv_core (the nodes' enums and classes are that copy's)."""
    config = pack_module("stiv_core.config").preset(
        "tiny", depth=2, hidden_size=64, num_heads=4, latent_channels=12, patch_size=2, temporal_patch=2,
        text_dim=32, pooled_text_dim=32, max_text_tokens=8)
    transformer = randomize(pack_module("stiv_core.model.transformer").STIVTransformer(config)).eval()
    pipeline = pack_module("stiv_core.pipeline").STIVPipeline(transformer, HashedTextEncoder(32, max_tokens=None),
                                                              ScaledLinearVAE(scaling_factor=0.5, shift_factor=0.25))
    return types.STIVModel(pipeline, SamplingDefaults(), "fake")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_small_bundle(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STIV_MODEL_DIRS", str(folder))
        yield load()


def encode(prompt=PROMPT, negative="", clip=None):
    return node("STIVTextEncode")(prompt, negative, **({"clip": clip} if clip is not None else {}))[0]


def condition(cond, picture, frames="first", vae=None):
    return node("STIVImageCondition")(cond, picture, frames, 2, **({"vae": vae} if vae is not None else {}))[0]


def decode(model, latent, vae=None):
    return node("STIVDecode")(model, latent, chunk_frames=3, **({"vae": vae} if vae is not None else {}))[0]


def test_the_optional_inputs_are_declared_with_comfyui_types():
    spec = lambda name: nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
    text_inputs = spec("STIVTextEncode")["optional"]
    assert text_inputs["clip"][0] == text_inputs["pooled_clip"][0] == "CLIP"
    assert spec("STIVImageCondition")["optional"]["vae"][0] == "VAE"
    assert spec("STIVDecode")["optional"]["vae"][0] == "VAE"
    for name in ("STIVTextEncode", "STIVImageCondition", "STIVDecode"):
        assert not {"clip", "pooled_clip", "vae"} & set(spec(name)["required"])


# -- text ---------------------------------------------------------------------------------------
def test_a_t5_like_clip_gives_the_masked_token_mean_as_pooled_text():
    own = HashedTextEncoder(32, max_tokens=None).encode([PROMPT])
    t5 = ComfyCLIPStandIn(32)
    got = adapters.clip_text_embedding(t5, PROMPT)
    torch.testing.assert_close(got.tokens, own.tokens)
    torch.testing.assert_close(got.pooled, own.pooled)
    assert got.mask.all() and t5.calls == [True]
    # padding the encoder reports in attention_mask is masked out of the tokens and the pooled mean
    padded = adapters.clip_text_embedding(ComfyCLIPStandIn(32, pad_to=9, attention_mask=True), PROMPT)
    assert padded.mask.tolist() == [[True] * 5 + [False] * 4]
    torch.testing.assert_close(padded.pooled, own.pooled)
    # without a mask, the zeroed padding of ComfyUI's zero_out_masked encoders is not text either
    unmasked = adapters.clip_text_embedding(ComfyCLIPStandIn(32, pad_to=9), PROMPT)
    assert unmasked.mask.tolist() == padded.mask.tolist()
    torch.testing.assert_close(unmasked.pooled, own.pooled)
    # padding that is real vectors (CLIP's end tokens) counts: only an encoder's own mask removes it
    ends = adapters.clip_text_embedding(ComfyCLIPStandIn(32), PROMPT + " end" * 4)
    assert ends.mask.all() and ends.tokens.shape[1] == 9 and not torch.allclose(ends.pooled, own.pooled)


def test_a_clip_with_a_pooled_output_gives_the_pooled_text_comfyui_gives_by_default():
    for projected in (False, True):   # ComfyUI's CLIP-L gives its end token unprojected, CLIP-G projected
        clip = ComfyCLIPStandIn(32, pooled=True, projected=projected)
        got = adapters.clip_text_embedding(clip, PROMPT)
        torch.testing.assert_close(got.pooled, got.tokens[:, -1] * (2 if projected else 1))   # the last word
        assert clip.calls == [True]


def test_pooled_clip_gives_the_pooled_text_of_t5_tokens(model):
    t5, clip = ComfyCLIPStandIn(32), ComfyCLIPStandIn(32, seed=5, pooled=True, projected=True)
    paired = adapters.clip_text_embedding(t5, PROMPT, pooled_clip=clip)
    torch.testing.assert_close(paired.tokens, adapters.clip_text_embedding(t5, PROMPT).tokens)
    torch.testing.assert_close(paired.pooled, adapters.clip_text_embedding(clip, PROMPT).pooled)
    cond = node("STIVTextEncode")(PROMPT, NEGATIVE, clip=t5, pooled_clip=clip)[0]
    torch.testing.assert_close(cond.encoded.texts[NEGATIVE].pooled, adapters.clip_text_embedding(clip, NEGATIVE).pooled)
    tokens_only = encode(negative=NEGATIVE, clip=t5)
    assert not torch.allclose(sample(model, cond)["samples"], sample(model, tokens_only)["samples"])
    with pytest.raises(Err, match="STIV Text Encode: pooled_clip gives only the pooled text; connect clip too"):
        node("STIVTextEncode")(PROMPT, "", pooled_clip=clip)


def test_text_encode_with_a_clip_is_used_when_connected_and_ignored_when_not(model):
    assert encode().encoded is None
    own = sample(model, encode(negative=NEGATIVE))["samples"]
    same_words = encode(negative=NEGATIVE, clip=ComfyCLIPStandIn(32))
    assert set(same_words.encoded.texts) == {PROMPT, NEGATIVE}
    # the stand-in hashes words as the model's own encoder does: the same video from either
    torch.testing.assert_close(sample(model, same_words)["samples"], own)
    other = sample(model, encode(negative=NEGATIVE, clip=ComfyCLIPStandIn(32, seed=7)))["samples"]
    assert not torch.allclose(other, own)
    # an empty negative is the model's learned null text, not the CLIP's encoding of ""
    clip = ComfyCLIPStandIn(32)
    assert set(encode(clip=clip).encoded.texts) == {PROMPT} and len(clip.calls) == 1


def test_text_width_mismatch_names_both_widths(model):
    clip_l = encode(clip=ComfyCLIPStandIn(768, pooled=True))
    with pytest.raises(Err, match="STIV Sampler: the CLIP connected to STIV Text Encode gives 768-wide text "
                                  "embeddings, but this model was trained on 32-wide ones"):
        sample(model, clip_l)
    narrow_pooled = encode(clip=ComfyCLIPStandIn(32, pooled=True, pooled_dim=16))
    with pytest.raises(Err, match="STIV Keyframe -> Interpolate: the text encoders connected to STIV Text Encode "
                                  "give a 16-wide pooled embedding, but this model takes 32-wide pooled text"):
        node("STIVKeyframeInterpolate")(model, narrow_pooled, keyframes=2, keyframe_stride=3, **SETTINGS)


# -- VAE ----------------------------------------------------------------------------------------
def test_the_vae_adapter_is_the_models_own_vae_for_the_same_weights():
    own = ScaledLinearVAE(scaling_factor=0.5, shift_factor=0.25)
    comfy = ComfyVAEStandIn()
    adapter = adapters.ComfyVideoVAE(comfy, scaling=adapters.LatentScaling.of(own), chunk_frames=3)
    assert (adapter.latent_channels, adapter.spatial_factor) == (12, 2)
    video = torch.rand(2, 3, 4, 8, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode(video)
    torch.testing.assert_close(latents, own.encode(video), atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.decode(latents), video, atol=1e-5, rtol=0)
    assert comfy.calls == [("encode", 3)] * 2 + [("encode", 2)] + [("decode", 3)] * 2 + [("decode", 2)]
    # latents the model's own VAE made decode to what it decodes them to
    torch.testing.assert_close(adapter.decode(own.encode(video)), own.decode(own.encode(video)).clamp(-1, 1),
                               atol=1e-5, rtol=0)


def test_frame_replacement_with_a_comfy_vae_encodes_the_image_at_the_models_scale(model):
    picture = images(1, 3)
    assert condition(encode(), picture).vae is None
    comfy = ComfyVAEStandIn()
    latent = sample(model, condition(encode(), picture, vae=comfy))["samples"]
    raw = comfy.linear.encode(types.image_to_pixels(picture).permute(1, 0, 2, 3)[None])   # what ComfyUI returns
    torch.testing.assert_close(latent[:, :, 0], ((raw - 0.25) * 0.5)[:, :, 0], atol=1e-5, rtol=0)
    assert ("encode", 1) in comfy.calls and ("decode", 1) in comfy.calls   # the condition, then previews
    # the same weights as the model's own VAE: the same video; other weights: another one
    torch.testing.assert_close(latent, sample(model, condition(encode(), picture))["samples"], atol=1e-4, rtol=0)
    other = sample(model, condition(encode(), picture, vae=ComfyVAEStandIn(seed=1)))["samples"]
    assert not torch.allclose(other[:, :, 0], latent[:, :, 0], atol=1e-3)


def test_the_keyframe_nodes_encode_the_condition_with_the_comfy_vae(model):
    picture, comfy = images(1, 4), ComfyVAEStandIn(seed=1)
    cond = condition(encode(), picture, vae=comfy)
    long = node("STIVKeyframeInterpolate")(model, cond, keyframes=2, keyframe_stride=3, **SETTINGS)[0]["samples"]
    raw = comfy.linear.encode(types.image_to_pixels(picture).permute(1, 0, 2, 3)[None])
    torch.testing.assert_close(long[:, :, 0], ((raw - 0.25) * 0.5)[:, :, 0], atol=1e-5, rtol=0)
    keys = node("STIVSampler")(model, cond, frames=2, frame_stride=3, **SETTINGS)[0]
    settings = {k: v for k, v in SETTINGS.items() if k not in ("width", "height")}
    comfy.calls.clear()
    chained = node("STIVInterpolateKeyframes")(model, cond, keys, keyframe_stride=3, **settings)[0]["samples"]
    torch.testing.assert_close(chained, long)
    assert comfy.calls and all(kind == "decode" for kind, _ in comfy.calls)   # its previews


def test_decode_with_a_comfy_vae_is_used_when_connected(model):
    latent = sample(model, encode())
    own = decode(model, latent)
    comfy = ComfyVAEStandIn()
    torch.testing.assert_close(decode(model, latent, vae=comfy), own, atol=1e-5, rtol=0)
    assert comfy.calls == [("decode", 3), ("decode", 1)]   # chunk_frames = 3 of 4 frames
    assert not torch.allclose(decode(model, latent, vae=ComfyVAEStandIn(seed=1)), own, atol=1e-3)


def test_pixel_space_vae_on_a_pixel_space_model_changes_nothing(bundle):
    picture, comfy = images(1, 2), ComfyPixelSpaceVAEStandIn()
    video = decode(bundle, sample(bundle, condition(encode(), picture, vae=comfy)), vae=comfy)
    torch.testing.assert_close(video, decode(bundle, sample(bundle, condition(encode(), picture))), atol=1e-5, rtol=0)
    torch.testing.assert_close(video[0], picture[0], atol=1e-6, rtol=0)


def test_vae_channel_and_kind_mismatch_are_clear_errors(bundle, model):
    latent = sample(bundle, encode())
    with pytest.raises(Err, match="STIV Decode: the connected VAE gives 12-channel latents, but this STIV model "
                                  "works on 3-channel latents \\(pixel space, e.g. VAELoader's 'pixel_space'\\)"):
        decode(bundle, latent, vae=ComfyVAEStandIn())
    with pytest.raises(Err, match="STIV Sampler: the connected VAE gives 12-channel latents"):
        sample(bundle, condition(encode(), images(1), vae=ComfyVAEStandIn()))
    with pytest.raises(Err, match="STIV Decode: the connected VAE has 3-D latents \\(a video or audio VAE\\)"):
        decode(model, sample(model, encode()), vae=ComfyVAEStandIn(latent_dim=3))
    with pytest.raises(Err, match="STIV Sampler: the connected VAE has 1 pixels per latent, but this STIV "
                                  "model's latents have 2"):
        twelve_at_factor_1 = ComfyPixelSpaceVAEStandIn()
        twelve_at_factor_1.latent_channels = 12
        sample(model, condition(encode(), images(1), vae=twelve_at_factor_1))
