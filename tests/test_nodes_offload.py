"""The nodes inside ComfyUI's memory management: STIV's weights are on the device only while a sampler runs
(ComfyUI is first asked to make room for the planned peak), previews follow ComfyUI's preview settings,
'auto' weight dtype is ComfyUI's choice, and STIV Decode reports progress and can be interrupted."""
from __future__ import annotations

import dataclasses
import sys
import types as pytypes

import pytest
import torch

from tests.pack import (SETTINGS, InterruptProcessingException, fake_comfy, load, node, pack_module, sample,
                        text, write_small_bundle)


_comfy = pack_module("nodes._comfy")
run = pack_module("nodes.run")
memory = pack_module("stiv_core.memory.options")


@pytest.fixture
def comfyui(tmp_path, monkeypatch):
    """The stand-in ComfyUI of test_nodes_comfy, with model management's memory calls and its CLI args."""
    calls = []
    modules, _ = fake_comfy(tmp_path, calls)
    mm = modules["comfy.model_management"]
    mm.free_memory = lambda needed, device, keep_loaded=(): calls.append(("free_memory", needed, device.type))
    mm.extra_reserved_memory = lambda: 1000
    mm.should_use_bf16 = lambda device=None, **kw: calls.append("should_use_bf16") or False
    mm.should_use_fp16 = lambda device=None, **kw: True


    class ProgressBar:   # as test_nodes_comfy's, for bars without a preview too (STIV Decode)
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls.append(("progress", value, total, None if preview is None else preview[0]))
            if value == 1 and "interrupt at 1" in calls:
                mm.interrupt_current_processing(True)
    modules["comfy.utils"].ProgressBar = ProgressBar
    cli = pytypes.ModuleType("comfy.cli_args")
    cli.args = pytypes.SimpleNamespace(preview_method=pytypes.SimpleNamespace(value="auto"), preview_size=8)
    modules["comfy.cli_args"] = cli
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    _comfy.register_model_folder()
    write_small_bundle(tmp_path / "stiv")
    return calls, cli.args


class RecordingHandle(memory.MemoryHandle):
    """A handle that says its device is a GPU and records what the nodes ask of it (the weights stay on
    the CPU, so this runs anywhere; the real moves are tested in test_memory_options / test_swap)."""

    def load(self):
        self.events.append("load")

    def offload(self):
        self.events.append("offload")


def on_gpu(model, events):
    fields = {f.name: getattr(model.memory, f.name) for f in dataclasses.fields(memory.MemoryHandle)}
    handle = RecordingHandle(**{**fields, "device": torch.device("cuda")})
    handle.events = events
    encoder = model.pipeline.text_encoder
    encoder.to = lambda device, _to=encoder.to: (events.append(f"text encoder to {torch.device(device).type}"),
                                                 _to("cpu"))[1]
    return dataclasses.replace(model, memory=handle)


def test_a_run_makes_room_loads_then_offloads_even_when_interrupted(comfyui):
    calls, _ = comfyui
    model = load()
    events = []
    gpu = on_gpu(model, events)
    sample(gpu, text(), steps=2)
    free = [c for c in calls if isinstance(c, tuple) and c[0] == "free_memory"]
    expected = run.needed_bytes(gpu, run.SamplingSettings(**SETTINGS).run_shape(4, 1))
    assert free == [("free_memory", expected + 1000, "cuda")] and expected > 0
    assert events == ["load", "text encoder to cuda", "offload", "text encoder to cpu"]
    # the planned peak grows with the run: a longer video asks for more room
    assert run.needed_bytes(gpu, run.SamplingSettings(**SETTINGS).run_shape(16, 1)) > expected
    events.clear()
    calls.append("interrupt at 1")
    with pytest.raises(InterruptProcessingException):
        sample(gpu, text(), steps=3)
    assert events[-2:] == ["offload", "text encoder to cpu"]


def test_out_of_memory_while_loading_or_sampling_puts_the_weights_back_and_says_what_to_do(comfyui):
    calls, _ = comfyui
    events = []
    gpu = on_gpu(load(), events)

    def out_of_memory():   # a move to the device that runs out half way
        events.append("load")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    gpu.memory.load = out_of_memory
    with pytest.raises(pack_module("nodes.types").STIVInputError, match="out of device memory.*Swap more blocks"):
        sample(gpu, text(), steps=1)
    assert events[0] == "load" and "offload" in events and events[-1] == "text encoder to cpu"
    assert "soft_empty_cache" in calls


def test_the_loader_keeps_the_weights_off_the_device_and_a_cpu_run_moves_nothing(comfyui, monkeypatch):
    calls, _ = comfyui
    options = []
    real = memory.apply_memory_options
    loader = pack_module("nodes.loader")
    monkeypatch.setattr(loader, "apply_memory_options", lambda model, opts, **kw: options.append(kw) or real(model, opts, **kw))
    model = load()
    assert options == [{"offloaded": True}] and not model.memory.offloaded   # the CPU: nothing to move
    sample(model, text(), steps=1)
    assert not [c for c in calls if isinstance(c, tuple) and c[0] == "free_memory"]


def test_previews_follow_comfyuis_method_and_size(comfyui):
    calls, args = comfyui
    model = load()
    sample(model, text(), steps=1)
    progress = [c for c in calls if isinstance(c, tuple) and c[0] == "progress"]
    assert progress == [("progress", 1, 1, "JPEG")]
    bars = []

    class Bar:
        def __init__(self, total):
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.preview = preview

    sys.modules["comfy.utils"].ProgressBar = Bar
    sample(model, text(), steps=1)
    assert bars[-1].preview[2] == 8   # --preview-size
    args.preview_method = pytypes.SimpleNamespace(value="none")   # ComfyUI's default: no previews at all
    sample(model, text(), steps=1)
    assert bars[-1].preview is None


def test_auto_weight_dtype_is_comfyuis_choice(comfyui):
    calls, _ = comfyui
    loader = pack_module("nodes.loader")
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype("auto", torch.device("cuda")) == torch.float16   # no bf16 on this "GPU"
    assert "should_use_bf16" in calls
    assert loader.resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16


def test_decode_reports_each_chunk_and_can_be_interrupted(comfyui):
    calls, _ = comfyui
    model = load()
    latent = sample(model, text(), steps=1)
    calls.clear()
    images = node("STIVDecode")(model, latent, chunk_frames=1)[0]
    assert images.shape == (4, 16, 16, 3)
    assert [c[1:3] for c in calls if isinstance(c, tuple)] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls.append("interrupt at 1")
    with pytest.raises(InterruptProcessingException):
        node("STIVDecode")(model, latent, chunk_frames=1)
    assert not _comfy.interrupt_requested()
