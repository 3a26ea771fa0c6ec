"""Quantized weights by module swap: every `nn.Linear` inside the transformer blocks is replaced, after
construction, by a module that stores its weight in a low-precision format and dequantizes it to the
activation dtype inside `forward`.

Only the blocks are quantized: norms, embeddings (patch, timestep, micro-conditions, caption, pooled
text, adaLN-single) and the final layer stay in high precision, because they are a few percent of
the weights and the model is far more sensitive to them. The quantized modules keep every tensor as
a registered buffer or parameter, so block swap, `state_dict` and safetensors see plain tensors.

Formats (`QuantMode`): `fp8` plain fp8 storage (ComfyUI's "fp8_e4m3fn weight dtype"), `fp8-scaled`
fp8 with per-channel or per-block float32 scales, `int8` and `nf4` through bitsandbytes
(see `bnb.py`). fp8 is e4m3fn, or e5m2 on CUDA GPUs below compute capability 8.9 (see `fp8_format_for`).
Every replacement is a `QuantizedLinear`; each format registers its factory in `LINEAR_FACTORIES`.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class QuantMode(str, enum.Enum):
    NONE = "none"
    FP8 = "fp8"                 # plain cast to fp8, no scale
    FP8_SCALED = "fp8-scaled"   # fp8 with float32 scales (per output channel or per block)
    INT8 = "int8"               # bitsandbytes LLM.int8 row-wise absmax (no outlier split)
    NF4 = "nf4"                 # bitsandbytes 4-bit NormalFloat, blocks of 64


class FP8Format(str, enum.Enum):
    E4M3FN = "e4m3fn"   # 3 mantissa bits, max 448: more precision
    E5M2 = "e5m2"       # 2 mantissa bits, max 57344: the top byte of a float16, cheap to upcast

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is FP8Format.E4M3FN else torch.float8_e5m2

    @property
    def mantissa_bits(self) -> int:
        return 3 if self is FP8Format.E4M3FN else 2


class ScaleGranularity(str, enum.Enum):
    CHANNEL = "channel"   # one scale per output row
    BLOCK = "block"       # one scale per `block_size` consecutive inputs of each row


@dataclass(frozen=True)
class QuantConfig:
    mode: QuantMode = QuantMode.NONE
    fp8_format: Optional[FP8Format] = None   # None = chosen from the device (fp8_format_for)
    granularity: ScaleGranularity = ScaleGranularity.CHANNEL
    block_size: int = 64                     # fp8-scaled BLOCK scales and nf4 blocks

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", QuantMode(self.mode))
        object.__setattr__(self, "granularity", ScaleGranularity(self.granularity))
        if self.fp8_format is not None:
            object.__setattr__(self, "fp8_format", FP8Format(self.fp8_format))
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")

    def to_metadata(self) -> dict[str, str]:
        fmt = self.fp8_format.value if self.fp8_format else ""
        return {"mode": self.mode.value, "fp8_format": fmt, "granularity": self.granularity.value,
                "block_size": str(self.block_size)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> QuantConfig:
        return cls(QuantMode(meta["mode"]), FP8Format(meta["fp8_format"]) if meta.get("fp8_format") else None,
                   ScaleGranularity(meta["granularity"]), int(meta["block_size"]))


def fp8_format_for(device: torch.device | str) -> tuple[FP8Format, str]:
    """The fp8 format for weights used on `device`, and why.

    Below compute capability 8.9 (pre-Ada) there are no fp8 tensor cores, so weights are upcast for
    every matmul; e5m2 is the top byte of a float16 and upcasts with a shift, so it is preferred there.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return FP8Format.E5M2, (f"compute capability {major}.{minor} < 8.9 has no fp8 tensor cores; "
                                    f"e5m2 upcasts to float16 cheaply")
        return FP8Format.E4M3FN, f"compute capability {major}.{minor} >= 8.9: e4m3fn (more precision)"
    return FP8Format.E4M3FN, f"{device.type} device: e4m3fn (more precision; upcast in software)"


def _to_fp8(x: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    # Casting past the format's max gives NaN in e4m3fn (it has no inf): saturate first.
    limit = torch.finfo(fmt.dtype).max
    return x.clamp(-limit, limit).to(fmt.dtype)


def quantize_fp8(weight: torch.Tensor, fmt: FP8Format, granularity: Optional[ScaleGranularity],
                 block_size: int = 64) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`(out, in)` weight -> fp8 weight and float32 scale (None for plain fp8).

    Scales: `(out, 1)` per channel, `(out, in / block_size)` per block; weight ~= fp8 * scale.
    """
    if granularity is None:
        return _to_fp8(weight, fmt), None
    w = weight.float()
    out_f, in_f = w.shape
    if granularity is ScaleGranularity.BLOCK:
        _check_block(in_f, block_size)
        w = w.view(out_f, in_f // block_size, block_size)
    else:
        w = w.view(out_f, 1, in_f)
    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / torch.finfo(fmt.dtype).max, torch.ones_like(amax))
    q = _to_fp8(w / scale, fmt).view(out_f, in_f)
    return q, scale.squeeze(-1)


def dequantize_fp8(q: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return q.to(dtype)
    out_f, in_f = q.shape
    groups = scale.shape[1]
    # float16 would flush small scales (amax / 448 below 6e-5) to subnormals: multiply in float32 there
    compute = torch.float32 if dtype == torch.float16 else dtype
    w = q.to(compute).view(out_f, groups, in_f // groups) * scale.to(compute)[..., None]
    return w.view(out_f, in_f).to(dtype)


def _check_block(in_features: int, block_size: int) -> None:
    if in_features % block_size:
        raise ValueError(f"per-block fp8 scales need in_features divisible by block_size; "
                         f"{in_features} % {block_size} != 0 (use per-channel scales or another block size)")


class QuantizedLinear(nn.Module):
    """The base of every quantized Linear: `in_features`, `out_features`, an optional frozen bias in the
    replaced Linear's dtype, and the weight in registered buffers that are all quantized storage
    (`quantized_buffer_names`: never cast on load). Subclasses register their buffers and `forward`."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, bias_dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None


LinearFactory = Callable[[nn.Linear], QuantizedLinear]
# QuantMode -> (QuantConfig -> the function turning one nn.Linear into its replacement). fp8 registers
# below; int8 / nf4 register when `bnb.py` is imported, which `memory/__init__.py` does (without
# importing bitsandbytes itself), so every import of stiv_core.memory sees every format.
LINEAR_FACTORIES: dict[QuantMode, Callable[[QuantConfig], LinearFactory]] = {}


def register_linear_factory(*modes: QuantMode):
    """Decorator: `factory(config)` builds the quantized Linears of `modes`."""
    def register(factory: Callable[[QuantConfig], LinearFactory]) -> Callable[[QuantConfig], LinearFactory]:
        for mode in modes:
            LINEAR_FACTORIES[QuantMode(mode)] = factory
        return factory

    return register


class FP8Linear(QuantizedLinear):
    """Linear with an fp8 weight buffer (and optional float32 scales), dequantized in `forward`."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, fmt: FP8Format,
                 scale_groups: Optional[int], bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=bias, bias_dtype=bias_dtype, device=device)
        self.fmt = fmt
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=fmt.dtype, device=device))
        scale = None if scale_groups is None else torch.empty(out_features, scale_groups, device=device)
        self.register_buffer("weight_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_fp8(self.weight, self.weight_scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        scales = "none" if self.weight_scale is None else tuple(self.weight_scale.shape)
        return f"{self.in_features}, {self.out_features}, fp8={self.fmt.value}, scales={scales}"


@dataclass
class QuantReport:
    """What `quantize_blocks` did: how many Linear layers were swapped and what was kept, and why."""

    config: QuantConfig
    replaced: int = 0
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@register_linear_factory(QuantMode.FP8, QuantMode.FP8_SCALED)
def fp8_factory(config: QuantConfig) -> LinearFactory:
    if config.fp8_format is None:
        raise ValueError("resolve the fp8 format first (QuantConfig.fp8_format, see fp8_format_for)")
    granularity = None if config.mode is QuantMode.FP8 else config.granularity

    def build(linear: nn.Linear) -> QuantizedLinear:
        out_f, in_f = linear.weight.shape
        groups = None if granularity is None else (
            in_f // config.block_size if granularity is ScaleGranularity.BLOCK else 1)
        if granularity is ScaleGranularity.BLOCK:
            _check_block(in_f, config.block_size)
        module = FP8Linear(in_f, out_f, bias=linear.bias is not None, fmt=config.fp8_format,
                           scale_groups=groups, bias_dtype=linear.weight.dtype, device=linear.weight.device)
        if linear.weight.is_meta:  # shapes only: a quantized checkpoint fills the buffers
            return module
        q, scale = quantize_fp8(linear.weight.detach(), config.fp8_format, granularity, config.block_size)
        module.weight.copy_(q)
        if scale is not None:
            module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    return build


def linear_factory(config: QuantConfig) -> LinearFactory:
    """The function that turns one `nn.Linear` into its quantized replacement for `config`."""
    factory = LINEAR_FACTORIES.get(config.mode)
    if factory is None:
        raise ValueError(f"no quantized Linear for mode {config.mode.value!r}")
    return factory(config)


@torch.no_grad()
def quantize_blocks(model: nn.Module, config: QuantConfig) -> QuantReport:
    """Replace every Linear inside the model's blocks (`named_blocks()`) in place, before sampling.

    Works on the meta device too (modules of the right shapes, for loading a quantized checkpoint).
    Layers whose shape the format cannot take are kept in high precision and listed in the report.
    """
    report = QuantReport(config)
    for prefix, block in model.named_blocks():
        quantize_module(block, config, report, prefix=prefix)
    if report.kept:
        log.warning("%d Linear layers kept in high precision: %s", len(report.kept), report.kept[:3])
    return report


@torch.no_grad()
def quantize_module(module: nn.Module, config: QuantConfig, report: QuantReport, *, prefix: str = "") -> None:
    """Replace every plain `nn.Linear` inside `module` (one block) by its quantized form, in place."""
    if config.mode is QuantMode.NONE:
        return
    build = linear_factory(config)
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            try:
                setattr(parent, child_name, build(child))
                report.replaced += 1
            except ValueError as err:  # a shape the format can't take: keep it precise
                report.kept.append(f"{'.'.join(p for p in (prefix, name, child_name) if p)}: {err}")


def quantized_buffer_names(model: nn.Module) -> set[str]:
    """State-dict keys of quantized storage (fp8/int8/nf4 weights, scales): never cast on load."""
    return {f"{name}.{buf}" for name, mod in model.named_modules() if isinstance(mod, QuantizedLinear)
            for buf, _ in mod.named_buffers(recurse=False)}

