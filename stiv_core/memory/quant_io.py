"""Quantized checkpoints: safetensors holding the quantized tensors and their scales.

The quantization settings sit in the file's metadata beside the model config (`stiv_quant`), so a
quantized file loads into modules of the right shapes built on the meta device, and every tensor
streams from the memory-mapped file straight to its device: RAM never holds a full-precision copy.
A full-precision file can also be loaded quantized: it is read one block at a time and each block
is quantized before the next is read, so the peak is the quantized model plus one block.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..checkpoint import CheckpointError, check_keys, check_safetensors, load_config, read_metadata, save_model
from ..model.attention import AttentionBackend
from ..model.transformer import STIVTransformer
from .quant import QuantConfig, QuantMode, QuantReport, quantize_blocks, quantize_module, quantized_buffer_names

QUANT_KEY = "stiv_quant"


def save_quantized(path: str | os.PathLike, model: STIVTransformer, config: QuantConfig) -> None:
    """Write a quantized model (after `quantize_blocks(model, config)`) with its settings."""
    if config.mode is QuantMode.NONE:
        raise ValueError("save_quantized needs a quantized model; use checkpoint.save_model for plain weights")
    save_model(path, model, metadata={QUANT_KEY: json.dumps(config.to_metadata(), sort_keys=True)})


def stored_quantization(path: str | os.PathLike) -> Optional[QuantConfig]:
    """The quantization a checkpoint is stored with, or None for a full-precision file."""
    meta = read_metadata(path)
    if QUANT_KEY not in meta:
        return None
    try:
        return QuantConfig.from_metadata(json.loads(meta[QUANT_KEY]))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{Path(path).name}: unreadable quantization metadata ({err})") from err


def load_quantized(path: str | os.PathLike, quant: Optional[QuantConfig] = None, *,
                   device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                   attention_backend: AttentionBackend = AttentionBackend.SDPA) -> tuple[STIVTransformer, QuantReport]:
    """A quantized model from `path`, in eval mode with gradients off.

    A quantized file loads as stored (`quant`, when given, must match it); a full-precision file is
    quantized with `quant` block by block. `dtype` applies to the high-precision tensors only.
    """
    config = load_config(path)
    stored = stored_quantization(path)
    if stored is not None and quant is not None and quant != stored:
        raise CheckpointError(f"{Path(path).name} is stored as {stored.to_metadata()}, not "
                              f"{quant.to_metadata()}: load it as stored (quant=None) or from full precision")
    if stored is None and quant is None:
        raise ValueError(f"{Path(path).name} is full precision: pass the QuantConfig to quantize it with")
    with torch.device("meta"):
        model = STIVTransformer(config, attention_backend=attention_backend)
    with safe_open(str(check_safetensors(path)), framework="pt", device="cpu") as f:
        if stored is not None:
            report = quantize_blocks(model, stored)
            _load_keys(model, f, list(f.keys()), device, dtype, Path(path).name)
        else:
            report = _quantize_while_loading(model, f, quant, device, dtype, Path(path).name)
    return model.eval().requires_grad_(False), report


def _load_keys(model: torch.nn.Module, f, keys: list[str], device, dtype, name: str) -> None:
    shapes = {key: tuple(f.get_slice(key).get_shape()) for key in keys}
    check_keys(model, shapes, name)
    keep = quantized_buffer_names(model)
    state = {}
    for key in keys:  # one tensor at a time from the memory map to its device
        tensor = f.get_tensor(key)
        state[key] = tensor.to(device=device, dtype=None if key in keep else dtype)
    model.load_state_dict(state, assign=True)


def _quantize_while_loading(model: STIVTransformer, f, quant: QuantConfig, device, dtype, name: str) -> QuantReport:
    keys = list(f.keys())
    check_keys(model, {key: tuple(f.get_slice(key).get_shape()) for key in keys}, name)
    report = QuantReport(quant)
    blocks = model.named_blocks()
    in_blocks = lambda key: any(key.startswith(f"{prefix}.") for prefix, _ in blocks)
    rest = {key: f.get_tensor(key).to(device=device, dtype=dtype) for key in keys if not in_blocks(key)}
    model.load_state_dict(rest, assign=True, strict=False)
    for prefix, block in blocks:
        state = {key[len(prefix) + 1:]: f.get_tensor(key).to(dtype=dtype) for key in keys
                 if key.startswith(f"{prefix}.")}
        block.load_state_dict(state, assign=True)  # full precision, on the CPU: one block only
        quantize_module(block, quant, report, prefix=prefix)
        block.to(device)
    return report
