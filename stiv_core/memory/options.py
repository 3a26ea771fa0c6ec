"""`apply_memory_options`: the one entry point the CLI, the Loader node and the trainer call; `plan_run`:
the one place a run is planned and judged (fits or not), used by it, the CLI's --plan-only, the plan
the js/ extension shows and the sampler nodes' check before a run.

Order matters and lives here only: resolve the device and the quantization (with logged fallbacks),
quantize the blocks (module swaps), plan, then attach block swap (hooks) and compile the blocks.
All of it happens at load time, before sampling; the returned handle undoes the hooks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..model.attention import AttentionBackend, available_backends
from .bnb import bnb_unusable
from ..config import STIVConfig
from .planner import Budget, MemoryPlan, RunShape, VAEProfile, plan_memory
from ..model.sizes import tensor_bytes
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
    block_swap: Optional[int] = 0          # a block count; None = "auto" (planned: needs a RunShape)
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
        object.__setattr__(self, "block_swap", parse_block_swap(self.block_swap))


def parse_block_swap(value: object) -> Optional[int]:
    """A block count (an int, or digits as a command line gives them) or "auto" / None -> `int | None`."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"block_swap must be a block count >= 0 or 'auto', got {value!r}")


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
    options: MemoryOptions = MemoryOptions()   # as applied: what a later plan of a run with it needs

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


def resolve_device(requested: str) -> tuple[torch.device, list[str]]:
    """The device to run on and the notes saying why it is not the one asked for (CUDA missing)."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):   # torch's message lists every backend it was built with
        raise ValueError(f"unknown device {requested!r}; available here: {', '.join(available_devices())}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {requested!r} is not supported; available here: {', '.join(available_devices())}")
    if device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {requested!r}: there are {torch.cuda.device_count()} CUDA device(s); available "
                         f"here: {', '.join(available_devices())}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu"), [_log(f"CUDA was asked for but is not available ({torch.__version__}, "
                                          f"no CUDA device); using the CPU")]
    return device, []


def available_devices() -> list[str]:
    """The device names that run here ('cuda' falls back to the CPU, logged, where there is no CUDA)."""
    names = ["cpu", "cuda"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_quant(options: MemoryOptions, device: torch.device) -> tuple[QuantConfig, list[str]]:
    """The QuantConfig to apply: the fp8 format from the device, int8/nf4 falling back to fp8-scaled; and
    the notes saying what was chosen and why."""
    mode, notes = options.quant, []
    if mode in (QuantMode.INT8, QuantMode.NF4):
        reason = bnb_unusable(device)
        if reason is not None:
            notes.append(_log(f"{mode.value} needs bitsandbytes: {reason}; falling back to fp8-scaled"))
            mode = QuantMode.FP8_SCALED
    fmt = None
    if mode in (QuantMode.FP8, QuantMode.FP8_SCALED):
        fmt, why = fp8_format_for(device)
        notes.append(_log(f"fp8 format {fmt.value}: {why}", level=logging.INFO))
    return QuantConfig(mode, fmt, options.fp8_scales), notes


@dataclass(frozen=True)
class RunPlan:
    """What `plan_run` decided: the budget it planned against, the plan, and the notes that arose (an
    unknown budget, a run forced although it will not fit)."""

    budget: Budget
    plan: MemoryPlan
    notes: tuple[str, ...]
    forced: bool = False

    def require_fit(self) -> None:
        """Raise WontFitError (its message the plan) unless the run fits or was forced."""
        if not self.plan.fits and not self.forced:
            raise WontFitError(self.plan.describe())


def plan_run(config: STIVConfig, shape: RunShape, options: MemoryOptions, *, device: torch.device,
             quant: QuantConfig, dtype: torch.dtype, budget: Optional[Budget] = None, held_bytes: int = 0,
             vae: VAEProfile = VAEProfile()) -> RunPlan:
    """Plan a run of `shape` with `options`' block swap (None: the fewest blocks that fit), prefetch and
    attention, for a model of `config` in `dtype` with `quant` (resolved) on `device` (resolved).

    `budget` None: what is free on the device now (`Budget.probe`). `held_bytes`: the model's tensors
    already in host RAM (loaded there), which the plan counts but the budget no longer has free
    (`Budget.plus_held`). An unknown budget is planned unchecked and noted; a run that will not fit is
    noted when `options.force` (`RunPlan.require_fit` raises otherwise).
    """
    budget = (budget if budget is not None else Budget.probe(device)).plus_held(held_bytes)
    plan = plan_memory(config, shape, budget, quant=quant, dtype=dtype, blocks_to_swap=options.block_swap,
                       prefetch=options.prefetch, backend=options.attention, vae=vae)
    notes = []
    if budget.device_free is None:
        notes.append(_log(f"memory not checked before the run: {budget.unknown}"))
    forced = not plan.fits and options.force
    if forced:
        notes.append(_log(f"running although the plan says it will not fit: {plan.reason}"))
    return RunPlan(budget, plan, tuple(notes), forced)


def apply_memory_options(model: nn.Module, options: MemoryOptions, *, shape: Optional[RunShape] = None,
                         budget: Optional[Budget] = None, vae: VAEProfile = VAEProfile(),
                         offloaded: bool = False) -> MemoryHandle:
    """Quantize, plan, swap and compile `model` (built on the CPU, eval mode) per `options`.

    With `offloaded`, the weights stay on the CPU (the handle's `load()` puts them on the device): a
    loader that must not take VRAM before the run that needs it.

    With `shape`, the run is planned (`plan_run`: `budget`, else what is free now), `block_swap=None`
    ("auto") takes the plan's count, and a run that will not fit raises WontFitError (or, with `force`,
    is noted as a warning and goes on).
    """
    device, notes = resolve_device(options.device)
    offloaded = offloaded and device.type != "cpu"   # on the CPU the weights already are where they run
    quant, quant_notes = resolve_quant(options, device)
    notes += quant_notes
    report = quantize_blocks(model, quant)
    dtype = model.patch_embed.weight.dtype
    if options.attention not in available_backends(device, dtype):
        notes.append(_log(f"attention {options.attention.value} cannot run on {device.type}/{dtype}; "
                          f"each call falls back to sdpa (logged by the attention registry)"))
    model.set_attention_backend(options.attention)
    plan, swap = None, options.block_swap
    if shape is not None:
        # the weights are already in the RAM the probe measures: the plan counts them once (a budget
        # given by the caller is taken as it is)
        held = tensor_bytes(model) if budget is None else 0
        run = plan_run(model.config, shape, options, device=device, quant=quant, dtype=dtype, budget=budget,
                       held_bytes=held, vae=vae)
        log.info("%s", run.plan.describe())
        run.require_fit()
        plan, swap = run.plan, run.plan.blocks_to_swap
        notes += run.notes
    elif swap is None:
        raise ValueError("block_swap='auto' needs the run's shape to plan with (pass shape=RunShape(...))")
    swapper = None
    if swap:
        if device.type == "cpu":
            notes.append(_log("block swap with device = CPU saves no memory (the blocks already live in RAM): "
                              "its hooks run, but the ring points at the CPU masters instead of copying them"))
        swapper = BlockSwapper(model, swap, device=device, prefetch=options.prefetch,
                               cpu_copies=False).attach(parked=offloaded)
    elif not offloaded:
        model.to(device)
    if options.compile:
        compile_blocks(model, backend=options.compile_backend)
    return MemoryHandle(model, device, quant, plan, swapper, report, notes, offloaded=offloaded, options=options)


def compile_blocks(model: nn.Module, *, backend: str = "inductor") -> None:
    """`torch.compile` each block's forward (not its `__call__`): the swap hooks stay outside the graph.

    Every block compiles to the same graph, so the cache is shared after the first.
    """
    for block in model.all_blocks():
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)


def _log(message: str, level: int = logging.WARNING) -> str:
    """Log a note and return it (the caller collects it into the notes it returns)."""
    log.log(level, "%s", message)
    return message


__all__ = ["MemoryHandle", "MemoryOptions", "RunPlan", "WontFitError", "apply_memory_options", "compile_blocks",
           "parse_block_swap", "plan_run", "resolve_device", "resolve_quant"]
