"""The plan the js/ extension shows on the sampler: tokens, passes per step, the memory planner's verdict.

Served at GET /stiv/plan inside ComfyUI; computed from the checkpoint's config alone (no weights load).
"""
from __future__ import annotations

from dataclasses import dataclass


from ..stiv_core.bundle import resolve_model_path
from ..stiv_core.checkpoint import CheckpointError, load_config
from ..stiv_core.memory import Budget, MemoryOptions, RunShape, VAEProfile, plan_memory
from ..stiv_core.memory.options import resolve_quant
from ..stiv_core.sampling import GuidanceConfig, Stepper
from . import _comfy
from .loader import model_ref, resolve_dtype

ROUTE = "/stiv/plan"
PIXEL_VAE = VAEProfile(weight_bytes=0, bytes_per_pixel=12.0, spatial_factor=1)


@dataclass(frozen=True)
class PlanQuery:
    """What the extension sends: the Loader's and the sampler's current widget values."""

    model_name: str
    frames: int
    width: int
    height: int
    guidance: str = "jit"
    stepper: str = "euler"
    quantization: str = "none"
    block_swap: int = 0
    weight_dtype: str = "auto"

    @classmethod
    def from_query(cls, query: dict[str, str]) -> PlanQuery:
        ints = {"frames", "width", "height", "block_swap"}
        known = {k: (int(v) if k in ints else v) for k, v in query.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def describe_plan(q: PlanQuery) -> dict:
    """Tokens per pass, model passes per step, and the memory plan as text (or why there is none)."""
    try:
        config = load_config(resolve_model_path(model_ref(q.model_name)))
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        return {"error": str(err)}
    device = _comfy.torch_device()
    passes = len(GuidanceConfig(q.guidance).passes)
    forwards = 2 if Stepper(q.stepper) is Stepper.HEUN else 1
    p, pt = config.patch_size, config.temporal_patch
    if q.frames % pt or q.height % p or q.width % p:
        return {"error": f"{q.frames} frames of {q.width}x{q.height} px do not fit this model "
                         f"(frames: multiple of {pt}; sizes: multiples of {p})"}
    tokens = (q.frames // pt) * (q.height // p) * (q.width // p)
    notes: list[str] = []
    quant = resolve_quant(MemoryOptions(quant=q.quantization, device=str(device)), device, notes)
    shape = RunShape(q.frames, q.height, q.width, guidance=GuidanceConfig(q.guidance).mode, forwards_per_step=forwards)
    plan = plan_memory(config, shape, Budget.probe(device), quant=quant, dtype=resolve_dtype(q.weight_dtype, device),
                       blocks_to_swap=min(q.block_swap, config.depth + config.maskdit_extra_blocks),
                       vae=PIXEL_VAE)
    return {"tokens": tokens, "passes_per_step": passes, "forwards_per_step": passes * forwards,
            "fits": plan.fits, "peak_bytes": plan.peak_bytes,
            "text": "\n".join([f"{tokens} tokens x {passes} passes per step ({q.guidance})", plan.describe()])}


def register_routes() -> bool:
    return _comfy.add_get_route(ROUTE, lambda query: describe_plan(PlanQuery.from_query(query)))
