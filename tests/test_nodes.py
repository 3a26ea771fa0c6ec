"""The STIV nodes end to end without ComfyUI on a small random bundle: T2V, TI2V, interpolation, video
prediction, long video; progress with previews; interrupt; the loader's folders and options."""
from __future__ import annotations

import pytest
import torch

from safetensors.torch import save_file

from tests.pack import (MODEL_FILE, SETTINGS, SIZE, decode, images, load, node, pack_module, sample, text,
                        write_small_bundle)


nodes = pack_module("nodes")
_comfy = pack_module("nodes._comfy")
types = pack_module("nodes.types")
BUILTINS = ["tiny (built-in)", "tiny-mv (built-in)"]   # the video and the multi-view model, both shipped


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_small_bundle(folder)
    (folder / "notes.txt").write_text("not a model")
    # a user's other model beside it: a safetensors file without a STIV config (e.g. an SDXL UNet)
    save_file({"weight": torch.zeros(2)}, str(folder / "sdxl_unet.safetensors"), metadata={"format": "pt"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STIV_MODEL_DIRS", str(folder))
        yield load()


def test_loader_lists_only_model_files_and_the_builtin(model):
    choices = nodes.STIVLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert choices == [*BUILTINS, MODEL_FILE]
    assert model.defaults.num_frames == 4 and model.pipeline.device.type == "cpu"


def test_the_loader_says_a_file_without_a_stiv_config_is_not_stiv(model):
    with pytest.raises(types.STIVInputError, match=r"this is not a STIV checkpoint \(no STIV config in its metadata\)"):
        load("sdxl_unet.safetensors")


def test_a_file_rewritten_as_stiv_is_listed(model, tmp_path, monkeypatch):
    """The listing reads each file's header once, until the file changes."""
    monkeypatch.setenv("STIV_MODEL_DIRS", str(tmp_path))
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "later.safetensors"))
    assert nodes.STIVLoader.INPUT_TYPES()["required"]["model_name"][0] == BUILTINS
    write_small_bundle(tmp_path, name="later.safetensors")
    assert nodes.STIVLoader.INPUT_TYPES()["required"]["model_name"][0] == [*BUILTINS, "later.safetensors"]


def test_text_to_video_is_seeded_and_decodes_to_comfy_images(model):
    latent = sample(model, text())
    assert latent["samples"].shape == (1, 3, 4, 16, 16)
    video = decode(model, latent)
    assert video.shape == (4, 16, 16, 3) and 0 <= video.min() and video.max() <= 1
    torch.testing.assert_close(sample(model, text())["samples"], latent["samples"], rtol=0, atol=0)
    assert not torch.equal(sample(model, text(), seed=4)["samples"], latent["samples"])
    assert not torch.equal(sample(model, text("a blue square moving right"))["samples"], latent["samples"])
    # the guidance widgets reach the sampler: jit at scale 1 is no guidance; with no image, sit is jit
    none = sample(model, text(), guidance="none")["samples"]
    assert not torch.allclose(none, latent["samples"])
    torch.testing.assert_close(sample(model, text(), guidance="jit", scale=1.0)["samples"], none)
    torch.testing.assert_close(sample(model, text(), guidance="sit")["samples"], latent["samples"])


@pytest.mark.parametrize("frames,count,given", [
    ("first", 1, [0]), ("last", 1, [5]), ("first k", 3, [0, 1, 2]), ("keyframes", 3, [0, 2, 4])])
def test_given_frames_come_out_exactly(model, frames, count, given):
    picture = images(count)
    cond = node("STIVImageCondition")(text(), picture, frames, 2)[0]
    video = decode(model, sample(model, cond, frames=6))
    # 8-bit-exact: the pixel VAE is the identity and frame replacement keeps the given frames
    torch.testing.assert_close(video[given], picture, atol=1e-6, rtol=0)
    free = [i for i in range(6) if i not in given]
    assert (video[free] - picture[:1]).abs().mean() > 0.05


def test_interpolation_with_a_separate_last_image_and_resized_inputs(model, caplog):
    first, last = images(1, 1, 20, 24), images(1, 2, 20, 24)
    cond = node("STIVImageCondition")(text(), first, "first+last", 1, last_image=last)[0]
    video = decode(model, sample(model, cond, frames=4))
    assert video.shape == (4, 16, 16, 3) and "resized" in caplog.text
    fitted = [types.ImageCondition(types.image_to_pixels(x), "first").frame_condition(1, 16, 16).pixels
              for x in (first, last)]
    expected = torch.cat([(p[0, :, 0].permute(1, 2, 0) + 1) / 2 for p in fitted]).view(2, 16, 16, 3)
    torch.testing.assert_close(video[[0, 3]], expected, atol=1e-6, rtol=0)


def test_long_video_shares_its_keyframes_with_a_keyframe_pass(model):
    long = node("STIVKeyframeInterpolate")(model, text(), keyframes=2, keyframe_stride=3, **SETTINGS)[0]
    assert long["samples"].shape[2] == (2 - 1) * 3 + 1
    keys = node("STIVSampler")(model, text(), frames=2, frame_stride=3, **SETTINGS)[0]
    torch.testing.assert_close(long["samples"][:, :, [0, 3]], keys["samples"], rtol=0, atol=0)
    # a first image conditions the keyframe pass, so it is frame 0 of the long video
    picture = images(1, 5)
    cond = node("STIVImageCondition")(text(), picture, "first", 1)[0]
    long = node("STIVKeyframeInterpolate")(model, cond, keyframes=2, keyframe_stride=3, **SETTINGS)[0]
    torch.testing.assert_close(decode(model, long)[0], picture[0], atol=1e-6, rtol=0)


def test_keyframes_then_interpolate_keyframes_equals_the_one_node_long_video(model):
    picture = images(1, 5)
    cond = node("STIVImageCondition")(text(), picture, "first", 1)[0]
    one_node = node("STIVKeyframeInterpolate")(model, cond, keyframes=4, keyframe_stride=3, **SETTINGS)[0]
    keys = node("STIVSampler")(model, cond, frames=4, frame_stride=3, **SETTINGS)[0]
    chained_settings = {k: v for k, v in SETTINGS.items() if k not in SIZE}   # the size comes from the keys
    chained = node("STIVInterpolateKeyframes")(model, cond, keys, keyframe_stride=3, **chained_settings)[0]
    assert chained["samples"].shape == one_node["samples"].shape == (1, 3, 10, 16, 16)
    assert torch.equal(chained["samples"], one_node["samples"])
    assert torch.equal(chained["samples"][:, :, ::3], keys["samples"])
    # another seed on the second pass: the keyframes stay, the frames between them change
    other = node("STIVInterpolateKeyframes")(model, cond, keys, keyframe_stride=3, **{**chained_settings, "seed": 9})[0]
    assert torch.equal(other["samples"][:, :, ::3], keys["samples"])
    assert not torch.equal(other["samples"], chained["samples"])

class Recorder:
    def __init__(self, total):
        self.total, self.calls = total, []

    def update_absolute(self, value, total=None, preview=None):
        self.calls.append((value, total, preview))


def test_progress_reports_every_step_with_a_preview_image(model, monkeypatch):
    bars = []
    monkeypatch.setattr(_comfy, "progress_bar", lambda total: bars.append(Recorder(total)) or bars[-1])
    sample(model, text(), steps=3)
    node("STIVKeyframeInterpolate")(model, text(), keyframes=2, keyframe_stride=3, **{**SETTINGS, "steps": 3})
    assert [c[:2] for c in bars[0].calls] == [(1, 3), (2, 3), (3, 3)]
    assert [c[0] for c in bars[1].calls] == [1, 2, 3, 4, 5, 6] and bars[1].total == 6
    kind, image, size = bars[0].calls[-1][2]
    assert kind == "JPEG" and image.size == (16, 16) and size == 512


def test_interrupt_between_steps_raises_frees_and_the_next_run_works(model, monkeypatch):
    expected = sample(model, text(), steps=3)["samples"]
    seen = []

    def interrupt_after_first(total):
        bar = Recorder(total)
        bar.update_absolute = lambda value, total=None, preview=None: (seen.append(value), _comfy.request_interrupt())
        return bar

    freed = []
    monkeypatch.setattr(_comfy, "progress_bar", interrupt_after_first)
    monkeypatch.setattr(_comfy, "free_memory", lambda real=_comfy.free_memory: (freed.append(1), real()))
    with pytest.raises(_comfy.Interrupted):
        sample(model, text(), steps=3)
    assert seen == [1] and freed == [1] and not _comfy.interrupt_requested()
    monkeypatch.undo()
    torch.testing.assert_close(sample(model, text(), steps=3)["samples"], expected, rtol=0, atol=0)


def test_loader_options_quantization_and_block_swap_run(model):
    swapped = load(block_swap=1, quantization="fp8-scaled")
    assert swapped.memory.swapper is not None and swapped.memory.report.replaced > 0
    latent = sample(swapped, text())
    assert torch.isfinite(latent["samples"]).all()
    swapped.memory.remove()
