"""Low-VRAM machinery attached from outside the model: quantized weights (module swaps), block swap
with prefetch (hooks), the memory planner, `apply_memory_options`, the one entry point used by the
CLI, the Loader node and the trainer, and `plan_run`, the one place a run is judged to fit or not.
"""
from . import bnb  # noqa: F401  (registers the int8 / nf4 Linears with quant.py; bitsandbytes loads only when used)
from .options import (MemoryHandle, MemoryOptions, RunPlan, WontFitError, apply_memory_options, compile_blocks,
                      plan_run)
from .planner import PIXEL_VAE, Budget, MemoryPlan, RunShape, VAEProfile, plan_memory
from .quant import FP8Format, QuantConfig, QuantMode, ScaleGranularity, quantize_blocks
from .swap import BlockSwapper

__all__ = ["PIXEL_VAE", "BlockSwapper", "Budget", "FP8Format", "MemoryHandle", "MemoryOptions", "MemoryPlan", "QuantConfig",
           "QuantMode", "RunPlan", "RunShape", "ScaleGranularity", "VAEProfile", "WontFitError", "apply_memory_options",
           "compile_blocks", "plan_memory", "plan_run", "quantize_blocks"]
