"""apply_memory_options: the one entry point; its fallbacks say why, and a run that won't fit stops."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from stiv_core.memory import options as options_mod
from stiv_core.memory.options import MemoryOptions, WontFitError, apply_memory_options
from stiv_core.memory.planner import Budget, RunShape
from stiv_core.memory.quant import FP8Format, QuantConfig, QuantMode, quantize_blocks
from stiv_core.model.attention import AttentionBackend

CPU = dict(device="cpu")


def _run(model, inputs):
    with torch.inference_mode():
        return model(**inputs)


def test_quantize_and_swap_equal_quantize_alone(make_model, make_inputs, tiny_config):
    reference = make_model(depth=4)
    quantize_blocks(reference, QuantConfig(QuantMode.FP8_SCALED, FP8Format.E4M3FN))
    inputs = make_inputs(tiny_config)
    handle = apply_memory_options(make_model(depth=4), MemoryOptions(QuantMode.FP8_SCALED, block_swap=3, **CPU))
    assert handle.swapper is not None and handle.report.replaced == 36
    assert any("e4m3fn" in n for n in handle.notes)
    assert torch.equal(_run(handle.model, inputs), _run(reference, inputs))


def test_auto_plans_and_refuses_a_run_that_wont_fit(make_model, tiny_config):
    shape = RunShape(4, 8, 8)
    with pytest.raises(ValueError, match="needs the run's shape"):
        apply_memory_options(make_model(), MemoryOptions(block_swap="auto", **CPU))
    with pytest.raises(WontFitError, match="DOES NOT FIT"):
        apply_memory_options(make_model(), MemoryOptions(block_swap="auto", **CPU), shape=shape,
                             budget=Budget(10_000, 10 ** 9, "cpu"))
    forced = apply_memory_options(make_model(), MemoryOptions(block_swap="auto", force=True, **CPU), shape=shape,
                                  budget=Budget(10_000, 10 ** 9, "cpu"))
    assert not forced.plan.fits and any("will not fit" in n for n in forced.notes)
    roomy = apply_memory_options(make_model(), MemoryOptions(block_swap="auto", **CPU), shape=shape,
                                 budget=Budget(10 ** 9, 10 ** 9, "cpu"))
    assert roomy.plan.fits and roomy.plan.blocks_to_swap == 0 and roomy.swapper is None


def test_auto_swaps_when_the_budget_is_between(make_model):
    shape = RunShape(4, 8, 8)
    model = make_model(depth=4)
    full = apply_memory_options(copy.deepcopy(model), MemoryOptions(block_swap=0, **CPU), shape=shape,
                                budget=Budget(10 ** 9, 10 ** 9, "cpu")).plan
    budget = Budget(full.peak_bytes - full.block_bytes // 2, 10 ** 9, "cpu")
    handle = apply_memory_options(model, MemoryOptions(block_swap="auto", **CPU), shape=shape, budget=budget)
    assert handle.plan.blocks_to_swap > 0 and handle.plan.peak_bytes <= budget.device_free
    assert len(handle.swapper.streamed) == handle.plan.blocks_to_swap


def test_bnb_unusable_falls_back_to_fp8_scaled(monkeypatch, make_model, caplog):
    monkeypatch.setattr(options_mod, "bnb_unusable", lambda device: "bitsandbytes is not installed")
    with caplog.at_level(logging.WARNING):
        handle = apply_memory_options(make_model(), MemoryOptions(QuantMode.NF4, **CPU))
    assert handle.quant.mode is QuantMode.FP8_SCALED
    assert "falling back to fp8-scaled" in caplog.text and "not installed" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on machines without CUDA")
def test_missing_cuda_falls_back_to_cpu(make_model, make_inputs, tiny_config):
    handle = apply_memory_options(make_model(), MemoryOptions(block_swap=1, device="cuda"))
    assert handle.device.type == "cpu" and any("CUDA" in n for n in handle.notes)
    _run(handle.model, make_inputs(tiny_config))


def test_sage_without_cuda_is_noted_and_runs_as_sdpa(make_model, make_inputs, tiny_config):
    inputs = make_inputs(tiny_config)
    expected = _run(make_model(), inputs)
    handle = apply_memory_options(make_model(), MemoryOptions(attention=AttentionBackend.SAGE, **CPU))
    assert any("sage" in n for n in handle.notes)
    assert torch.equal(_run(handle.model, inputs), expected)


def test_compiled_blocks_with_swap_match(make_model, make_inputs, tiny_config):
    inputs = make_inputs(tiny_config)
    expected = _run(make_model(), inputs)
    # "eager" runs dynamo's tracing without code generation: the hooks/compile interplay, fast.
    handle = apply_memory_options(make_model(), MemoryOptions(block_swap=1, compile=True, compile_backend="eager",
                                                              **CPU))
    for _ in range(2):
        torch.testing.assert_close(_run(handle.model, inputs), expected, rtol=1e-5, atol=1e-6)
    handle.remove()
    torch.testing.assert_close(_run(handle.model, inputs), expected, rtol=1e-5, atol=1e-6)


def test_bad_choices_list_what_is_allowed():
    with pytest.raises(ValueError, match="'auto'"):
        MemoryOptions(block_swap="half")
    with pytest.raises(ValueError):
        MemoryOptions(quant="int4")
    assert MemoryOptions(block_swap="7").block_swap == 7


def test_offload_is_a_no_op_on_the_cpu_and_tracks_state(make_model, make_inputs, tiny_config):
    model = make_model(depth=2)
    inputs = make_inputs(tiny_config)
    expected = _run(model, inputs)
    handle = apply_memory_options(model, MemoryOptions(**CPU))
    handle.offload()
    assert not handle.offloaded   # the CPU is where the weights live anyway
    handle.load()
    assert torch.equal(_run(model, inputs), expected)


@pytest.mark.parametrize("swap", [0, 2])
def test_applied_offloaded_on_the_cpu_runs_as_is(make_model, make_inputs, tiny_config, swap):
    model = make_model(depth=3)
    inputs = make_inputs(tiny_config)
    expected = _run(copy.deepcopy(model), inputs)
    handle = apply_memory_options(model, MemoryOptions(block_swap=swap, **CPU), offloaded=True)
    assert not handle.offloaded   # the CPU is where it runs: a swap ring is there, nothing to load
    assert torch.equal(_run(model, inputs), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("swap", [0, 1])
@pytest.mark.parametrize("at_load", [False, True])
def test_offload_leaves_nothing_on_the_gpu_and_load_restores(make_model, make_inputs, tiny_config, swap, at_load):
    model = make_model(depth=3)
    inputs = make_inputs(tiny_config)
    expected = _run(copy.deepcopy(model), inputs)
    handle = apply_memory_options(model, MemoryOptions(block_swap=swap, device="cuda"), offloaded=at_load)
    if not at_load:
        handle.offload()
    assert handle.offloaded and all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    handle.load()
    out = _run(model, {k: v.cuda() for k, v in inputs.items()})
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_block_swap_is_a_count_or_none_for_auto():
    assert MemoryOptions(block_swap="auto").block_swap is None
    assert MemoryOptions(block_swap=None).block_swap is None
    assert MemoryOptions().block_swap == 0 and MemoryOptions(block_swap=3).block_swap == 3
    for bad in (True, -1, 1.5):
        with pytest.raises(ValueError, match="'auto'"):
            MemoryOptions(block_swap=bad)


def test_resolvers_return_their_notes_instead_of_appending_to_a_list():
    device, notes = options_mod.resolve_device("cpu")
    assert device.type == "cpu" and notes == []
    quant, notes = options_mod.resolve_quant(MemoryOptions(QuantMode.FP8_SCALED, **CPU), device)
    assert quant.fp8_format is not None and len(notes) == 1 and "fp8 format" in notes[0]


def test_plan_run_is_what_apply_memory_options_decides_with(make_model):
    """The one entry point: the handle's plan is plan_run's for the same budget, and an unknown budget is
    planned unchecked, with a note, instead of refusing on a guess."""
    shape, budget = RunShape(4, 8, 8), Budget(10 ** 9, 10 ** 9, "cpu")
    model = make_model(depth=3)
    handle = apply_memory_options(copy.deepcopy(model), MemoryOptions(block_swap=None, **CPU), shape=shape,
                                  budget=budget)
    run = options_mod.plan_run(model.config, shape, MemoryOptions(block_swap=None, **CPU),
                               device=torch.device("cpu"), quant=QuantConfig(), dtype=torch.float32, budget=budget)
    assert run.plan == handle.plan and run.notes == ()
    unknown = Budget(None, None, "cpu", unknown="psutil is not installed")
    run = options_mod.plan_run(model.config, shape, MemoryOptions(**CPU), device=torch.device("cpu"),
                               quant=QuantConfig(), dtype=torch.float32, budget=unknown)
    assert run.plan.fits and "not checked: psutil is not installed" in run.plan.reason
    assert any("psutil is not installed" in n for n in run.notes)
    run.require_fit()   # an unknown budget never refuses


def test_a_probed_budget_counts_the_loaded_weights_once(make_model, monkeypatch):
    """The weights are already in the RAM the probe reads: a run needing little more than them fits."""
    from stiv_core.memory import ram
    from stiv_core.model.sizes import tensor_bytes

    shape = RunShape(4, 8, 8)
    model = make_model(depth=3)
    peak = apply_memory_options(copy.deepcopy(model), MemoryOptions(**CPU), shape=shape,
                                budget=Budget(10 ** 9, 10 ** 9, "cpu")).plan.peak_bytes
    weights = tensor_bytes(model)
    available = peak - weights + 1024   # enough for the activations only
    monkeypatch.setattr(ram, "host_ram", lambda: ram.HostRAM(10 ** 9, available, "test"))
    assert apply_memory_options(copy.deepcopy(model), MemoryOptions(**CPU), shape=shape).plan.fits
    monkeypatch.setattr(ram, "host_ram", lambda: ram.HostRAM(10 ** 9, available - 2048, "test"))
    with pytest.raises(WontFitError, match="of RAM free"):
        apply_memory_options(copy.deepcopy(model), MemoryOptions(**CPU), shape=shape)
