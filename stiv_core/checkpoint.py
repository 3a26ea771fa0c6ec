"""Checkpoints: safetensors only, with the model config stored in the file's metadata.

Loading builds the model on the meta device and streams tensors one at a time from the memory-mapped
file to their device (never a second full copy in RAM). Pickle files are refused: they can run code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable, Mapping, Optional, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import STIVConfig
from .model.attention import AttentionBackend
from .model.transformer import STIVTransformer

FORMAT = "stiv"
CONFIG_KEY = "stiv_config"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Keys of other components a file may carry beside the model (see bundle.py); load_model skips them.
TEXT_ENCODER_PREFIX = "text_encoder."
T = TypeVar("T")
COMPONENT_PREFIXES = (TEXT_ENCODER_PREFIX,)


class CheckpointError(ValueError):
    """A file that is not a loadable STIV checkpoint; the message says why."""


def save_model(path: str | os.PathLike, model: STIVTransformer, *, dtype: Optional[torch.dtype] = None,
               metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `model`'s weights (optionally cast to `dtype`) and config atomically to `path`."""
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    save_state_dict(path, state, model_metadata(model.config, metadata))


def model_metadata(config, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The metadata that makes a file load with `load_model`: the format tag and the config. The
    config wins over `extra` (e.g. copied metadata): it is what the weights fit."""
    return {**dict(extra or {}), "format": FORMAT, CONFIG_KEY: config.to_json()}


def save_state_dict(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str]) -> None:
    """safetensors write through a temporary file and a rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(dict(state), str(tmp), metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_safetensors(path: str | os.PathLike) -> Path:
    """The path, if it names a readable safetensors file; a clear CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    # The layout first: a safetensors header length (little-endian u64) can itself begin with 0x80 or "PK"
    size = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if len(head) >= 9 and head[8:9] == b"{" and 8 + size <= path.stat().st_size:
        return path
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(f"{path.name} is a pickle (torch.save) file; only .safetensors checkpoints "
                              f"are loaded, since pickle can run code. Convert it with safetensors first.")
    raise CheckpointError(f"{path.name} is not a safetensors file (corrupt or another format); "
                          f"expected one of {SAFETENSORS_SUFFIXES}")


def safetensors_problem(path: str | os.PathLike) -> Optional[str]:
    """Why `path` is not a complete safetensors file (None when it is): missing, truncated, an unreadable
    header, or a size that differs from the one its header's tensor offsets give. Reads only the header."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"truncated ({size} bytes, shorter than its header)"
        try:
            header = json.loads(f.read(length))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            return f"unreadable header ({type(err).__name__}: {err})"
    if 8 + length + end != size:
        return f"{'truncated' if size < 8 + length + end else 'too long'}: {size} bytes, its header describes " \
               f"{8 + length + end}"
    return None


def metadata_record(path: str | os.PathLike, meta: Mapping[str, str], key: str, build: Callable[[dict], T]) -> T:
    """The metadata entry `key` (a JSON object) as `build(**fields)` for a dataclass, else `build(object)`;
    a file written by a newer version may carry fields this one does not know (dropped), and a malformed
    entry is a CheckpointError."""
    try:
        record = json.loads(meta[key])
        if not isinstance(record, dict):
            raise TypeError(f"expected a JSON object, got {type(record).__name__}")
        if dataclasses.is_dataclass(build):
            names = {f.name for f in dataclasses.fields(build)}
            return build(**{k: v for k, v in record.items() if k in names})
        return build(record)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(path).name}: unreadable {key!r} metadata ({type(err).__name__}: {err})") from err


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path.name}: unreadable safetensors header ({err})") from err


def load_config(path: str | os.PathLike) -> STIVConfig:
    meta = read_metadata(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{Path(path).name} has no STIV config in its metadata: it is not a STIV "
                              f"checkpoint (convert it, or pass the config explicitly)")
    try:
        return STIVConfig.from_json(meta[CONFIG_KEY])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{Path(path).name}: its stored STIV config is invalid: {err}") from err


def is_stiv_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the file is a safetensors file whose metadata records a STIV config; reads the header only
    (a few KB, however large the file), so listing a folder of other models stays cheap."""
    try:
        return CONFIG_KEY in read_metadata(path)
    except CheckpointError:
        return False


def recorded_config(path: str | os.PathLike) -> Optional[STIVConfig]:
    """The STIV config stored in the file's metadata; None when it records none (a plain state dict)."""
    return load_config(path) if CONFIG_KEY in read_metadata(path) else None


def load_model(path: str | os.PathLike, *, config: Optional[STIVConfig] = None, device: str | torch.device = "cpu",
               dtype: Optional[torch.dtype] = None,
               attention_backend: AttentionBackend = AttentionBackend.SDPA) -> STIVTransformer:
    """The model stored at `path` on `device` (in the stored dtype unless `dtype` is given), in eval mode."""
    read_metadata(path)  # a CheckpointError for a pickle, corrupt or truncated file, config given or not
    config = config or load_config(path)
    with torch.device("meta"):
        model = STIVTransformer(config, attention_backend=attention_backend)
    with safe_open(str(check_safetensors(path)), framework="pt", device="cpu") as f:
        keys = [key for key in f.keys() if not key.startswith(COMPONENT_PREFIXES)]
        check_keys(model, {key: tuple(f.get_slice(key).get_shape()) for key in keys}, Path(path).name)
        state = {key: f.get_tensor(key).to(device=device, dtype=dtype) for key in keys}
        model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def check_keys(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], name: str, limit: int = 5) -> None:
    """Raise a CheckpointError naming the first missing, unexpected and wrong-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k}: file {shapes[k]} vs model {expected[k]}" for k in expected
             if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {items[:limit]}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise CheckpointError(f"{name} does not match the model config: " + "; ".join(parts))



def check_finite(module: torch.nn.Module, name: str, limit: int = 3) -> None:
    """Raise CheckpointError naming the (first `limit`) floating-point tensors of `module` that hold NaN or
    inf. A model with them samples NaN, which a clamp to [-1, 1] then shows as a black video: the error
    belongs at load, where the file can be named. Integer storage (quantized weights) is skipped."""
    bad = [key for key, tensor in module.state_dict().items()
           if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
           and not bool(torch.isfinite(tensor).all())]
    if bad:
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        raise CheckpointError(f"{name} holds NaN or infinite weights in {', '.join(bad[:limit])}{more}: the file is "
                              f"corrupt or was saved from a diverged training run; use an earlier checkpoint")
