"""Block swap: streamed output is bit-identical to resident; the ring's order, traffic and safety."""
from __future__ import annotations

import copy

import pytest
import torch

from stiv_core.memory.quant import FP8Format, QuantConfig, QuantMode, quantize_blocks
from stiv_core.memory.swap import BlockSwapper

DEVICE = "cpu"  # the same machinery as CUDA with synchronous copies (see swap.py)


def _forward(model, inputs):
    with torch.inference_mode():
        return model(**inputs)


class TestBitIdentical:
    @pytest.mark.parametrize("swap,prefetch", [(1, 1), (2, 1), (4, 1), (4, 2), (4, 5)])
    def test_swapped_equals_resident(self, make_model, make_inputs, tiny_config, swap, prefetch):
        model = make_model(depth=4)
        inputs = make_inputs(tiny_config)
        expected = _forward(model, inputs)
        swapper = BlockSwapper(model, swap, device=DEVICE, prefetch=prefetch).attach()
        for _ in range(3):  # the ring wraps around across forwards (sampling steps)
            assert torch.equal(_forward(model, inputs), expected)
        swapper.remove()
        assert torch.equal(_forward(model, inputs), expected)

    def test_maskdit_extra_blocks_stream_too(self, make_model, make_inputs, tiny_config):
        model = make_model(depth=3, maskdit_extra_blocks=2)
        inputs = make_inputs(tiny_config)
        keep = torch.tensor([[0, 2, 5, 7, 9, 12, 14, 15]] * 2)
        with torch.inference_mode():
            expected = model(**inputs, keep_index=keep)
        BlockSwapper(model, 4, device=DEVICE).attach()
        with torch.inference_mode():
            assert torch.equal(model(**inputs, keep_index=keep), expected)

    @pytest.mark.parametrize("mode", [QuantMode.FP8_SCALED, QuantMode.INT8, QuantMode.NF4])
    def test_composes_with_quantization(self, make_model, make_inputs, tiny_config, mode):
        model = make_model(depth=4)
        quantize_blocks(model, QuantConfig(mode, FP8Format.E4M3FN))
        inputs = make_inputs(tiny_config)
        expected = _forward(model, inputs)
        BlockSwapper(model, 3, device=DEVICE).attach()
        for _ in range(2):
            assert torch.equal(_forward(model, inputs), expected)


class TestRing:
    def test_traffic_is_streamed_blocks_once_per_forward(self, make_model, make_inputs, tiny_config):
        model = make_model(depth=4)
        swapper = BlockSwapper(model, 3, device=DEVICE, prefetch=1).attach()
        assert swapper.ring_size == 2
        inputs = make_inputs(tiny_config)
        _forward(model, inputs)
        first = swapper.stats.loads
        # First forward: 3 loads plus the wrap-around prefetch of the first streamed block.
        assert first == 4
        _forward(model, inputs)
        assert swapper.stats.loads - first == 3
        assert swapper.stats.bytes_copied == 7 * swapper.block_bytes

    def test_ring_that_holds_every_streamed_block_loads_once(self, make_model, make_inputs, tiny_config):
        model = make_model(depth=4)
        swapper = BlockSwapper(model, 2, device=DEVICE, prefetch=3).attach()
        assert swapper.ring_size == 2
        inputs = make_inputs(tiny_config)
        for _ in range(3):
            _forward(model, inputs)
        assert swapper.stats.loads == 2

    def test_model_holds_master_copies_between_blocks(self, make_model, make_inputs, tiny_config):
        model = make_model(depth=3)
        masters = {n: p.detach().clone() for n, p in model.blocks[2].named_parameters()}
        swapper = BlockSwapper(model, 1, device=DEVICE).attach()
        ptrs = {n: p.data_ptr() for n, p in model.blocks[2].named_parameters()}
        seen = {}
        # Registered after the swapper's pre-hook, so it sees what the block computes with.
        model.blocks[2].register_forward_pre_hook(
            lambda m, a: seen.update({n: p.data_ptr() for n, p in m.named_parameters()}))
        _forward(model, make_inputs(tiny_config))
        slot_ptrs = {t.data_ptr() for t in swapper._slots[0].tensors}
        assert seen and set(seen.values()) <= slot_ptrs       # during the block: the ring buffer
        after = {n: p.data_ptr() for n, p in model.blocks[2].named_parameters()}
        assert after == ptrs                         # after: the master, untouched
        for n, p in model.blocks[2].named_parameters():
            assert torch.equal(p, masters[n])

    def test_exception_in_block_restores_master(self, make_model, make_inputs, tiny_config):
        model = make_model(depth=2)
        BlockSwapper(model, 1, device=DEVICE).attach()
        ptrs = [p.data_ptr() for p in model.blocks[1].parameters()]
        inputs = make_inputs(tiny_config)
        # a mask of the wrong shape (past TextEmbedding's own check): cross-attention raises inside a block
        object.__setattr__(inputs["text"], "mask", inputs["text"].mask[:, :2])
        with pytest.raises(RuntimeError):
            _forward(model, inputs)
        assert [p.data_ptr() for p in model.blocks[1].parameters()] == ptrs


class TestCpuAliasing:
    """cpu_copies=False: the same ring bookkeeping, slots pointing at the masters, nothing copied."""

    @pytest.mark.parametrize("swap,prefetch", [(1, 1), (3, 1), (4, 2)])
    def test_equals_resident_and_copies_nothing(self, make_model, make_inputs, tiny_config, swap, prefetch):
        model = make_model(depth=4)
        inputs = make_inputs(tiny_config)
        expected = _forward(model, inputs)
        copying = BlockSwapper(copy.deepcopy(model), swap, device=DEVICE, prefetch=prefetch).attach()
        aliasing = BlockSwapper(model, swap, device=DEVICE, prefetch=prefetch, cpu_copies=False).attach()
        for _ in range(3):
            assert torch.equal(_forward(model, inputs), expected)
            _forward(copying.model, inputs)
        assert aliasing.stats.loads == copying.stats.loads > 0  # the same ring order
        assert aliasing.stats.bytes_copied == 0 < copying.stats.bytes_copied

    def test_blocks_compute_with_their_masters(self, make_model, make_inputs, tiny_config):
        model = make_model(depth=3)
        swapper = BlockSwapper(model, 2, device=DEVICE, cpu_copies=False).attach()
        masters = [[p.data_ptr() for p in block.parameters()] for block in model.blocks[1:]]
        seen = []
        for block in model.blocks[1:]:
            block.register_forward_pre_hook(lambda m, a: seen.append([p.data_ptr() for p in m.parameters()]))
        _forward(model, make_inputs(tiny_config))
        assert seen == masters and swapper.stats.loads >= 2


class TestErrors:
    def test_gradients_are_refused(self, make_model, make_inputs, tiny_config):
        model = make_model(depth=2).requires_grad_(True)
        BlockSwapper(model, 1, device=DEVICE).attach()
        with pytest.raises(RuntimeError, match="inference"):
            model(**make_inputs(tiny_config))

    def test_out_of_range(self, make_model):
        with pytest.raises(ValueError, match=r"0\.\.2"):
            BlockSwapper(make_model(depth=2), 3, device=DEVICE)
        with pytest.raises(ValueError, match="prefetch"):
            BlockSwapper(make_model(depth=2), 1, device=DEVICE, prefetch=0)

    def test_mixed_blocks_are_refused(self, make_model):
        model = make_model(depth=3)
        quantize_blocks(model, QuantConfig(QuantMode.FP8, FP8Format.E4M3FN))
        model.blocks[2] = copy.deepcopy(make_model(depth=3).blocks[2])  # one block left unquantized
        with pytest.raises(ValueError, match="identical"):
            BlockSwapper(model, 2, device=DEVICE).attach()

    def test_park_frees_the_ring_and_unpark_runs_the_same(self, make_model, make_inputs, tiny_config):
        # between runs (nodes offload the model): no ring buffers held; after unpark the output is identical
        model = make_model(depth=4)
        inputs = make_inputs(tiny_config)
        expected = _forward(model, inputs)
        swapper = BlockSwapper(model, 3, device=DEVICE, prefetch=1).attach()
        assert torch.equal(_forward(model, inputs), expected)
        swapper.park()
        assert swapper._slots == [] and swapper._slot_of == {}
        swapper.unpark()
        assert len(swapper._slots) == swapper.ring_size
        for _ in range(2):
            assert torch.equal(_forward(model, inputs), expected)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
    def test_cuda_missing_is_a_clear_error(self, make_model):
        with pytest.raises(RuntimeError, match="needs CUDA"):
            BlockSwapper(make_model(depth=2), 1, device="cuda").attach()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCuda:
    @pytest.mark.parametrize("mode", [QuantMode.NONE, QuantMode.FP8_SCALED, QuantMode.NF4])
    def test_streamed_on_cuda_equals_resident(self, make_model, make_inputs, tiny_config, mode):
        model = make_model(depth=4, dtype=torch.bfloat16)
        quantize_blocks(model, QuantConfig(mode, FP8Format.E4M3FN))
        inputs = {k: v.cuda() for k, v in make_inputs(tiny_config, dtype=torch.bfloat16).items()}
        resident = copy.deepcopy(model).cuda()
        expected = _forward(resident, inputs)
        swapper = BlockSwapper(model, 3, device="cuda", prefetch=1).attach()
        assert all(m.is_pinned() for ms in swapper._masters for m in ms)
        for _ in range(3):
            assert torch.equal(_forward(model, inputs), expected)
        assert all(p.device.type == "cpu" for b in model.all_blocks()[1:] for p in b.parameters())
        swapper.park()   # between runs: nothing of the model left on the GPU
        assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
        swapper.unpark()
        assert model.patch_embed.weight.device.type == "cuda"
        assert torch.equal(_forward(model, inputs), expected)


def test_all_blocks_are_the_blocks_in_run_order_with_their_state_dict_names(make_model):
    model = make_model(depth=3, maskdit_extra_blocks=2)
    names = [name for name, _ in model.named_blocks()]
    assert names == ["blocks.0", "blocks.1", "blocks.2", "extra_blocks.0", "extra_blocks.1"]
    assert model.all_blocks() == [*model.blocks, *model.extra_blocks]
    assert model.config.num_blocks == len(model.all_blocks()) == 5  # what the planner counts without a model
    modules = dict(model.named_modules())
    assert all(modules[name] is block for name, block in model.named_blocks())
