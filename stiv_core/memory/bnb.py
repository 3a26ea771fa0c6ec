"""bitsandbytes int8 and nf4 Linear replacements, with every tensor a plain buffer.

bitsandbytes' own `Linear8bitLt` / `Linear4bit` keep their quantization state in Python attributes
(`Int8Params.SCB`, `Params4bit.quant_state`) that `.to()` moves but a block swapper or a safetensors
loader does not see. These modules store the same data as registered buffers and call bitsandbytes'
functional ops, so block swap, `state_dict` and quantized checkpoints work unchanged.

Importing this module registers the int8 / nf4 factories with `quant.py` (`memory/__init__.py` does);
bitsandbytes itself is imported only here and only when int8/nf4 is chosen; `bnb_unusable(device)` says
why it cannot serve a device (not installed, no backend for the device), for a clear message or a
logged fallback.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quant import LinearFactory, QuantConfig, QuantizedLinear, QuantMode, register_linear_factory


class BitsAndBytesUnavailable(RuntimeError):
    """int8 / nf4 was chosen but bitsandbytes cannot serve the device; the message says why."""


@functools.lru_cache(maxsize=None)
def _probe(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes.functional as bf

        w = torch.randn(16, 64, device=device_type)
        q, state = bf.quantize_4bit(w, quant_type="nf4", blocksize=64)
        bf.dequantize_4bit(q, state)
        bf.int8_linear_matmul(bf.int8_vectorwise_quant(w)[0], bf.int8_vectorwise_quant(w)[0])
    except Exception as err:  # any failure of the library on this device means "unusable here"
        return f"bitsandbytes {_version()} cannot run int8/nf4 on {device_type}: {type(err).__name__}: {err}"
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return "(unknown version)"


def bnb_unusable(device: torch.device | str) -> Optional[str]:
    """Why bitsandbytes int8/nf4 cannot run on `device`, or None when it can (probed once per type)."""
    return _probe(torch.device(device).type)


def require_bnb(device: torch.device | str) -> None:
    reason = bnb_unusable(device)
    if reason is not None:
        raise BitsAndBytesUnavailable(f"{reason}. Choose --quant fp8 or fp8-scaled instead, which need no "
                                      f"extra package.")


FP16_SAFE = 16384.0   # largest row absmax handed to bitsandbytes' float16 quantizer (float16 max is 65504)


class Int8Linear(QuantizedLinear):
    """LLM.int8-style Linear: int8 weight with one float32 absmax scale per output row.

    The activations are quantized row-wise on the fly and multiplied in int8 by bitsandbytes.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, bias_dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=bias, bias_dtype=bias_dtype, device=device)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))  # row absmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bf

        rows = x.reshape(-1, x.shape[-1]).float()
        # bitsandbytes quantizes float16 rows: a row beyond float16's range (bf16 / float32 activations) is
        # divided down first and its output multiplied back (row-wise quantization is scale-invariant)
        down = (rows.abs().amax(dim=1, keepdim=True) / FP16_SAFE).clamp_min(1.0)
        qx, x_scale, _ = bf.int8_vectorwise_quant((rows / down).to(torch.float16))
        acc = bf.int8_linear_matmul(qx, self.weight)   # int32: sum of int8 products
        # dequantized in float32 (bitsandbytes' int8_mm_dequant returns float16, which overflows at 65504)
        y = acc.float() * (x_scale.float()[:, None] * down / 127) * (self.weight_scale.float()[None, :] / 127)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int8 row-wise"


class NF4Linear(QuantizedLinear):
    """4-bit NormalFloat Linear: two weights per byte, one float32 absmax per `block_size` weights."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, bias_dtype: torch.dtype,
                 block_size: int = 64, device: torch.device | str | None = None):
        numel = in_features * out_features
        if numel % block_size or numel % 2:
            raise ValueError(f"nf4 needs in*out divisible by block_size {block_size}, got {numel}")
        super().__init__(in_features, out_features, bias=bias, bias_dtype=bias_dtype, device=device)
        self.block_size = block_size
        self.register_buffer("weight", torch.empty(numel // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.empty(numel // block_size, device=device))
        self.register_buffer("weight_code", torch.empty(16, device=device))  # the 16 nf4 levels

    def quant_state(self, dtype: torch.dtype):
        from bitsandbytes.functional import QuantState

        return QuantState(absmax=self.weight_absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=self.weight_code, blocksize=self.block_size, quant_type="nf4", dtype=dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(self.weight, self.quant_state(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.dtype == torch.float32 and x.device.type == "cuda":
            # bitsandbytes' fused 4-bit kernels take half types only; float32 goes the plain way.
            return F.linear(x, self.dequantized(x.dtype), bias)
        return bnb.matmul_4bit(x, self.weight.t(), quant_state=self.quant_state(x.dtype), bias=bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, nf4 blocks of {self.block_size}"


@register_linear_factory(QuantMode.INT8, QuantMode.NF4)
def bnb_factory(config: QuantConfig) -> LinearFactory:
    """Builds Int8Linear / NF4Linear from an `nn.Linear` (quantized on the Linear's device).

    On the meta device (planning, loading a quantized file) bitsandbytes is not needed.
    """

    def build(linear: nn.Linear) -> QuantizedLinear:
        out_f, in_f = linear.weight.shape
        kw = dict(bias=linear.bias is not None, bias_dtype=linear.weight.dtype, device=linear.weight.device)
        if config.mode is QuantMode.INT8:
            module: QuantizedLinear = Int8Linear(in_f, out_f, **kw)
        else:
            module = NF4Linear(in_f, out_f, block_size=config.block_size, **kw)
        if linear.weight.is_meta:
            return module
        import bitsandbytes.functional as bf

        w = linear.weight.detach().float()
        if config.mode is QuantMode.INT8:
            # bitsandbytes' row-wise absmax format (CB, SCB), computed in float32: its own
            # int8_vectorwise_quant takes float16, whose subnormals would wreck tiny rows.
            scale = w.abs().amax(dim=1)
            module.weight.copy_((w * (127 / scale.clamp_min(1e-30))[:, None]).round().clamp(-127, 127))
            module.weight_scale.copy_(scale)
        else:
            q, state = bf.quantize_4bit(w, quant_type="nf4", blocksize=config.block_size)
            module.weight.copy_(q.view(-1, 1))
            module.weight_absmax.copy_(state.absmax)
            module.weight_code.copy_(state.code)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    return build
