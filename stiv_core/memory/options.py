"""`apply_memory_options`: the one entry point the CLI, the Loader node and the trainer call.

Order matters and lives here only: resolve the device and the quantization (with logged fallbacks),
quantize the blocks (module swaps), plan, then attach block swap (hooks) and compile the blocks.
All of it happens at load time, before sampling; the returned handle undoes the hooks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..model.attention import AttentionBackend, available_backends
from .bnb import bnb_unusable
from .planner import Budget, MemoryPlan, RunShape, VAEProfile, plan_memory
from .quant import QuantConfig, QuantMode, QuantReport, ScaleGranularity, fp8_format_for, quantize_blocks
from .swap import BlockSwapper

log = logging.getLogger(__name__)


class WontFitError(RuntimeError):
    """The plan says the run does not fit; the message is the plan."""


@dataclass(frozen=True)
class MemoryOptions:
    """What `--quant`, `--block-swap`, `--attention`, `--compile` and `--device` choose."""

    quant: QuantMode = QuantMode.NONE
    fp8_scales: ScaleGranularity = ScaleGranularity.CHANNEL
    block_swap: Union[int, str] = 0        # a block count, or "auto" (needs a RunShape to plan with)
    prefetch: int = 1
    attention: AttentionBackend = AttentionBackend.SDPA
    compile: bool = False
    compile_backend: str = "inductor"
    device: str = "cuda"
    force: bool = False                    # run even when the plan says it will not fit (warned)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quant", QuantMode(self.quant))
        object.__setattr__(self, "fp8_scales", ScaleGranularity(self.fp8_scales))
        object.__setattr__(self, "attention", AttentionBackend(self.attention))
        swap = self.block_swap
        if isinstance(swap, str) and swap.isdigit():
            object.__setattr__(self, "block_swap", int(swap))
        elif not (swap == "auto" or (isinstance(swap, int) and swap >= 0)):
            raise ValueError(f"block_swap must be a block count >= 0 or 'auto', got {swap!r}")


@dataclass
class MemoryHandle:
    """The model with its memory options applied, what was decided and why, and `remove()`."""

    model: nn.Module
    device: torch.device
    quant: QuantConfig
    plan: Optional[MemoryPlan]
    swapper: Optional[BlockSwapper]
    report: QuantReport
    notes: list[str] = field(default_factory=list)

    offloaded: bool = False

    def offload(self) -> None:
        """Between runs: free the device. Resident weights (and a swap ring) go to the CPU; no-op on the CPU."""
        if self.offloaded or self.device.type == "cpu":
            return
        if self.swapper is not None:
            self.swapper.park()
        else:
            self.model.to("cpu")
        self.offloaded = True

    def load(self) -> None:
        """Before a run: undo `offload` (weights back on the device). Marked loaded first: if a move
        fails half way (out of memory), `offload()` still moves everything back."""
        if not self.offloaded:
            return
        self.offloaded = False
        if self.swapper is not None:
            self.swapper.unpark()
        else:
            self.model.to(self.device)

    def remove(self) -> None:
        """Take the block-swap hooks off (quantization and compilation stay: they were load-time)."""
        if self.swapper is not None:
            self.swapper.remove()
            self.swapper = None


def resolve_device(requested: str, notes: list[str]) -> torch.device:
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        _note(notes, f"CUDA was asked for but is not available ({torch.__version__}, no CUDA device); using the CPU")
        return torch.device("cpu")
    return device


def resolve_quant(options: MemoryOptions, device: torch.device, notes: list[str]) -> QuantConfig:
    """The QuantConfig to apply: the fp8 format from the device, int8/nf4 falling back to fp8-scaled."""
    mode = options.quant
    if mode in (QuantMode.INT8, QuantMode.NF4):
        reason = bnb_unusable(device)
        if reason is not None:
            _note(notes, f"{mode.value} needs bitsandbytes: {reason}; falling back to fp8-scaled")
            mode = QuantMode.FP8_SCALED
    fmt = None
    if mode in (QuantMode.FP8, QuantMode.FP8_SCALED):
        fmt, why = fp8_format_for(device)
        _note(notes, f"fp8 format {fmt.value}: {why}", level=logging.INFO)
    return QuantConfig(mode, fmt, options.fp8_scales)


def apply_memory_options(model: nn.Module, options: MemoryOptions, *, shape: Optional[RunShape] = None,
                         budget: Optional[Budget] = None, vae: VAEProfile = VAEProfile(),
                         offloaded: bool = False) -> MemoryHandle:
    """Quantize, plan, swap and compile `model` (built on the CPU, eval mode) per `options`.

    With `offloaded`, the weights stay on the CPU (the handle's `load()` puts them on the device): a
    loader that must not take VRAM before the run that needs it.

    With `shape`, the plan is logged, chooses `block_swap="auto"`, and a run that will not fit raises
    WontFitError (or, with `force`, is logged as a warning and goes on).
    """
    notes: list[str] = []
    device = resolve_device(options.device, notes)
    offloaded = offloaded and device.type != "cpu"   # on the CPU the weights already are where they run
    quant = resolve_quant(options, device, notes)
    report = quantize_blocks(model, quant)
    dtype = model.patch_embed.weight.dtype
    if options.attention not in available_backends(device, dtype):
        _note(notes, f"attention {options.attention.value} cannot run on {device.type}/{dtype}; "
                     f"each call falls back to sdpa (logged by the attention registry)")
    model.set_attention_backend(options.attention)
    plan = None
    swap = options.block_swap
    if shape is not None:
        plan = plan_memory(model.config, shape, budget or Budget.probe(device), quant=quant, dtype=dtype,
                           blocks_to_swap=None if swap == "auto" else swap, prefetch=options.prefetch,
                           backend=options.attention, vae=vae)
        log.info("%s", plan.describe())
        if not plan.fits:
            if not options.force:
                raise WontFitError(plan.describe())
            _note(notes, f"running although the plan says it will not fit: {plan.reason}")
        swap = plan.blocks_to_swap
    elif swap == "auto":
        raise ValueError("block_swap='auto' needs the run's shape to plan with (pass shape=RunShape(...))")
    swapper = None
    if swap:
        if device.type == "cpu":
            _note(notes, "block swap with device = CPU saves no memory (the blocks already live in RAM): "
                         "its hooks run, but the ring points at the CPU masters instead of copying them")
        swapper = BlockSwapper(model, swap, device=device, prefetch=options.prefetch,
                               cpu_copies=False).attach(parked=offloaded)
    elif not offloaded:
        model.to(device)
    if options.compile:
        compile_blocks(model, backend=options.compile_backend)
    return MemoryHandle(model, device, quant, plan, swapper, report, notes, offloaded=offloaded)


def compile_blocks(model: nn.Module, *, backend: str = "inductor") -> None:
    """`torch.compile` each block's forward (not its `__call__`): the swap hooks stay outside the graph.

    Every block compiles to the same graph, so the cache is shared after the first.
    """
    for block in model.all_blocks():
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)


def _note(notes: list[str], message: str, level: int = logging.WARNING) -> None:
    notes.append(message)
    log.log(level, "%s", message)


__all__ = ["MemoryHandle", "MemoryOptions", "WontFitError", "apply_memory_options", "compile_blocks"]
