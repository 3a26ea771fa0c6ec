"""STIV Loader: a bundle (model + its text encoder and VAE), or a bare model that records the encoders it was
trained with (ComfyUI's CLIP and VAE are then connected), with the low-VRAM options -> STIV_MODEL."""
from __future__ import annotations

from pathlib import Path

import torch

from ..stiv_core.bundle import BUILTIN_MODELS, load_defaults, load_pipeline, read_trained_with, resolve_model_path
from ..stiv_core.checkpoint import CheckpointError, check_finite, is_stiv_checkpoint, load_model
from ..stiv_core.memory import MemoryOptions, QuantMode, WontFitError, apply_memory_options
from ..stiv_core.dtypes import WEIGHT_DTYPES
from ..stiv_core.model.attention import AttentionBackend
from ..stiv_core.pipeline import STIVPipeline
from . import _comfy
from .comfy_adapters import bare_pipeline
from .types import STIVInputError, STIVModel

BUILTIN_SUFFIX = " (built-in)"
DTYPES = {"auto": None, **WEIGHT_DTYPES}


# path -> ((mtime_ns, size), is STIV): the combo is listed every time the page asks for the node types
_listed: dict[str, tuple[tuple[int, int], bool]] = {}


def lists_as_stiv(path: Path) -> bool:
    """Whether `path`'s safetensors header records a STIV config (cached until the file changes)."""
    try:
        stat = path.stat()
    except OSError:
        return False
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _listed.get(str(path))
    if cached is None or cached[0] != key:
        cached = _listed[str(path)] = (key, is_stiv_checkpoint(path))
    return cached[1]


def model_choices() -> list[str]:
    """The built-in models this checkout has, then the files of the model folders that are STIV checkpoints (a user's other
    diffusion models in models/diffusion_models are left out)."""
    files = [n for n in _comfy.model_files() if (p := _comfy.model_path(n)) is not None and lists_as_stiv(p)]
    return [name + BUILTIN_SUFFIX for name, path in BUILTIN_MODELS.items() if path.is_file()] + files


def model_ref(choice: str) -> str:
    """A combo choice -> what `load_pipeline` takes: a built-in name or a full path."""
    if choice.endswith(BUILTIN_SUFFIX) and choice[: -len(BUILTIN_SUFFIX)] in BUILTIN_MODELS:
        return choice[: -len(BUILTIN_SUFFIX)]
    path = _comfy.model_path(choice)
    if path is None:
        raise STIVInputError(f"STIV Loader: no model file {choice!r} in models/stiv or models/diffusion_models; "
                             f"put a STIV .safetensors bundle there, or pick 'tiny{BUILTIN_SUFFIX}'")
    return str(path)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU, else what ComfyUI prefers for the device (bfloat16 where supported)."""
    dtype = DTYPES[choice]
    return _comfy.preferred_dtype(device) if dtype is None else dtype


def open_pipeline(path, dtype: torch.dtype) -> STIVPipeline:
    """A bundle's pipeline, or a bare model's with stand-ins for the encoders its metadata records; weights
    holding NaN or inf are refused here (CheckpointError), not sampled into a black video."""
    trained = read_trained_with(path)
    if trained is None:
        pipeline = load_pipeline(path, dtype=dtype)
    else:
        pipeline = bare_pipeline(load_model(path, dtype=dtype), trained)
    for part in (pipeline.model, pipeline.text_encoder):
        if isinstance(part, torch.nn.Module):   # a ComfyUI CLIP stand-in has no weights of its own here
            check_finite(part, path.name)
    return pipeline


class STIVLoader:
    CATEGORY = "STIV/loaders"
    RETURN_TYPES = ("STIV_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads a STIV bundle (transformer + its text encoder and VAE) with low-VRAM options, or a bare "
                   "model trained with a T5 / SDXL VAE: connect those from ComfyUI to Text Encode and Decode.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(), {"tooltip": "the STIV checkpoints in models/stiv or "
                                                         "models/diffusion_models, or the built-in"}),
            "weight_dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: float32 on CPU, else ComfyUI's "
                                                                          "choice (bfloat16 where supported)"}),
            "quantization": ([q.value for q in QuantMode], {"default": "none",
                                                            "tooltip": "weights of the blocks; int8/nf4 need "
                                                                       "bitsandbytes (else fp8-scaled, logged)"}),
            "attention": ([b.value for b in AttentionBackend], {"default": "sdpa"}),
            "block_swap": ("INT", {"default": 0, "min": 0, "max": 200,
                                   "tooltip": "blocks streamed from CPU RAM during each step (0 = all resident)"}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile each block"}),
        }}

    def load(self, model_name, weight_dtype, quantization, attention, block_swap, compile):
        ref = model_ref(model_name)
        device = _comfy.torch_device()
        try:
            path = resolve_model_path(ref)
            pipeline = open_pipeline(path, resolve_dtype(weight_dtype, device))
            blocks = len(pipeline.model.all_blocks())
            if block_swap > blocks:
                raise ValueError(f"block_swap {block_swap}: this model has {blocks} blocks (0..{blocks})")
            options = MemoryOptions(quant=quantization, attention=attention, block_swap=block_swap,
                                    compile=compile, device=str(device))
            # the weights stay on the CPU: on the device only while a sampler runs (nodes/run.py: on_device)
            handle = apply_memory_options(pipeline.model, options, offloaded=True)
            defaults = load_defaults(path)
        except (CheckpointError, FileNotFoundError, ValueError, WontFitError) as err:
            message = f"STIV Loader: cannot load {model_name!r}: {err}"
        else:
            return (STIVModel(pipeline, defaults, model_name, handle),)
        raise STIVInputError(message)

