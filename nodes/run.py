"""What the sampling nodes share: their settings as one dataclass, and a run with ComfyUI's progress bar,
a latent preview each step, interrupt between steps (memory freed) and readable errors."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from PIL import Image

from ..stiv_core.memory import Budget, RunShape, WontFitError, plan_memory
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
                                    guidance=config.guidance.mode,
                                    forwards_per_step=2 if config.stepper is Stepper.HEUN else 1)

    def request(self, cond: STIVConditioning, num_frames: int, *, frame_stride: int = 1) -> GenerationRequest:
        """The pipeline's request; the condition images are placed for `num_frames` frames."""
        frames: Optional[FrameCondition] = None
        if cond.images is not None:
            frames = cond.images.frame_condition(num_frames, self.height, self.width)
        return GenerationRequest(cond.prompt, num_frames, self.height, self.width, seed=self.seed,
                                 sampler=self.sampler_config(), condition=frames,
                                 negative_prompt=cond.negative_prompt, frame_stride=frame_stride)


UNBOUNDED = 1 << 62
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)   # torch.OutOfMemoryError: 2.5+


def needed_bytes(model: STIVModel, shape: RunShape) -> int:
    """Device memory a run of `shape` needs with the model as loaded (weights, ring, activations)."""
    handle, net = model.memory, model.pipeline.model
    swap = len(handle.swapper.streamed) if handle.swapper is not None else 0
    dtype = net.patch_embed.weight.dtype
    return plan_memory(net.config, shape, Budget(UNBOUNDED, UNBOUNDED, handle.device.type), quant=handle.quant,
                       dtype=dtype, blocks_to_swap=swap, backend=net.attention_backend).peak_bytes


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
        with on_device(model, shape()):
            return {"samples": work(pipeline, on_step).cpu()}
    except GenerationCancelled:
        failure = None
    except (ValueError, WontFitError) as err:
        failure = f"{node}: {err}"
    except OUT_OF_MEMORY as err:
        failure = (f"{node}: out of device memory ({str(err).splitlines()[0]}); the weights are back on the "
                   f"CPU. Swap more blocks (STIV Loader block_swap), quantize, or lower the frames or size")
    # outside the except blocks: the traceback (and the tensors its frames hold) is gone by now
    _comfy.free_memory()
    if failure is None:
        _comfy.raise_interrupted()
    raise STIVInputError(failure)
