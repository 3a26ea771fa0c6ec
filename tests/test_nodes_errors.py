"""Bad input gives a message a ComfyUI user understands (naming the node and what is allowed), and the
next run works."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from stiv_core.checkpoint import save_model
from stiv_core.config import preset
from stiv_core.model.transformer import STIVTransformer
from tests.pack import SETTINGS, decode, images, load, node, pack_module, sample, text, write_small_bundle

types = pack_module("nodes.types")
Err = types.STIVInputError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_small_bundle(folder)
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (folder / "other.safetensors").write_bytes(b"")
    save_file({"weight": torch.zeros(2)}, str(folder / "plain.safetensors"))
    save_model(folder / "bare.safetensors", STIVTransformer(preset("tiny", depth=1, hidden_size=32, num_heads=2)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STIV_MODEL_DIRS", str(folder))
        yield folder


@pytest.mark.parametrize("name,message", [
    ("corrupt.safetensors", "cannot load 'corrupt.safetensors'"),
    ("other.safetensors", "cannot load 'other.safetensors'"),
    ("bare.safetensors", "without its text encoder"),
    ("plain.safetensors", r"plain.safetensors: this is not a STIV checkpoint \(no STIV config in its metadata\)"),
    ("gone.safetensors", "no model file 'gone.safetensors'"),
])
def test_wrong_model_files(folder, name, message):
    with pytest.raises(Err, match=message):
        load(name)


def test_builtin_model_missing_or_block_swap_too_high(folder, tmp_path, monkeypatch):
    # the pack's own copy of stiv_core (ComfyUI imports it under the pack's name): a checkout without it
    monkeypatch.setitem(pack_module("stiv_core.bundle").BUILTIN_MODELS, "tiny", tmp_path / "not_shipped.safetensors")
    with pytest.raises(Err, match="built-in 'tiny' model is not in this checkout"):
        load("tiny (built-in)")
    with pytest.raises(Err, match=r"this model has 1 blocks \(0..1\)"):
        load(block_swap=2)


@pytest.mark.parametrize("frames,count,message", [
    ("first", 2, "'first' takes 1 image, got a batch of 2"),
    ("first+last", 3, "'first\\+last' takes 2 images, got a batch of 3"),
    ("last", 0, "'last' takes 1 image, got a batch of 0"),
])
def test_image_batch_that_does_not_match_the_frames(frames, count, message):
    with pytest.raises(Err, match="STIV Image Condition: " + message):
        node("STIVImageCondition")(text(), images(count), frames, 1)


def test_a_connected_last_image_that_frames_would_ignore():
    with pytest.raises(Err, match="STIV Image Condition: last_image is connected but frames is 'first'"):
        node("STIVImageCondition")(text(), images(1), "first", 1, last_image=images(1, seed=1))
    cond = node("STIVImageCondition")(text(), images(1), "first+last", 1, last_image=images(1, seed=1))[0]
    assert cond.images.pixels.shape[0] == 2


def test_bad_sampler_inputs_then_a_good_run(folder):
    model = load()
    too_many = node("STIVImageCondition")(text(), images(5), "first k", 1)[0]
    cases = [
        (dict(cond=too_many), "STIV Sampler: 5 image\\(s\\) as 'first k'.*the video has 4"),
        (dict(cond=node("STIVImageCondition")(text(), images(3), "keyframes", 2)[0]), "need frames \\[0, 2, 4\\]"),
        (dict(frames=5), "STIV Sampler: 5 latent frames do not fit temporal patch 2"),
        (dict(width=18), "STIV Sampler: 18x16 px: width and height must be multiples of 4"),
        (dict(scale=float("nan")), "STIV Sampler: scale must be a finite number"),
        (dict(guidance="pag"), "unknown guidance mode 'pag'"),
    ]
    for change, message in cases:
        cond = change.pop("cond", text())
        with pytest.raises(Err, match=message):
            sample(model, cond, **change)
    with pytest.raises(Err, match="STIV Keyframe -> Interpolate: keyframes must be >= 2, got 1"):
        node("STIVKeyframeInterpolate")(model, text(), keyframes=1, keyframe_stride=3, **SETTINGS)
    with pytest.raises(Err, match="keyframe count \\(2\\) and stride \\+ 1 \\(3, the frames"):
        node("STIVKeyframeInterpolate")(model, text(), keyframes=2, keyframe_stride=2, **SETTINGS)
    assert decode(model, sample(model, text())).shape == (4, 16, 16, 3)


def test_interpolate_keyframes_refuses_what_is_not_keyframes_of_this_model_then_runs(folder):
    model = load()
    settings = {k: v for k, v in SETTINGS.items() if k not in ("width", "height")}
    interpolate = node("STIVInterpolateKeyframes")
    keys = node("STIVSampler")(model, text(), frames=2, frame_stride=3, **SETTINGS)[0]
    cases = [
        ({"samples": torch.zeros(1, 4, 8, 8)}, 3, "expected keyframe latents \\(B, 3, K, h, w\\) from a STIV "
                                                  "Sampler run with this model, got \\(1, 4, 8, 8\\)"),
        ({"samples": torch.zeros(1, 4, 2, 8, 8)}, 3, "got \\(1, 4, 2, 8, 8\\)"),
        ({"image": torch.zeros(1, 3, 2, 4, 4)}, 3, "got NoneType"),
        ({"samples": keys["samples"][:, :, :1]}, 3, "needs at least 2 keyframes.*got 1"),
        ({"samples": keys["samples"].repeat(2, 1, 1, 1, 1)}, 3, "one video's keyframes \\(batch 1\\), got a "
                                                                  "batch of 2"),
        (keys, 2, "stride \\+ 1 \\(3, the frames of each interpolated window\\) "
                  "must be multiples of 2"),
        ({"samples": torch.zeros(1, 3, 2, 6, 6)}, 3, "6x6 px: width and height "
                                                     "must be multiples of 4"),
    ]
    for latent, stride, message in cases:
        with pytest.raises(Err, match="STIV Interpolate Keyframes: .*" + message):
            interpolate(model, text(), latent, keyframe_stride=stride, **settings)
    assert interpolate(model, text(), keys, keyframe_stride=3, **settings)[0]["samples"].shape[2] == 4


def test_empty_prompt_and_foreign_latents():
    with pytest.raises(Err, match="the prompt is empty"):
        text("  ")
    with pytest.raises(Err, match="expected an IMAGE batch"):
        types.image_to_pixels(torch.rand(2, 3))


def test_decode_refuses_latents_of_another_model(folder):
    model = load()
    with pytest.raises(Err, match="STIV Decode: expected STIV video latents \\(B, 3, T, h, w\\).*got \\(1, 4, 8, 8\\)"):
        decode(model, {"samples": torch.zeros(1, 4, 8, 8)})


def test_decode_chunk_frames_below_one_is_a_node_error_and_fails_validation(folder):
    model = load()
    latent = sample(model, text())
    for bad in (0, -3):
        with pytest.raises(Err, match=f"STIV Decode: chunk_frames must be a whole number of frames >= 1.*got {bad}"):
            node("STIVDecode")(model, latent, chunk_frames=bad)
    decode_cls = pack_module("nodes").NODE_CLASS_MAPPINGS["STIVDecode"]
    assert "chunk_frames must be" in decode_cls.VALIDATE_INPUTS(chunk_frames=0)
    assert decode_cls.VALIDATE_INPUTS(chunk_frames=4) is True and decode_cls.VALIDATE_INPUTS() is True
    assert node("STIVDecode")(model, latent, chunk_frames=1)[0].shape == (4, 16, 16, 3)


def test_a_missing_model_or_conditioning_names_the_input(folder):
    model = load()
    cases = [
        (lambda: sample(model, None), "STIV Sampler: conditioning must be a STIV_COND from STIV Text Encode or "
                                      "STIV Image Condition, got nothing \\(not connected\\)"),
        (lambda: sample(None, text()), "STIV Sampler: model must be a STIV_MODEL from STIV Loader, got nothing"),
        (lambda: sample(model, "a prompt"), "STIV Sampler: conditioning must be a STIV_COND .*got str"),
        (lambda: node("STIVKeyframeInterpolate")(model, None, keyframes=2, keyframe_stride=3, **SETTINGS),
         "STIV Keyframe -> Interpolate: conditioning must be"),
        (lambda: node("STIVInterpolateKeyframes")(None, text(), {}, keyframe_stride=3,
                                                  **{k: v for k, v in SETTINGS.items() if k not in ("width", "height")}),
         "STIV Interpolate Keyframes: model must be"),
        (lambda: node("STIVDecode")(None, {"samples": torch.zeros(1, 3, 2, 4, 4)}, chunk_frames=2),
         "STIV Decode: model must be"),
        (lambda: node("STIVImageCondition")(None, images(1), "first", 1), "STIV Image Condition: conditioning must be"),
    ]
    for call, message in cases:
        with pytest.raises(Err, match=message):
            call()


def test_nan_in_given_images_is_reported_naming_the_input(folder):
    bad = images(2)
    bad[1, 3, 4, 0] = float("nan")
    with pytest.raises(Err, match="STIV Image Condition: images holds 1 NaN or infinite values \\(image\\(s\\) \\[1\\]"):
        node("STIVImageCondition")(text(), bad, "first k", 1)
    last = images(1)
    last[0, 0, 0, 1] = float("inf")
    with pytest.raises(Err, match="STIV Image Condition: last_image holds 1 NaN"):
        node("STIVImageCondition")(text(), images(1), "first+last", 1, last_image=last)


def test_nan_in_the_weights_is_refused_at_load(folder):
    from stiv_core.bundle import save_bundle
    from stiv_core.encoders.words import WordTextEncoder
    from tests.fakes import randomize
    from tests.pack import DEFAULTS, VOCAB

    model = randomize(STIVTransformer(preset("tiny", depth=1, hidden_size=32, num_heads=2, text_dim=32,
                                             pooled_text_dim=32, max_text_tokens=8)))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("blocks.0.")).view(-1)[0] = float("nan")
    save_bundle(folder / "nan.safetensors", model, WordTextEncoder(VOCAB, dim=32, max_tokens=8), defaults=DEFAULTS)
    with pytest.raises(Err, match="STIV Loader: cannot load 'nan.safetensors': nan.safetensors holds NaN or "
                                  "infinite weights in blocks.0"):
        load("nan.safetensors")
    assert load().pipeline.model is not None   # the next load works


@pytest.mark.parametrize("name,values,message", [
    ("STIVSampler", dict(steps=0), "steps must be between 1 and 500, got 0"),
    ("STIVSampler", dict(width=-8), "width must be between 4 and 4096, got -8"),
    ("STIVSampler", dict(frames=0), "frames must be between 1 and 1024, got 0"),
    ("STIVSampler", dict(shift=float("nan")), "shift must be a finite number, got nan"),
    ("STIVSampler", dict(scale=float("inf")), "scale must be a finite number"),
    ("STIVSampler", dict(steps=2.5), "steps must be a whole number, got 2.5"),
    ("STIVSampler", dict(seed=-1), "seed must be between 0 and"),
    ("STIVKeyframeInterpolate", dict(keyframes=1), "keyframes must be between 2 and 256, got 1"),
    ("STIVKeyframeInterpolate", dict(keyframe_stride=0), "keyframe_stride must be between 1 and 256, got 0"),
    ("STIVInterpolateKeyframes", dict(shift=0.0), "shift must be between 0.05 and 20.0, got 0.0"),
])
def test_a_bad_widget_value_fails_validation_naming_the_input_and_the_node_refuses_it(folder, name, values, message):
    cls = pack_module("nodes").NODE_CLASS_MAPPINGS[name]
    assert message in cls.VALIDATE_INPUTS(**values)
    assert cls.VALIDATE_INPUTS() is True   # linked inputs are not known at validation: checked when it runs
    good = {"STIVSampler": dict(frames=4, frame_stride=1), "STIVKeyframeInterpolate": dict(keyframes=2,
            keyframe_stride=3), "STIVInterpolateKeyframes": dict(keyframe_stride=3)}[name]
    assert cls.VALIDATE_INPUTS(**{k: v for k, v in {**SETTINGS, **good}.items()
                                  if k in cls.VALIDATE_INPUTS.__code__.co_varnames}) is True
    if name == "STIVSampler":   # a linked value reaches the node: refused before sampling, naming the input
        with pytest.raises(Err, match=f"STIV Sampler: {next(iter(values))} must be"):
            sample(load(), text(), **values)
