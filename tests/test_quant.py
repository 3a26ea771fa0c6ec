"""Quantized weights: round-trip bounds per format, the tiny model within a stated error per mode,
what stays in high precision, quantized checkpoints, and clear errors when bitsandbytes is unusable."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from stiv_core.checkpoint import CheckpointError, save_model
from stiv_core.memory import bnb as bnb_mod
from stiv_core.memory.quant import (FP8Format, FP8Linear, QuantConfig, QuantMode, ScaleGranularity,
                                    dequantize_fp8, fp8_format_for, quantize_blocks, quantize_fp8)
from stiv_core.memory.quant_io import load_quantized, save_quantized, stored_quantization
from stiv_core.model.sizes import tensor_bytes

E4, E5 = FP8Format.E4M3FN, FP8Format.E5M2
# Relative L2 error of the tiny model's output against float32, per mode (stated in README "Low VRAM").
# Every Linear of every block is quantized and errors compound over the blocks, so these are looser
# than one layer's: per layer fp8 e4m3 ~2.5%, e5m2 ~5%, int8 ~0.5%, nf4 ~8%.
MODEL_TOLERANCE = {
    QuantConfig(QuantMode.FP8, E4): 0.08,
    QuantConfig(QuantMode.FP8, E5): 0.12,
    QuantConfig(QuantMode.FP8_SCALED, E4): 0.05,
    QuantConfig(QuantMode.FP8_SCALED, E4, ScaleGranularity.BLOCK, 16): 0.05,
    QuantConfig(QuantMode.FP8_SCALED, E5): 0.10,
    QuantConfig(QuantMode.INT8): 0.02,
    QuantConfig(QuantMode.NF4): 0.25,
}


def _wide_range(seed: int = 0) -> torch.Tensor:
    """Weights spanning six decades, rows of very different magnitude (what scales are for)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g) * torch.logspace(-4, 2, 64)[:, None]
    return w


class TestRoundTrip:
    @pytest.mark.parametrize("fmt", [E4, E5])
    @pytest.mark.parametrize("granularity", [None, ScaleGranularity.CHANNEL, ScaleGranularity.BLOCK])
    def test_fp8_within_format_bound(self, fmt, granularity):
        w = _wide_range()
        if granularity is None:
            w = w.clamp(-400, 400)  # plain fp8 has no scale: keep within e4m3fn's range
        q, scale = quantize_fp8(w, fmt, granularity, block_size=32)
        assert q.dtype == fmt.dtype
        back = dequantize_fp8(q, scale, torch.float32)
        finfo = torch.finfo(fmt.dtype)
        # Half an ulp: 2^-(mantissa+1) relative for normals, half the subnormal step absolute (scaled).
        rel = 2.0 ** -(fmt.mantissa_bits + 1)
        step = finfo.smallest_normal * 2.0 ** -fmt.mantissa_bits
        s = torch.ones(1, 1) if scale is None else scale.repeat_interleave(128 // scale.shape[1], dim=1)
        assert ((back - w).abs() <= rel * w.abs() + 0.5 * step * s + 1e-12).all()

    def test_scales_matter_for_small_rows(self):
        w = _wide_range()
        plain = dequantize_fp8(*quantize_fp8(w, E4, None), torch.float32)
        scaled = dequantize_fp8(*quantize_fp8(w, E4, ScaleGranularity.CHANNEL), torch.float32)
        small = slice(0, 8)  # rows of magnitude ~1e-4: below e4m3fn's subnormals without a scale
        assert (scaled[small] - w[small]).norm() < 0.1 * (plain[small] - w[small]).norm()

    def test_nf4_within_half_gap_of_its_levels(self):
        w = _wide_range(1)
        layer = nn.Linear(128, 64, bias=False)
        layer.weight.data.copy_(w)
        q = bnb_mod.bnb_factory(QuantConfig(QuantMode.NF4))(layer)
        back = q.dequantized(torch.float32)
        code = q.weight_code.sort().values
        half_gap = (code[1:] - code[:-1]).max() / 2
        absmax = q.weight_absmax.repeat_interleave(64).view_as(w)
        assert ((back - w).abs() <= half_gap * absmax * (1 + 1e-3) + 1e-7).all()

    def test_fp16_dequantization_keeps_small_scales(self):
        w = _wide_range()
        q, scale = quantize_fp8(w, E4, ScaleGranularity.CHANNEL)
        exact = dequantize_fp8(q, scale, torch.float32)
        small = slice(0, 8)  # rows ~1e-4: scales ~2e-7, a float16 subnormal
        half = dequantize_fp8(q, scale, torch.float16).float()
        torch.testing.assert_close(half[small], exact[small].half().float())

    def test_int8_forward_takes_activations_beyond_float16(self):
        torch.manual_seed(0)
        layer = nn.Linear(128, 64)
        x = torch.randn(3, 128)
        x[1] *= 1e6                       # 1e6 > float16's 65504: would be inf without the row scaling
        layer.weight.data[:8] *= 1e3      # and outputs beyond float16 too (the dequantization's own range)
        expected = layer(x)
        q = bnb_mod.bnb_factory(QuantConfig(QuantMode.INT8))(layer)
        out = q(x)
        assert torch.isfinite(out).all()
        for row in range(3):
            error = (out[row] - expected[row]).norm() / expected[row].norm()
            assert error < 0.02, (row, error)

    def test_int8_within_half_step(self):
        w = _wide_range(2)
        layer = nn.Linear(128, 64, bias=False)
        layer.weight.data.copy_(w)
        q = bnb_mod.bnb_factory(QuantConfig(QuantMode.INT8))(layer)
        back = q.weight.float() * q.weight_scale[:, None] / 127
        assert ((back - w).abs() <= 0.5 * w.abs().amax(1, keepdim=True) / 127 * 1.01 + 1e-6).all()


class TestModel:
    @pytest.mark.parametrize("config", list(MODEL_TOLERANCE), ids=lambda c: "-".join(
        v for v in c.to_metadata().values() if v))
    def test_within_stated_error(self, make_model, make_inputs, tiny_config, config):
        model = make_model()
        inputs = make_inputs(tiny_config)
        with torch.inference_mode():
            expected = model(**inputs)
            report = quantize_blocks(model, config)
            out = model(**inputs)
        error = ((out - expected).norm() / expected.norm()).item()
        assert report.replaced == 9 * tiny_config.depth and not report.kept
        assert 0 < error < MODEL_TOLERANCE[config], error

    def test_only_block_linears_are_swapped(self, make_model):
        model = make_model()
        before = copy.deepcopy(model)
        quantize_blocks(model, QuantConfig(QuantMode.FP8_SCALED, E4))
        for name, module in model.named_modules():
            in_block = name.startswith(("blocks.", "extra_blocks."))
            assert type(module) is not nn.Linear or not in_block, name
        outside = {k: v for k, v in before.state_dict().items() if not k.startswith("blocks.")}
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in outside.items())  # norms, embeddings, final

    def test_storage_shrinks(self, make_model):
        model = make_model(hidden_size=128, num_heads=4)
        full = tensor_bytes(model.blocks)
        sizes = {}
        for mode in (QuantMode.FP8, QuantMode.INT8, QuantMode.NF4):
            m = copy.deepcopy(model)
            quantize_blocks(m, QuantConfig(mode, E4))
            sizes[mode] = tensor_bytes(m.blocks) / full
        assert sizes[QuantMode.FP8] < 0.27 and sizes[QuantMode.INT8] < 0.28 and sizes[QuantMode.NF4] < 0.16

    def test_block_scales_need_divisible_width_else_kept(self, make_model, tiny_config):
        model = make_model()  # hidden 32, mlp 64: block 64 doesn't divide the 32-wide inputs
        report = quantize_blocks(model, QuantConfig(QuantMode.FP8_SCALED, E4, ScaleGranularity.BLOCK, 64))
        assert report.kept and all("divisible" in k for k in report.kept)
        assert report.replaced == tiny_config.depth  # only fc2 (64 inputs) in each block
        assert isinstance(model.blocks[0].ffn.fc2, FP8Linear)


class TestFormatRule:
    def test_cpu_uses_e4m3fn(self):
        assert fp8_format_for("cpu")[0] is E4

    @pytest.mark.parametrize("capability,expected", [((8, 6), E5), ((7, 5), E5), ((8, 9), E4), ((9, 0), E4)])
    def test_cuda_capability(self, monkeypatch, capability, expected):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        fmt, reason = fp8_format_for("cuda")
        assert fmt is expected and f"{capability[0]}.{capability[1]}" in reason


class TestCheckpoint:
    @pytest.mark.parametrize("config", [QuantConfig(QuantMode.FP8_SCALED, E4), QuantConfig(QuantMode.NF4)])
    def test_quantized_round_trip(self, make_model, make_inputs, tiny_config, tmp_path, config):
        save_model(tmp_path / "fp.safetensors", make_model())
        model, report = load_quantized(tmp_path / "fp.safetensors", config)
        save_quantized(tmp_path / "q.safetensors", model, config)
        assert stored_quantization(tmp_path / "q.safetensors") == config
        again, _ = load_quantized(tmp_path / "q.safetensors")
        inputs = make_inputs(tiny_config)
        with torch.inference_mode():
            assert torch.equal(model(**inputs), again(**inputs))
        assert os.path.getsize(tmp_path / "q.safetensors") < os.path.getsize(tmp_path / "fp.safetensors")

    def test_mismatched_settings_are_refused(self, make_model, tmp_path):
        model = make_model()
        config = QuantConfig(QuantMode.FP8, E4)
        quantize_blocks(model, config)
        save_quantized(tmp_path / "q.safetensors", model, config)
        with pytest.raises(CheckpointError, match="stored as"):
            load_quantized(tmp_path / "q.safetensors", QuantConfig(QuantMode.NF4))

    @pytest.mark.slow  # a subprocess
    def test_loading_quantized_never_holds_full_precision(self, tmp_path):
        """Peak RSS of loading a quantized file stays far below the model's float32 size."""
        script = textwrap.dedent(f"""
            import resource, torch
            from stiv_core.config import STIVConfig
            from stiv_core.model.transformer import STIVTransformer
            from stiv_core.memory.quant import QuantConfig, QuantMode, FP8Format, quantize_blocks
            from stiv_core.memory.quant_io import save_quantized, load_quantized
            cfg = STIVConfig(depth=3, hidden_size=768, num_heads=8, text_dim=64, pooled_text_dim=64)
            q = QuantConfig(QuantMode.FP8_SCALED, FP8Format.E4M3FN)
            m = STIVTransformer(cfg)
            full = sum(p.numel() * 4 for p in m.parameters())
            quantize_blocks(m, q); save_quantized(r"{tmp_path}/q.safetensors", m, q)
            del m
            import gc; gc.collect()
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            model, _ = load_quantized(r"{tmp_path}/q.safetensors")
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(full, max(0, peak - base))
        """)
        # ru_maxrss only grows: the quantized save runs first, so the load must not raise it by much.
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.returncode == 0, out.stderr
        full, grew = map(int, out.stdout.split()[-2:])
        assert grew < 0.5 * full


class TestBitsAndBytesMissing:
    def test_not_installed_is_a_clear_error(self, monkeypatch):
        real = bnb_mod.importlib.util.find_spec
        monkeypatch.setattr(bnb_mod.importlib.util, "find_spec",
                            lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
        bnb_mod._probe.cache_clear()
        try:
            assert "not installed" in bnb_mod.bnb_unusable("cpu")
            with pytest.raises(bnb_mod.BitsAndBytesUnavailable, match="fp8"):
                bnb_mod.require_bnb("cpu")
        finally:
            bnb_mod._probe.cache_clear()

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a device bitsandbytes cannot serve")
    def test_device_it_cannot_serve_says_why(self):
        reason = bnb_mod.bnb_unusable("cuda")
        assert reason is not None and "cuda" in reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCuda:
    @pytest.mark.parametrize("mode", [QuantMode.FP8_SCALED, QuantMode.INT8, QuantMode.NF4])
    def test_cpu_quantized_runs_on_cuda(self, make_model, make_inputs, tiny_config, mode):
        model = make_model()
        inputs = make_inputs(tiny_config)
        with torch.inference_mode():
            expected = model(**inputs)
        quantize_blocks(model, QuantConfig(mode, fp8_format_for("cuda")[0]))
        model = model.cuda().to(torch.bfloat16) if mode is QuantMode.NONE else model.cuda()
        with torch.inference_mode():
            out = model(**{k: v.cuda() for k, v in inputs.items()}).float().cpu()
        assert ((out - expected).norm() / expected.norm()).item() < 0.25
