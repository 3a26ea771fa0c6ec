"""LoRA as a module swap, attached from outside the model like the quantized Linears (no `if lora` in layers).

`attach_lora(model, "style", LoRAConfig(rank=8))` replaces each targeted Linear of the blocks (default: the
attention projections and the FFN of every block) by a `LoRALinear` that keeps the original module as
`base` (a plain or a quantized Linear, untouched) and adds named adapters, each `strength * alpha / rank *
B(A(dropout(x)))` with B zero-initialised, so a new adapter changes nothing. Several adapters stack, each
with its own strength; strength 0 gives exactly the base output. `merge_lora` folds an adapter into a
full-precision base weight (and `unmerge_lora` takes it out again); on a quantized base it stays applied
on the fly. Because the adapters live inside their block, block swap moves them with it.

File format (`save_lora` / `load_lora`): safetensors, keys in the diffusers / PEFT convention
`<module path>.lora_A.weight` `(rank, in)` and `<module path>.lora_B.weight` `(out, rank)`, module paths as
in the STIV model's state dict (e.g. `blocks.3.spatial_attn.qkv`); metadata `stiv_lora` (rank, alpha,
targets, format version) and `stiv_config` (the base model's config). A file for another model shape is
refused naming the first mismatching keys.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import (CheckpointError, check_safetensors, metadata_record, model_metadata, read_metadata,
                         recorded_config, save_state_dict)
from .config import STIVConfig
from .memory.quant import QuantizedLinear

LORA_KEY = "stiv_lora"
FORMAT_VERSION = 1
# Module paths inside a block (`blocks.N.` / `extra_blocks.N.` before them): attention and FFN Linears.
DEFAULT_TARGETS = ("*.spatial_attn.qkv", "*.spatial_attn.proj", "*.cross_attn.q", "*.cross_attn.kv",
                   "*.cross_attn.proj", "*.temporal_attn.qkv", "*.temporal_attn.proj", "*.ffn.fc1", "*.ffn.fc2")
MAX_SANE_STRENGTH = 4.0
SHAPE_FIELDS = ("depth", "hidden_size", "num_heads")   # what a LoRA file's base config must share with the model
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS   # fnmatch patterns on the blocks' module paths

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"lora rank must be an int >= 1, got {self.rank!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("lora targets: give at least one module pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAFactor(nn.Module):
    """One low-rank factor, `weight` `(out, in)`. Not an `nn.Linear` on purpose: the quantizers replace plain
    Linears, and a LoRA stays in full precision on a quantized base."""

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class LoRAAdapter(nn.Module):
    """One adapter on one Linear: `scale * B(A(dropout(x)))`, A Kaiming-uniform, B zero (no change at init)."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, *, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.lora_A = LoRAFactor(in_features, config.rank, device=device, dtype=dtype)
        self.lora_B = LoRAFactor(config.rank, out_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.config.scale

    def delta_weight(self) -> torch.Tensor:
        """`scale * B @ A` `(out, in)` in float32."""
        return self.config.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())


class LoRALinear(nn.Module):
    """`base(x) + sum_i strength_i * adapter_i(x)` over the adapters not merged into `base`. Adapters are
    found by their LoRA's name (`adapter(name)`); they are stored under a module-safe key of it."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.strengths: dict[str, float] = {}   # name -> strength, in the order the LoRAs were attached
        self.merged: dict[str, float] = {}      # name -> the strength it was merged with

    def adapter(self, name: str) -> LoRAAdapter:
        return self.adapters[adapter_key(name)]

    def add(self, name: str, adapter: LoRAAdapter, strength: float) -> None:
        key = adapter_key(name)
        if key in self.adapters:
            raise ValueError(f"the model already has a LoRA named {name!r} (or one whose name maps to the same "
                             f"key {key!r}); remove it first or pick another name")
        self.adapters[key] = adapter
        self.strengths[name] = float(strength)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, strength in self.strengths.items():
            if strength != 0 and name not in self.merged:
                y = y + (strength * self.adapter(name)(x)).to(y.dtype)
        return y


def adapter_key(name: str) -> str:
    """A LoRA name as a module key: module names cannot hold dots or shadow Module attributes ('train')."""
    if not name:
        raise ValueError("a LoRA needs a name")
    return "lora_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """The blocks' Linears (plain, quantized, or already LoRA-wrapped) whose module path matches a target."""
    found = {}
    for prefix, block in model.named_blocks():
        wrapped: list[str] = []   # inside a LoRALinear: its base and its adapters are not targets
        for name, module in block.named_modules():
            path = f"{prefix}.{name}"
            if any(path.startswith(w + ".") for w in wrapped):
                continue
            if isinstance(module, LoRALinear):
                wrapped.append(path)
            if isinstance(module, (nn.Linear, QuantizedLinear, LoRALinear)) \
                    and any(fnmatch.fnmatchcase(path, t) for t in targets):
                found[path] = module
    return found


def attach_lora(model: nn.Module, name: str, config: LoRAConfig = LoRAConfig(), *,
                strength: float = 1.0, trainable: bool = False) -> list[str]:
    """Add adapter `name` to every targeted Linear of `model` (wrapping it in a LoRALinear the first time);
    returns the module paths. Its weights require grad only when `trainable` (the base never changes);
    A is drawn from the global RNG. Raises naming the model's Linears when no target matches."""
    check_strength(strength)
    found = target_linears(model, config.targets)
    if not found:
        names = sorted(target_linears(model, ("*",)))
        raise ValueError(f"lora targets {list(config.targets)} match no Linear of the model's blocks; its Linears "
                         f"are e.g. {names[:6]}")
    for path, module in found.items():
        wrapped = module if isinstance(module, LoRALinear) else _swap(model, path, LoRALinear(module))
        device = next((t.device for t in _tensors(wrapped.base)), None)
        adapter = LoRAAdapter(wrapped.in_features, wrapped.out_features, config, device=device)
        wrapped.add(name, adapter.requires_grad_(trainable), strength)
    return sorted(found)


def lora_modules(model: nn.Module, name: Optional[str] = None) -> Iterator[tuple[str, LoRALinear]]:
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear) and (name is None or name in module.strengths):
            yield path, module


def set_strength(model: nn.Module, name: str, strength: float) -> None:
    check_strength(strength)
    for _, module in lora_modules(model, name):
        if name in module.merged:
            raise ValueError(f"LoRA {name!r} is merged; unmerge it before changing its strength")
        module.strengths[name] = float(strength)


def check_strength(strength: float) -> None:
    if not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
    if abs(strength) > MAX_SANE_STRENGTH:
        log.warning("LoRA strength %g is far outside the usual [-1, 1]; outputs may break down", strength)


def merge_lora(model: nn.Module, name: str) -> int:
    """Fold adapter `name` into the full-precision base weights (exact in float32 up to rounding); returns
    the count merged. A quantized base keeps the adapter applied on the fly (not merged)."""
    count = 0
    for _, module in lora_modules(model, name):
        if name not in module.merged and isinstance(module.base, nn.Linear):
            module.merged[name] = module.strengths[name]
            _fold(module, name, module.merged[name])
            count += 1
    return count


def unmerge_lora(model: nn.Module, name: str) -> int:
    """Take a merged adapter `name` out of the base weights again; returns the count unmerged."""
    count = 0
    for _, module in lora_modules(model, name):
        if name in module.merged:
            _fold(module, name, -module.merged.pop(name))
            count += 1
    return count


@torch.no_grad()
def _fold(module: LoRALinear, name: str, strength: float) -> None:
    """base.weight += strength * (the adapter's B @ A), computed in float32."""
    weight = module.base.weight
    delta = module.adapter(name).delta_weight().to(weight.device)
    weight.copy_((weight.float() + strength * delta).to(weight.dtype))


def save_lora(path: str | os.PathLike, model: nn.Module, name: str) -> None:
    """Adapter `name` of `model` alone, in the file format of this module's docstring."""
    state, config = {}, None
    for module_path, module in lora_modules(model, name):
        adapter = module.adapter(name)
        config = adapter.config
        state[f"{module_path}.lora_A.weight"] = adapter.lora_A.weight.detach().float().contiguous().cpu()
        state[f"{module_path}.lora_B.weight"] = adapter.lora_B.weight.detach().float().contiguous().cpu()
    if config is None:
        raise ValueError(f"the model has no LoRA named {name!r}")
    record = {**asdict(config), "targets": list(config.targets), "format_version": FORMAT_VERSION}
    save_state_dict(path, state, model_metadata(model.config, {LORA_KEY: json.dumps(record)}))


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]` (a command-line --lora) -> (path, strength); strength 1 when none is given."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            strength = float(tail)
        except ValueError:
            return text, 1.0   # a colon of the path itself (C:\\loras\\a.safetensors)
        check_strength(strength)
        return path, strength
    return text, 1.0


def read_lora_header(path: str | os.PathLike) -> tuple[LoRAConfig, Optional[STIVConfig]]:
    """From the header alone: the LoRA config and the base model's recorded config (CheckpointError if the
    file is not a STIV LoRA)."""
    path = check_safetensors(path)
    meta = read_metadata(path)
    if LORA_KEY not in meta:
        raise CheckpointError(f"{path.name} is not a STIV LoRA (no {LORA_KEY!r} in its metadata)")
    record = metadata_record(path, meta, LORA_KEY, dict)
    try:
        config = LoRAConfig(rank=int(record["rank"]), alpha=float(record["alpha"]),
                            dropout=float(record.get("dropout", 0.0)), targets=tuple(record["targets"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path.name}: unreadable {LORA_KEY!r} metadata ({err})") from err
    return config, recorded_config(path)


def check_lora_file(path: str | os.PathLike, config: STIVConfig) -> None:
    """From the header alone: `path` is a STIV LoRA made for a model of `config`'s width, depth and heads."""
    _, base = read_lora_header(path)
    wrong = [] if base is None else [f"{k} {getattr(base, k)} (the model has {getattr(config, k)})"
                                     for k in SHAPE_FIELDS if getattr(base, k) != getattr(config, k)]
    if wrong:
        raise CheckpointError(f"{Path(path).name} is a LoRA for another model: {', '.join(wrong)}")


def load_lora(path: str | os.PathLike, model: nn.Module, *, name: Optional[str] = None,
              strength: float = 1.0) -> str:
    """Attach the LoRA in `path` to `model` as `name` (default: the file's stem) with `strength`; a file for
    another model shape is refused naming the first mismatching keys. Returns the name."""
    config, base = read_lora_header(path)
    tensors = load_file(str(path))
    name = name or Path(path).stem
    modules = target_linears(model, ("*",))
    bad = []
    for key, tensor in sorted(tensors.items()):
        module_path, _, kind = key.rpartition(".lora_")
        module = modules.get(module_path)
        want = None if module is None else ((config.rank, module.in_features) if kind == "A.weight"
                                             else (module.out_features, config.rank))
        if want is None or kind not in ("A.weight", "B.weight") or tuple(tensor.shape) != want:
            bad.append(f"{key} {tuple(tensor.shape)}" + ("" if want is None else f" (the model needs {want})"))
    if bad:
        shape = {} if base is None else {k: getattr(base, k) for k in SHAPE_FIELDS}
        raise CheckpointError(f"{Path(path).name} is a LoRA for another model ({shape}): "
                              f"{len(bad)} key(s) do not fit, first {bad[:5]}")
    paths = sorted({k.rpartition(".lora_")[0] for k in tensors})
    attach_lora(model, name, LoRAConfig(config.rank, config.alpha, 0.0, tuple(paths)), strength=strength)
    with torch.no_grad():
        for module_path, module in lora_modules(model, name):
            adapter = module.adapter(name)
            adapter.lora_A.weight.copy_(tensors[f"{module_path}.lora_A.weight"])
            adapter.lora_B.weight.copy_(tensors[f"{module_path}.lora_B.weight"])
    return name


def _swap(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)
    return new


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
