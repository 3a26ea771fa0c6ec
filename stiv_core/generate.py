"""The command-line main job: a video from a prompt (and optionally images) with a STIV model.

    python -m stiv_core.generate --prompt "a red circle moving left on a blue background" --out red.mp4

The task follows from what is given: nothing = T2V, --image = TI2V, --image + --last-image =
interpolation, --condition-frames = video prediction, --keyframes K = a long video (K keyframes, then
interpolation between each pair); --temporal-upsample 2 doubles the frame rate afterwards.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import cli
from .bundle import LOAD_DTYPE, SamplingDefaults, load_defaults, load_pipeline, resolve_model_path
from .checkpoint import load_config
from .lora import check_lora_file, load_lora, parse_lora_arg
from .conditioning import Task, given_frames
from .memory import PIXEL_VAE, MemoryOptions, QuantMode, RunShape, apply_memory_options, plan_run
from .memory.options import resolve_device, resolve_quant
from .model.attention import AttentionBackend
from .pipeline import (FrameCondition, GenerationRequest, STIVPipeline, check_long_video, check_temporal_upsample,
                       check_video_size, long_video_latents, temporal_upsample_latents)
from .sampling import GuidanceConfig, GuidanceMode, SamplerConfig, StepInfo, Stepper
from .video_io import output_kind, read_image, write_video

log = logging.getLogger("stiv_core.generate")


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m stiv_core.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", help="what the video shows (required, except for a multi-view model)")
    p.add_argument("--out", required=True, help="output .mp4, .gif, .webp, or a folder for PNG frames")
    p.add_argument("--model", default="tiny", help="'tiny' or 'tiny-mv' (built in), or a .safetensors bundle path")
    p.add_argument("--negative-prompt", default=None, help="replaces the learned empty text in guidance")
    p.add_argument("--image", help="first frame (TI2V)")
    p.add_argument("--last-image", help="last frame (interpolation; with --image: first and last)")
    p.add_argument("--condition-frames", nargs="+", metavar="PATH", help="first k frames (video prediction)")
    p.add_argument("--keyframes", type=int, help="long video: this many keyframes (>= 2), then interpolation")
    p.add_argument("--keyframe-stride", type=cli.positive_int, default=None,
                   help="frames between keyframes (default: frames - 1)")
    p.add_argument("--temporal-upsample", type=int, choices=(1, 2), default=1, help="2 doubles the frame rate")
    # the sizes and sampler settings: omitted = the model's recorded default
    p.add_argument("--frames", type=cli.positive_int, help="default: the model's")
    p.add_argument("--height", type=cli.positive_int, help="pixels; default: the model's")
    p.add_argument("--width", type=cli.positive_int, help="pixels; default: the model's")
    p.add_argument("--steps", type=cli.positive_int, help="sampling steps; default: the model's")
    p.add_argument("--shift", type=cli.positive_float, help="time shift (> 0); default: the model's")
    p.add_argument("--stepper", choices=[s.value for s in Stepper], default="euler")
    p.add_argument("--guidance", choices=[m.value for m in GuidanceMode], default="jit")
    p.add_argument("--scale", type=cli.finite_float,
                   help="guidance scale (text, or text+image for jit); default: the model's (7.5 for video)")
    p.add_argument("--image-scale", type=cli.finite_float, default=1.5, help="SIT-CFG image scale")
    p.add_argument("--renorm", action="store_true", help="CFG renormalisation to the conditional norm")
    p.add_argument("--no-clip-denoised", action="store_true",
                   help="don't clamp each step's clean estimate to the pixel range (pixel-space models)")
    p.add_argument("--seed", type=seed, default=0, help=f"0 .. {MAX_SEED}")
    p.add_argument("--fps", type=cli.positive_float, help="of the written video; default: the model's x the upsampling")
    p.add_argument("--upscale", type=cli.positive_int, default=1,
                   help="enlarge the written frames this many times (nearest neighbour)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (CUDA falls back to the CPU, logged)")
    low = p.add_argument_group("low VRAM")
    low.add_argument("--quant", choices=[q.value for q in QuantMode], default="none",
                     help="weights of the blocks: fp8, fp8-scaled, int8 / nf4 (bitsandbytes, CUDA)")
    low.add_argument("--block-swap", default="0", help="blocks streamed from the CPU: a count, or 'auto' (planned)")
    low.add_argument("--attention", choices=[b.value for b in AttentionBackend], default="sdpa")
    low.add_argument("--compile", action="store_true", help="torch.compile each block")
    low.add_argument("--plan-only", action="store_true", help="print the memory plan and exit")
    low.add_argument("--force", action="store_true", help="run even when the plan says it will not fit")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="a STIV LoRA file (stiv_core/lora.py) at a strength (default 1); repeat to stack them")
    return p


MAX_SEED = 2 ** 63 - 1   # as the nodes' seed widget (long videos add window indices to it)


def seed(text: str) -> int:
    value = cli.nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value}: must be at most {MAX_SEED}")
    return value


@dataclass(frozen=True)
class Job:
    request: GenerationRequest
    keyframes: Optional[int]
    stride: int
    upsample: int
    memory: MemoryOptions
    decode_chunk: int = 16
    loras: tuple[tuple[str, float], ...] = ()   # (LoRA file, strength), attached in order
    fps: float = 8.0          # of the written video (the model's rate x the temporal upsampling)


def memory_options(args: argparse.Namespace) -> MemoryOptions:
    return MemoryOptions(quant=args.quant, block_swap=args.block_swap, attention=args.attention,
                         compile=args.compile, device=args.device, force=args.force)


def run_shape(job: Job, spatial_factor: int) -> RunShape:
    """The largest single sampling pass of the job (a long video's keyframe pass, its interpolation windows,
    the TUP windows), in latent units, for the planner."""
    r = job.request
    frames = max((r.num_frames, *((job.keyframes, job.stride + 1) if job.keyframes else ())))
    heun = r.sampler.stepper is Stepper.HEUN
    return RunShape(frames, r.height // spatial_factor, r.width // spatial_factor, batch=len(r.prompts),
                    passes=len(r.sampler.guidance.passes), forwards_per_step=2 if heun else 1)


def print_plan(model_path: Path, job: Job) -> None:
    """--plan-only: the plan from the config alone (no weights are loaded), judged as a run would be."""
    device, notes = resolve_device(job.memory.device)
    quant, quant_notes = resolve_quant(job.memory, device)
    run = plan_run(load_config(model_path), run_shape(job, 1), job.memory, device=device, quant=quant,
                   dtype=LOAD_DTYPE, vae=PIXEL_VAE)
    print("\n".join([*notes, *quant_notes, *run.notes, run.plan.describe()]))


def make_job(args: argparse.Namespace, model_path: Path) -> Job:
    """Everything checked before the model loads (against the config its file records): a bad argument
    never costs a model load. An option left out (None) is the model's default."""
    kind = output_kind(args.out)
    d, config = load_defaults(model_path), load_config(model_path)
    frames, height, width = (d.num_frames if args.frames is None else args.frames,
                             d.height if args.height is None else args.height,
                             d.width if args.width is None else args.width)
    prompt = check_multiview(args, d, frames) if d.multiview else args.prompt
    if prompt is None:
        raise ValueError("--prompt is required: describe the video")
    if args.keyframes is not None and args.keyframes < 2:
        raise ValueError(f"--keyframes {args.keyframes}: a long video needs at least 2 keyframes")
    if args.condition_frames and (args.last_image or args.image):
        raise ValueError("--condition-frames (video prediction) is a task of its own: give it without --image "
                         "and --last-image (put the first frame first in --condition-frames)")
    if args.keyframes is not None and args.condition_frames:
        raise ValueError("--condition-frames and --keyframes: the keyframe pass places frames a stride apart, "
                         "not consecutive ones; condition a long video with --image / --last-image")
    stride = frames - 1 if args.keyframe_stride is None else args.keyframe_stride
    if args.keyframes is not None:
        check_long_video(config.temporal_patch, args.keyframes, stride)
    check_video_size(config, PIXEL_VAE.spatial_factor, args.keyframes or frames, height, width)  # the first pass
    length = frames if args.keyframes is None else (args.keyframes - 1) * stride + 1
    if args.temporal_upsample == 2:
        check_temporal_upsample(config.temporal_patch, frames, length)
    resolve_device(args.device)   # an unknown device name: the ones available here
    sampler = SamplerConfig(steps=d.steps if args.steps is None else args.steps,
                            shift=d.shift if args.shift is None else args.shift, stepper=args.stepper,
                            guidance=GuidanceConfig(args.guidance, scale=d.scale if args.scale is None else args.scale,
                                                    image_scale=args.image_scale,
                                                    renormalize=args.renorm),
                            clip_denoised=not args.no_clip_denoised)
    request = GenerationRequest(prompt, frames, height, width, seed=args.seed, sampler=sampler,
                                condition=_condition(args, args.keyframes or frames, height, width),
                                negative_prompt=args.negative_prompt)
    memory = memory_options(args)
    # last, as it may create the output's folder (not for a plan)
    cli.writable_output(args.out, folder=kind == "png", create=not args.plan_only)
    loras = tuple(parse_lora_arg(text) for text in args.lora)
    for path, _ in loras:
        check_lora_file(path, config)
    return Job(request, args.keyframes, stride, args.temporal_upsample, memory,
               fps=d.fps * args.temporal_upsample if args.fps is None else args.fps, loras=loras)


def check_multiview(args: argparse.Namespace, defaults: SamplingDefaults, frames: int) -> str:
    """A multi-view model makes its fixed views from one input view (--image); the prompt is optional (it
    names the object: "a red and blue cube on a gray background"). Returns the prompt."""
    if frames != defaults.num_frames:
        raise ValueError(f"--model {args.model} makes {defaults.num_frames} views (the input view, then "
                         f"{defaults.num_frames - 1} novel ones): --frames must be {defaults.num_frames}, got {frames}")
    if not args.image:
        raise ValueError(f"--model {args.model} is a multi-view model: give the input view with --image")
    others = {"--last-image": args.last_image, "--condition-frames": args.condition_frames,
              "--keyframes": args.keyframes, "--temporal-upsample 2": args.temporal_upsample == 2}
    if any(others.values()):
        raise ValueError(f"--model {args.model} is a multi-view model: it takes --image only, not "
                         f"{', '.join(k for k, v in others.items() if v)}")
    return args.prompt or ""


def _condition(args: argparse.Namespace, frames: int, height: int, width: int) -> Optional[FrameCondition]:
    """The given frames of the clip the first pass samples: `frames` is --frames, or --keyframes for a long
    video (whose last keyframe is where --last-image goes)."""
    paths, task = condition_paths(args)
    if not paths:
        return None
    try:
        indices = given_frames(task, frames, count=len(paths))
    except ValueError as err:
        raise ValueError(f"{len(paths)} condition frames do not fit a {frames}-frame video: {err}") from None
    pixels = torch.stack([read_image(p, height, width) for p in paths], dim=1)  # (3, k, H, W)
    return FrameCondition(pixels[None], indices)


def condition_paths(args: argparse.Namespace) -> tuple[list[str], Task]:
    """The condition images in frame order and the task they make."""
    if args.condition_frames:
        return list(args.condition_frames), Task.PREDICTION
    if args.image and args.last_image:
        return [args.image, args.last_image], Task.INTERPOLATION
    if args.image:
        return [args.image], Task.TI2V
    if args.last_image:
        return [args.last_image], Task.LAST_FRAME
    return [], Task.T2V


def run(pipeline: STIVPipeline, job: Job, *, progress: bool = True) -> torch.Tensor:
    """The video `(3, T, H, W)` in [-1, 1] for a job."""
    from tqdm.auto import tqdm

    bar = tqdm(desc="sampling", unit="step", disable=not progress, dynamic_ncols=True)

    def on_step(info: StepInfo) -> None:
        if bar.total != info.total:
            bar.reset(total=info.total)
        bar.update(1)

    try:
        if job.keyframes is not None:
            latents = long_video_latents(pipeline, job.request, keyframes=job.keyframes, stride=job.stride,
                                         callback=on_step)
        else:
            latents = pipeline.sample_latents(job.request, callback=on_step)
        if job.upsample == 2:
            latents = temporal_upsample_latents(pipeline, job.request, latents, callback=on_step)
    finally:
        bar.close()
    return pipeline.decode(latents, chunk_frames=job.decode_chunk)[0]


def prepare(model_path: Path, job: Job) -> tuple[STIVPipeline, Job]:
    """Load on the CPU, then quantize / plan / swap / move per the job's memory options."""
    pipeline = load_pipeline(model_path, dtype=LOAD_DTYPE)
    for path, strength in job.loras:  # before quantization: the LoRA wraps the base, quantized or not
        load_lora(path, pipeline.model, strength=strength)
    handle = apply_memory_options(pipeline.model, job.memory, shape=run_shape(job, pipeline.vae.spatial_factor),
                                  vae=PIXEL_VAE)
    pipeline.text_encoder.to(handle.device)
    chunk = handle.plan.vae_chunk_frames if handle.plan is not None else job.decode_chunk
    return pipeline, replace(job, decode_chunk=max(1, chunk))


@cli.entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the video is written; a user error exits with status 2 and one line (see `cli`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_path = resolve_model_path(args.model)
    job = make_job(args, model_path)
    if args.plan_only:
        print_plan(model_path, job)
        return 0
    pipeline, job = prepare(model_path, job)
    video = run(pipeline, job)
    out = write_video(args.out, video, fps=job.fps, upscale=args.upscale)
    print(f"wrote {out} ({video.shape[1]} frames, {video.shape[3]}x{video.shape[2]} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
