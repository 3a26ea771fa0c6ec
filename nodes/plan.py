"""The plan the js/ extension shows on the sampler: tokens, passes per step, the memory planner's verdict.

Served at GET /stiv/plan inside ComfyUI; computed from the checkpoint's metadata alone (no weights load).
The budget is the whole device: the sampler has ComfyUI free its models (and the Loader's weights are
offloaded) before sampling, so what is loaded while the plan is asked for is not counted against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..stiv_core.bundle import TrainedWith, read_trained_with, resolve_model_path
from ..stiv_core.encoders import VAEKind
from ..stiv_core.checkpoint import CheckpointError, load_config
from ..stiv_core.memory import PIXEL_VAE, Budget, MemoryOptions, RunShape, VAEProfile, plan_run
from ..stiv_core.memory.options import resolve_quant
from ..stiv_core.memory.planner import GiB
from ..stiv_core.sampling import GuidanceConfig, Stepper
from . import _comfy
from .loader import DTYPES, model_ref, resolve_dtype

ROUTE = "/stiv/plan"


def vae_profile(trained: Optional[TrainedWith]) -> VAEProfile:
    """The VAE a model's latents belong to: a bundle's (None) and a bare pixel-space model's is the pixel VAE;
    another bare model's is the VAE it was trained with (an SD-style estimate, at its pixels per latent)."""
    if trained is None or trained.vae_kind == VAEKind.PIXEL:
        return PIXEL_VAE
    return VAEProfile(spatial_factor=trained.spatial_factor)


@dataclass(frozen=True)
class PlanQuery:
    """What the extension sends: the Loader's and the sampler's current widget values (sizes in pixels)."""

    model_name: str
    frames: int
    width: int
    height: int
    guidance: str = "jit"
    stepper: str = "euler"
    quantization: str = "none"
    block_swap: int = 0
    weight_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("frames", "width", "height"):
            if getattr(self, name) < 1:
                raise ValueError(f"plan query: {name} must be >= 1, got {getattr(self, name)}")
        if self.block_swap < 0:
            raise ValueError(f"plan query: block_swap must be >= 0, got {self.block_swap}")
        if self.weight_dtype not in DTYPES:
            raise ValueError(f"plan query: weight_dtype must be one of {list(DTYPES)}, got {self.weight_dtype!r}")

    @classmethod
    def from_query(cls, query: dict[str, str]) -> PlanQuery:
        """The query string's values; ValueError (the route's 400) names what is missing or not an integer."""
        required = ("model_name", "frames", "width", "height")
        missing = [k for k in required if k not in query]
        if missing:
            raise ValueError(f"plan query: missing {', '.join(missing)} (it needs {', '.join(required)})")
        ints = {"frames", "width", "height", "block_swap"}
        known = {}
        for key, value in query.items():
            if key not in cls.__dataclass_fields__:
                continue
            if key in ints:
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"plan query: {key} must be an integer, got {value!r}") from None
            known[key] = value
        return cls(**known)


def describe_plan(q: PlanQuery) -> dict:
    """Tokens per pass, model passes per step, and the memory plan as text (or why there is none)."""
    try:
        path = resolve_model_path(model_ref(q.model_name))
        config, trained = load_config(path), read_trained_with(path)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        return {"error": str(err)}
    vae = vae_profile(trained)
    f, p, pt = vae.spatial_factor, config.patch_size, config.temporal_patch
    if q.frames % pt or q.height % (f * p) or q.width % (f * p):
        per_latent = f"{f} pixels per latent x patch {p}" if f > 1 else f"the patch {p}"
        return {"error": f"{q.frames} frames of {q.width}x{q.height} px do not fit this model "
                         f"(frames: a multiple of {pt}; width and height: multiples of {f * p}, {per_latent})"}
    device = _comfy.torch_device()
    guidance = GuidanceConfig(q.guidance)
    passes = len(guidance.passes)
    forwards = 2 if Stepper(q.stepper) is Stepper.HEUN else 1
    shape = RunShape.from_pixels(q.frames, q.height, q.width, vae_factor=f, passes=passes,
                                 forwards_per_step=forwards)   # latent units
    tokens = (shape.frames // pt) * (shape.height // p) * (shape.width // p)
    options = MemoryOptions(quant=q.quantization, device=str(device),
                            block_swap=min(q.block_swap, config.num_blocks))
    quant, notes = resolve_quant(options, device)
    budget = Budget.whole_device(device)
    run = plan_run(config, shape, options, device=device, quant=quant, budget=budget,
                   dtype=resolve_dtype(q.weight_dtype, device), vae=vae)
    plan = run.plan
    lines = [f"{tokens} tokens x {passes} passes per step ({q.guidance})", budget_text(budget, device),
             *notes, *run.notes, plan.describe()]
    return {"tokens": tokens, "passes_per_step": passes, "forwards_per_step": passes * forwards,
            "fits": plan.fits, "peak_bytes": plan.peak_bytes, "text": "\n".join(lines)}


def budget_text(budget: Budget, device: torch.device) -> str:
    """The plan's line saying which budget it was made against."""
    gb = lambda n: "unknown" if n is None else f"{n / GiB:.2f} GiB"
    if budget.device_free is None:
        return f"budget: unknown ({budget.unknown}); the plan is not checked against it"
    if budget.device_type == "cpu":
        return f"budget: all {gb(budget.device_free)} of host RAM (sampling on the CPU)"
    return (f"budget: all {gb(budget.device_free)} of {device} (ComfyUI's other models are freed before "
            f"sampling) and {gb(budget.ram_free)} of host RAM available")


def register_routes() -> bool:
    return _comfy.add_get_route(ROUTE, lambda query: describe_plan(PlanQuery.from_query(query)))
