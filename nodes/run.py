"""What the sampling nodes share: their settings as one dataclass, and a run with ComfyUI's progress bar,
a latent preview each step, interrupt between steps (memory freed) and readable errors; before it, the
memory plan of the run checked against the device (free RAM on the CPU, the whole GPU on a GPU), so a
run that cannot fit is refused before it allocates anything."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import torch
from PIL import Image

from ..stiv_core.memory import (PIXEL_VAE, Budget, MemoryOptions, MemoryPlan, RunPlan, RunShape, VAEProfile,
                                WontFitError, plan_run)
from ..stiv_core.memory.quant import QuantConfig
from ..stiv_core.model.sizes import tensor_bytes
from ..stiv_core.pipeline import FrameCondition, GenerationRequest, STIVPipeline
from ..stiv_core.sampling import GenerationCancelled, GuidanceConfig, GuidanceMode, SamplerConfig, StepInfo, Stepper
from ..stiv_core.sampling.sampler import StepCallback
from . import _comfy
from .comfy_adapters import RecordedVAE
from .types import STIVConditioning, STIVInputError, STIVModel

MAX_SEED = 2 ** 63 - 1   # long videos add the window index to the seed


def settings_inputs(defaults: Optional[dict] = None) -> dict:
    """The widgets every sampling node has (their names are `SamplingSettings`' fields)."""
    d = {"width": 32, "height": 32, "steps": 25, **(defaults or {})}
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
        "width": ("INT", {"default": d["width"], "min": 4, "max": 4096, "step": 4}),
        "height": ("INT", {"default": d["height"], "min": 4, "max": 4096, "step": 4}),
        "steps": ("INT", {"default": d["steps"], "min": 1, "max": 500}),
        "shift": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 20.0, "step": 0.05,
                            "tooltip": "time shift; > 1 spends more steps near noise"}),
        "stepper": ([s.value for s in Stepper], {"default": Stepper.EULER.value}),
        "guidance": ([m.value for m in GuidanceMode], {"default": GuidanceMode.JIT.value,
                     "tooltip": "jit: joint image-text CFG (2 passes); sit: separate (3 passes); "
                                "cfg: text only; none: 1 pass"}),
        "scale": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                            "tooltip": "guidance scale (text, or text+image for jit)"}),
        "image_scale": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "SIT-CFG's image scale"}),
        "renormalize": ("BOOLEAN", {"default": False, "tooltip": "rescale the guided velocity to the "
                                                                  "conditional one's norm"}),
    }


NUMERIC_SETTINGS = ("seed", "width", "height", "steps", "shift", "scale", "image_scale")


def check_widgets(inputs: dict, *, check_max: bool = True, **values) -> bool | str:
    """ComfyUI's VALIDATE_INPUTS for numeric widgets: True, or a message naming the first bad input and
    what its widget allows (a whole number, finite, within min..max). An input given by a link is not
    known yet (None): the node checks it when it runs. A node that defines VALIDATE_INPUTS for an input
    takes over ComfyUI's own range check of it, hence the ranges here (`check_max` False: only the minimum,
    for a value that reached the node, where the maximum is the widget's and the memory plan judges more)."""
    for name, value in values.items():
        if value is None:
            continue
        kind, options = inputs[name][0], inputs[name][1]
        whole = isinstance(value, int) and not isinstance(value, bool)
        if kind == "INT" and not whole:
            return f"{name} must be a whole number, got {value!r}"
        if (kind == "FLOAT" and not (whole or isinstance(value, float))) or not math.isfinite(value):
            return f"{name} must be a finite number, got {value!r}"
        low, high = options.get("min", -math.inf), options.get("max", math.inf) if check_max else math.inf
        if not low <= value <= high:
            allowed = f">= {low}" if high == math.inf else f"between {low} and {high}"
            return f"{name} must be {allowed}, got {value}"
    return True


def require_widgets(node: str, inputs: dict, **values) -> None:
    """`check_widgets` when the node runs (a linked value is known by then): STIVInputError naming the input."""
    problem = check_widgets(inputs, check_max=False, **values)
    if problem is not True:
        raise STIVInputError(f"{node}: {problem}")


@dataclass(frozen=True)
class SamplingSettings:
    seed: int
    width: int
    height: int
    steps: int
    shift: float
    stepper: str
    guidance: str
    scale: float
    image_scale: float
    renormalize: bool

    def sampler_config(self) -> SamplerConfig:
        guidance = GuidanceConfig(self.guidance, scale=self.scale, image_scale=self.image_scale,
                                  renormalize=self.renormalize)
        return SamplerConfig(steps=self.steps, shift=self.shift, stepper=self.stepper, guidance=guidance)

    def run_shape(self, frames: int, vae_factor: int) -> RunShape:
        """A sampling pass of `frames` frames at these settings, in latent units (for the planner)."""
        config = self.sampler_config()   # bad settings: its ValueError
        return RunShape.from_pixels(frames, self.height, self.width, vae_factor=vae_factor,
                                    passes=len(config.guidance.passes),
                                    forwards_per_step=2 if config.stepper is Stepper.HEUN else 1)

    def request(self, cond: STIVConditioning, num_frames: int, *, frame_stride: int = 1) -> GenerationRequest:
        """The pipeline's request; the condition images are placed for `num_frames` frames."""
        frames: Optional[FrameCondition] = None
        if cond.images is not None:
            frames = cond.images.frame_condition(num_frames, self.height, self.width)
        return GenerationRequest(cond.prompt, num_frames, self.height, self.width, seed=self.seed,
                                 sampler=self.sampler_config(), condition=frames,
                                 negative_prompt=cond.negative_prompt, frame_stride=frame_stride)


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)   # torch.OutOfMemoryError: 2.5+
# what torch's CPU allocator says when an allocation fails (a plain RuntimeError, not OutOfMemoryError)
CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator", "can't allocate memory", "not enough memory")


def vae_profile(pipeline: STIVPipeline) -> VAEProfile:
    """The decode cost the planner assumes for the pipeline's VAE: the pixel VAE's, else an SD-style
    estimate at its pixels per latent (as nodes/plan.py's `vae_profile` for a checkpoint's)."""
    factor = pipeline.vae.spatial_factor
    return PIXEL_VAE if factor == 1 else VAEProfile(spatial_factor=factor)


def plan_for(model: STIVModel, shape: RunShape, budget: Optional[Budget]) -> RunPlan:
    """The memory plan of a run of `shape` with the model as loaded (its device, quantization, swapped
    blocks, attention), through the one planning entry point the CLI uses too; `budget` None: what is
    free on the device now. The model's weights are already in host RAM (the Loader keeps them there)."""
    handle, net = model.memory, model.pipeline.model
    if handle is None:
        device, quant, options = model.pipeline.device, QuantConfig(), MemoryOptions(device=str(model.pipeline.device))
    else:
        device, quant, options = handle.device, handle.quant, handle.options
    swap = len(handle.swapper.streamed) if handle is not None and handle.swapper is not None else 0
    options = replace(options, block_swap=swap, attention=net.attention_backend, force=False)
    return plan_run(net.config, shape, options, device=device, quant=quant, dtype=net.patch_embed.weight.dtype,
                    budget=budget, held_bytes=tensor_bytes(net), vae=vae_profile(model.pipeline))


def needed_bytes(model: STIVModel, shape: RunShape) -> int:
    """Device memory a run of `shape` needs with the model as loaded (weights, ring, activations)."""
    device = model.memory.device if model.memory is not None else model.pipeline.device
    return plan_for(model, shape, Budget.unbounded(device.type)).plan.peak_bytes


def check_fits(model: STIVModel, shape: RunShape) -> MemoryPlan:
    """The run's plan, or WontFitError saying what to change. On the CPU the budget is the RAM available
    now (plus the model's own weights, already there); on a GPU the whole device, because ComfyUI is asked
    to unload its other models before the run (`on_device`), as the plan the js/ extension shows."""
    device = model.memory.device if model.memory is not None else model.pipeline.device
    budget = None if device.type == "cpu" else Budget.whole_device(device)
    run = plan_for(model, shape, budget)
    if not run.plan.fits:
        raise WontFitError(does_not_fit(run.plan, device))
    return run.plan


def does_not_fit(plan: MemoryPlan, device: torch.device) -> str:
    """The node error for a refused run: the verdict, the fixes in the node's own widgets, the plan."""
    where = "the free RAM (sampling on the CPU)" if device.type == "cpu" else f"{device}"
    swap = "" if device.type == "cpu" else ", swap more blocks or quantize (STIV Loader)"
    return (f"this run does not fit in {where}: {plan.reason}. Use fewer frames or a smaller width/height"
            f"{swap}; for a long video, keyframes then interpolation (STIV Keyframe -> Interpolate) samples "
            f"a few frames at a time; decode in chunks (STIV Decode chunk_frames {plan.vae_chunk_frames} or "
            f"fewer). Nothing was allocated.\n{plan.describe()}")


@contextmanager
def on_device(model: STIVModel, shape: RunShape) -> Iterator[None]:
    """The model's weights (and its own text encoder) on the device for one run, then back on the CPU, so
    between runs STIV holds no VRAM that ComfyUI cannot take back; before loading, ComfyUI is asked to
    unload its own models until the run fits."""
    handle = model.memory
    if handle is None or handle.device.type == "cpu":
        yield
        return
    _comfy.make_room(handle.device, needed_bytes(model, shape))
    try:
        handle.load()
        model.pipeline.text_encoder.to(handle.device)
        yield
    finally:
        handle.offload()
        model.pipeline.text_encoder.to("cpu")


def preview_image(pipeline: STIVPipeline, denoised: torch.Tensor) -> Image.Image:
    """The middle frame of the first video's clean estimate, as a PIL image."""
    mid = denoised.shape[2] // 2
    with torch.inference_mode():
        frame = pipeline.vae.decode(denoised[:1, :, mid : mid + 1].float())[0, :, 0]
    rgb = ((frame.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(rgb)


def run_sampling(model: STIVModel, conditioning: STIVConditioning, total_steps: int, node: str,
                 work: Callable[[STIVPipeline, StepCallback], torch.Tensor],
                 shape: Callable[[], RunShape]) -> dict:
    """`work(pipeline, callback)` -> latents, as a LATENT, with the model's pipeline as the conditioning
    makes it (a ComfyUI CLIP's prompts, a ComfyUI VAE) and its weights on the device for the run (`shape()`:
    its largest pass, to make room for; a bad setting raises there); interrupt raises ComfyUI's interrupt, bad input a STIVInputError
    naming the node. Either way the run's memory is released before raising."""
    try:
        pipeline = conditioning.pipeline_for(model)
    except ValueError as err:
        raise STIVInputError(f"{node}: {err}") from None
    bar, done = _comfy.progress_bar(total_steps), 0
    # previews as ComfyUI is set (off by default); a bare model without a ComfyUI VAE has no decoder
    preview_size = None if isinstance(pipeline.vae, RecordedVAE) else _comfy.preview_max_size()

    def on_step(info: StepInfo) -> bool:
        nonlocal done
        if _comfy.interrupt_requested():
            return False
        done += 1
        preview = None if preview_size is None else preview_image(pipeline, info.denoised)
        bar.update_absolute(done, total_steps,
                            None if preview is None else _comfy.preview_payload(preview, preview_size))
        return True

    try:
        run_shape = shape()
        check_fits(model, run_shape)   # before anything is allocated: a run that won't fit never starts
        with on_device(model, run_shape), _comfy.warnings_to_page(node):
            return {"samples": work(pipeline, on_step).cpu()}
    except GenerationCancelled:
        failure = None
    except (ValueError, WontFitError) as err:
        failure = f"{node}: {err}"
    except OUT_OF_MEMORY as err:
        failure = (f"{node}: out of device memory ({str(err).splitlines()[0]}); the weights are back on the "
                   f"CPU. Swap more blocks (STIV Loader block_swap), quantize, or lower the frames or size")
    except RuntimeError as err:
        if not any(s in str(err) for s in CPU_OUT_OF_MEMORY):
            raise
        failure = (f"{node}: out of memory on the CPU ({str(err).splitlines()[0]}); lower the frames or "
                   f"width/height")
    # outside the except blocks: the traceback (and the tensors its frames hold) is gone by now
    _comfy.free_memory()
    if failure is None:
        _comfy.raise_interrupted()
    raise STIVInputError(failure)
