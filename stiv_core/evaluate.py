"""shapes-bench: the automatic evaluator of the procedural domain (`stiv_core.data.shapes`).

Each frame is segmented by colour (the background is the frame's median colour; the object is what
differs from it), the object's colour, shape and centre are named, and the centre track gives the
direction of motion (on the torus the domain lives on). Over a prompt set it scores T2V (colour,
shape, direction, background), TI2V (frame-0 PSNR, colour/shape/background kept in the generated
frames, direction), interpolation (endpoint PSNR, monotone path), long videos (colour drift first ->
last keyframe), motion and smoothness, and seconds/video.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from collections import Counter
from dataclasses import dataclass
from statistics import mean
from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from . import cli
from .bundle import SamplingDefaults, load_defaults, load_pipeline, resolve_model_path
from .metrics import psnr
from .data.shapes import (BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, all_combinations, caption_for, held_out,
                          ShapeParams, parse_caption, random_params, render, shape_mask)
from .pipeline import FrameCondition, GenerationRequest, STIVPipeline, generate, generate_long
from .sampling import GuidanceConfig, SamplerConfig

OBJECT_THRESHOLD = 0.2   # RGB distance (0..1 units) from the background that counts as object
MIN_AREA_FRACTION = 0.004
AREA_FACTOR = {"circle": math.pi, "square": 1.6 ** 2, "triangle": 3 * math.sqrt(3) / 4}  # area / r^2


@dataclass(frozen=True)
class Detection:
    """What one frame shows; `found` is False when no object stands out from the background."""

    found: bool
    background: str
    color: Optional[str] = None
    shape: Optional[str] = None
    centre: Optional[tuple[float, float]] = None  # (x, y) pixels
    rgb: Optional[tuple[float, float, float]] = None


def _nearest(rgb: torch.Tensor, palette: dict[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    distances = (torch.tensor([palette[n] for n in names]) - rgb).norm(dim=1)
    return names[int(distances.argmin())]


def _circular_mean(coords: torch.Tensor, period: int) -> float:
    angle = coords * (2 * math.pi / period)
    return (math.atan2(angle.sin().mean().item(), angle.cos().mean().item()) % (2 * math.pi)) * period / (2 * math.pi)


def detect(frame: torch.Tensor) -> Detection:
    """Segment one frame `(3, H, W)` in [-1, 1]."""
    rgb = (frame.float().clamp(-1, 1) + 1) / 2
    _, h, w = rgb.shape
    pixels = rgb.reshape(3, -1).T                                       # (H*W, 3)
    bg = pixels.median(dim=0).values
    mask = _majority_filter(((pixels - bg).norm(dim=1) > OBJECT_THRESHOLD).view(h, w)).flatten()
    background = _nearest(bg, BACKGROUNDS)
    if mask.sum() < MIN_AREA_FRACTION * h * w:
        return Detection(False, background)
    ys, xs = torch.div(mask.nonzero()[:, 0], w, rounding_mode="floor").float() + 0.5, \
        (mask.nonzero()[:, 0] % w).float() + 0.5
    cx, cy = _circular_mean(xs, w), _circular_mean(ys, h)
    color_rgb = pixels[mask].median(dim=0).values
    return Detection(True, background, _nearest(color_rgb, COLORS), _classify_shape(mask.view(h, w), cx, cy),
                     (cx, cy), tuple(color_rgb.tolist()))


def _majority_filter(mask: torch.Tensor) -> torch.Tensor:
    """Each pixel takes the majority of its 3x3 neighbourhood (wrapping): drops speckle noise."""
    padded = F.pad(mask.float()[None, None], (1, 1, 1, 1), mode="circular")
    return F.avg_pool2d(padded, 3, stride=1)[0, 0] > 0.5


def _classify_shape(mask: torch.Tensor, cx: float, cy: float) -> str:
    """The shape whose template (same centre and area) overlaps the mask best (IoU)."""
    h, w = mask.shape
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    dx = torch.remainder(xs - cx + w / 2, w) - w / 2
    dy = torch.remainder(ys - cy + h / 2, h) - h / 2
    area = mask.sum().item()
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_mask(shape, dx, dy, math.sqrt(area / AREA_FACTOR[shape]))
        iou = (template & mask).sum().item() / max(1, (template | mask).sum().item())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def track(video: torch.Tensor) -> list[Detection]:
    """Detections for every frame of `(3, T, H, W)`."""
    return [detect(video[:, t]) for t in range(video.shape[1])]


def displacements(detections: Sequence[Detection], height: int, width: int) -> list[tuple[float, float]]:
    """Per-frame centre moves (dx, dy), wrapped to the shortest move on the torus."""
    wrap = lambda d, n: (d + n / 2) % n - n / 2
    found = [d.centre for d in detections if d.found]
    return [(wrap(b[0] - a[0], width), wrap(b[1] - a[1], height)) for a, b in zip(found, found[1:])]


def direction_of(detections: Sequence[Detection], height: int, width: int, min_speed: float = 0.2) -> Optional[str]:
    """The named direction closest to the mean motion; None if the object barely moves."""
    moves = displacements(detections, height, width)
    if not moves:
        return None
    vx, vy = mean(m[0] for m in moves), mean(m[1] for m in moves)
    if math.hypot(vx, vy) < min_speed:
        return None
    return max(DIRECTIONS, key=lambda name: vx * DIRECTIONS[name][0] + vy * DIRECTIONS[name][1])


def majority(values: Sequence[Optional[str]]) -> Optional[str]:
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None


def monotone(detections: Sequence[Detection], height: int, width: int, tolerance: float = 0.5,
             max_jump: float = 2.0) -> bool:
    """True if the object is seen in every frame and moves steadily from the first to the last: never
    backwards along its overall direction (by > tolerance px), and no step longer than `max_jump` times
    the mean step (+ tolerance), so "hold, then jump to the end" is not a path."""
    if not detections or not all(d.found for d in detections):
        return False
    moves = displacements(detections, height, width)
    if not moves:
        return False
    total = (sum(m[0] for m in moves), sum(m[1] for m in moves))
    norm = math.hypot(*total) or 1.0
    along = [(m[0] * total[0] + m[1] * total[1]) / norm for m in moves]
    step = norm / len(moves)
    return all(-tolerance <= a <= max_jump * step + tolerance for a in along)


class VideoModel(Protocol):
    """What the bench runs: videos `(3, T, H, W)` in [-1, 1] for a caption."""

    def generate(self, caption: str, *, num_frames: int, seed: int,
                 condition: Optional[FrameCondition] = None) -> torch.Tensor:
        ...

    def generate_long(self, caption: str, *, keyframes: int, stride: int, seed: int) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class BenchConfig:
    num_frames: int = 16
    height: int = 32
    width: int = 32
    keyframes: int = 8     # long video: (keyframes - 1) * stride + 1 frames
    stride: int = 15
    seed: int = 0
    tasks: tuple[str, ...] = ("t2v", "ti2v", "interp", "long")
    seeds: int = 1         # videos per prompt: one accuracy over 46 prompts moves by ~7 points from chance alone


def heldout_prompts() -> list[str]:
    """Captions of every combination held out of training."""
    return [caption_for(*c) for c in all_combinations() if held_out(c)]


def ground_truth(caption: str, num_frames: int, config: BenchConfig, seed: int) -> torch.Tensor:
    """The domain's own clip for a caption: what a perfect model could make (seeded)."""
    params = random_params(torch.Generator().manual_seed(seed), parse_caption(caption).combination)
    return render(params, num_frames, config.height, config.width)


class GroundTruthModel:
    """Renders the true clip: the evaluator's self-check (it must score ~100%)."""

    def __init__(self, config: BenchConfig):
        self.config = config

    def generate(self, caption, *, num_frames, seed, condition=None):
        return ground_truth(caption, num_frames, self.config, seed)

    def generate_long(self, caption, *, keyframes, stride, seed):
        return ground_truth(caption, (keyframes - 1) * stride + 1, self.config, seed)


def _identity(dets: Sequence[Detection]) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """The majority (colour, shape, background) over the frames."""
    return (majority([d.color for d in dets]), majority([d.shape for d in dets]),
            majority([d.background for d in dets]))


def _identity_scores(identity: tuple[Optional[str], Optional[str], Optional[str]],
                     want: ShapeParams) -> dict[str, bool]:
    color, shape, background = identity
    return {"color_acc": color == want.color, "shape_acc": shape == want.shape,
            "background_acc": background == want.background}


def _t2v(model: VideoModel, caption: str, config: BenchConfig, seed: int) -> dict[str, float]:
    want = parse_caption(caption)
    start = time.perf_counter()
    video = model.generate(caption, num_frames=config.num_frames, seed=seed)
    seconds = time.perf_counter() - start
    dets = track(video)
    moves = displacements(dets, config.height, config.width)
    speeds = [math.hypot(*m) for m in moves]
    accel = [math.hypot(b[0] - a[0], b[1] - a[1]) for a, b in zip(moves, moves[1:])]
    identity = _identity(dets)
    color, shape, background = identity
    direction = direction_of(dets, config.height, config.width)
    return {**_identity_scores(identity, want),
            # the caption's two colours exchanged (object drawn in the background's colour or vice versa)
            "color_swap": color == want.background or background == want.color,
            "direction_acc": direction == want.direction,
            "motion": mean(speeds) if speeds else 0.0, "smoothness": mean(accel) if accel else 0.0,
            "seconds": seconds, "seen": caption_for(color, shape, direction, background)}


def _ti2v(model: VideoModel, caption: str, config: BenchConfig, seed: int) -> dict[str, float]:
    truth = ground_truth(caption, config.num_frames, config, seed)
    condition = FrameCondition(truth[None, :, :1], (0,))
    video = model.generate(caption, num_frames=config.num_frames, seed=seed, condition=condition)
    dets = track(video)
    moves = displacements(dets, config.height, config.width)
    want = parse_caption(caption)
    return {"frame0_psnr": psnr(video[:, 0], truth[:, 0]),
            **_identity_scores(_identity(dets[1:]), want),   # kept in the generated frames (frame 0 is given)
            "direction_acc": direction_of(dets, config.height, config.width) == want.direction,
            "motion": mean(math.hypot(*m) for m in moves) if moves else 0.0,
            "net_motion": math.hypot(mean(m[0] for m in moves), mean(m[1] for m in moves)) if moves else 0.0}


def _interp(model: VideoModel, caption: str, config: BenchConfig, seed: int) -> dict[str, float]:
    truth = ground_truth(caption, config.num_frames, config, seed)
    last = config.num_frames - 1
    condition = FrameCondition(truth[None, :, [0, last]], (0, last))
    video = model.generate(caption, num_frames=config.num_frames, seed=seed, condition=condition)
    return {"endpoint_psnr": mean([psnr(video[:, 0], truth[:, 0]), psnr(video[:, last], truth[:, last])]),
            "monotone_rate": monotone(track(video), config.height, config.width)}


def _long(model: VideoModel, caption: str, config: BenchConfig, seed: int) -> dict[str, float]:
    video = model.generate_long(caption, keyframes=config.keyframes, stride=config.stride, seed=seed)
    first, last = detect(video[:, 0]), detect(video[:, -1])
    drift = 1.0 if not (first.found and last.found) else \
        mean(abs(a - b) for a, b in zip(first.rgb, last.rgb))
    return {"color_drift": drift, "color_kept": last.found and last.color == parse_caption(caption).color,
            "frames": float(video.shape[1])}


TASKS = {"t2v": _t2v, "ti2v": _ti2v, "interp": _interp, "long": _long}
NOT_AVERAGED = ("task", "caption", "seed", "seen")   # per-video details kept in `rows` only


def run_bench(model: VideoModel, prompts: Sequence[str], config: BenchConfig = BenchConfig(),
              rows: Optional[list[dict]] = None) -> dict[str, dict[str, float]]:
    """Mean of every metric per task over `prompts`, each made with `config.seeds` seeds (accuracies as
    fractions 0..1). Prompt i's k-th video uses seed `config.seed + i + k * len(prompts)`, so one seed
    gives the same videos as before seeds existed. Each video's metrics (and, for T2V, the caption the
    evaluator read back: `seen`) are appended to `rows` when given."""
    for caption in prompts:
        parse_caption(caption)  # a prompt outside the domain fails before any generation
    if config.seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {config.seeds}")
    results: dict[str, dict[str, float]] = {}
    for task in config.tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
        task_rows = [{"task": task, "caption": caption, "seed": seed, **TASKS[task](model, caption, config, seed)}
                     for k in range(config.seeds) for i, caption in enumerate(prompts)
                     for seed in [config.seed + i + k * len(prompts)]]
        if rows is not None:
            rows.extend(task_rows)
        results[task] = {key: float(mean(float(row[key]) for row in task_rows))
                         for key in task_rows[0] if key not in NOT_AVERAGED}
    if "t2v" in results:
        results["seconds_per_video"] = results["t2v"].pop("seconds")
    return results


def format_table(results: dict) -> str:
    lines = [f"{'metric':<28} {'value':>10}", "-" * 39]
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            lines += [f"{task + '.' + key:<28} {value:>10.3f}" for key, value in metrics.items()]
        else:
            lines.append(f"{task:<28} {metrics:>10.3f}")
    return "\n".join(lines)


class PipelineModel:
    """A STIVPipeline as a bench model (batch 1, the pipeline's pixel format)."""

    def __init__(self, pipeline: STIVPipeline, config: BenchConfig, sampler: SamplerConfig):
        self.pipeline, self.config, self.sampler = pipeline, config, sampler

    def _request(self, caption: str, num_frames: int, seed: int, condition=None) -> GenerationRequest:
        return GenerationRequest(caption, num_frames, self.config.height, self.config.width, seed=seed,
                                 sampler=self.sampler, condition=condition)

    def generate(self, caption, *, num_frames, seed, condition=None):
        return generate(self.pipeline, self._request(caption, num_frames, seed, condition))[0]

    def generate_long(self, caption, *, keyframes, stride, seed):
        request = self._request(caption, self.config.num_frames, seed)
        return generate_long(self.pipeline, request, keyframes=keyframes, stride=stride)[0]


@cli.entry_point
def main(argv: Optional[Sequence[str]] = None) -> dict:
    """The results; a user error exits with status 2 and one line, before the model loads (see cli.py)."""
    import logging

    from .checkpoint import load_config
    from .pipeline import check_long_video
    from .sampling import GuidanceMode

    p = cli.ArgumentParser(prog="python -m stiv_core.evaluate", description="shapes-bench")
    p.add_argument("--model", default="tiny", help="'tiny', a bundle path, or 'groundtruth' (self-check)")
    p.add_argument("--prompts", help="a text file, one caption per line (default: the held-out prompts)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--limit", type=cli.positive_int, help="use only the first N prompts")
    p.add_argument("--seeds", type=cli.positive_int, default=1, help="videos per prompt (default 1)")
    p.add_argument("--tasks", nargs="+", choices=[*TASKS, "multiview"],
                   help=f"default: {' '.join(TASKS)}; 'multiview' (the default of a multi-view model such as "
                        f"tiny-mv) scores novel views of held-out objects (stiv_core/multiview_bench.py)")
    p.add_argument("--steps", type=cli.positive_int, default=25)
    p.add_argument("--guidance", default="jit", choices=[m.value for m in GuidanceMode])
    p.add_argument("--scale", type=cli.finite_float, help="guidance scale; default: the model's (7.5 for video)")
    p.add_argument("--image-scale", type=cli.finite_float, default=1.5)
    p.add_argument("--no-clip-denoised", action="store_true", help="sampler: no clamp of clean estimates")
    p.add_argument("--keyframes", type=cli.positive_int, default=16)
    p.add_argument("--keyframe-stride", type=cli.positive_int, default=7)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="score the model with this STIV LoRA (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tasks and "multiview" in args.tasks and len(args.tasks) > 1:
        raise ValueError("--tasks multiview runs on its own (its objects are another domain than the shapes)")
    path = None if args.model == "groundtruth" else resolve_model_path(args.model)
    d = None if path is None else load_defaults(path)
    if args.tasks == ["multiview"] or (args.tasks is None and d is not None and d.multiview):
        return _multiview_main(args, path, d)
    args.tasks = args.tasks or list(TASKS)
    prompts = heldout_prompts()
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {args.prompts}: no captions in it (one per line)")
    prompts = prompts[: args.limit] if args.limit else prompts
    if args.json:
        cli.writable_output(args.json)
    if path is None:
        config = BenchConfig(keyframes=args.keyframes, stride=args.keyframe_stride, tasks=tuple(args.tasks),
                             seeds=args.seeds)
        model: VideoModel = GroundTruthModel(config)
    else:
        if "long" in args.tasks:
            check_long_video(load_config(path).temporal_patch, args.keyframes, args.keyframe_stride)
        config = BenchConfig(d.num_frames, d.height, d.width, args.keyframes, args.keyframe_stride,
                             tasks=tuple(args.tasks), seeds=args.seeds)
        model = PipelineModel(_with_loras(load_pipeline(path), args.lora), config, _sampler(args, d))
    rows: list[dict] = []
    results = run_bench(model, prompts, config, rows)
    return _report(f"shapes-bench: {args.model}, {len(prompts)} prompts x {config.seeds} seed(s), {config.num_frames} "
                   f"frames {config.width}x{config.height}", results, rows, args.json)


def _with_loras(pipeline: STIVPipeline, loras: Sequence[str]) -> STIVPipeline:
    from .lora import load_lora, parse_lora_arg

    for text in loras:
        path, strength = parse_lora_arg(text)
        load_lora(path, pipeline.model, strength=strength)
    return pipeline


def _sampler(args, defaults: SamplingDefaults) -> SamplerConfig:
    scale = defaults.scale if args.scale is None else args.scale
    return SamplerConfig(steps=args.steps, shift=defaults.shift, guidance=GuidanceConfig(
        args.guidance, scale=scale, image_scale=args.image_scale), clip_denoised=not args.no_clip_denoised)


def _report(header: str, results: dict, rows: list[dict], json_path: Optional[str]) -> dict:
    import json

    print(header)
    print(format_table(results))
    if json_path:
        Path(json_path).write_text(json.dumps({**results, "rows": rows}, indent=2))
    return results


def _multiview_main(args, path: Optional[Path], d: Optional[SamplingDefaults]) -> dict:
    """multiview-bench: `path` and its defaults `d` (None: the ground truth, the self-check)."""
    from .multiview_bench import MultiviewConfig, heldout_objects, pipeline_model, run_multiview, true_views

    objects = heldout_objects()[: args.limit] if args.limit else heldout_objects()
    if args.json:
        cli.writable_output(args.json)
    if path is None:
        config = MultiviewConfig(seeds=args.seeds)
        model = true_views(config)
    else:
        config = MultiviewConfig(d.height, d.width, seeds=args.seeds)
        model = pipeline_model(_with_loras(load_pipeline(path), args.lora), _sampler(args, d), config)
    rows: list[dict] = []
    results = run_multiview(model, config, objects=objects, rows=rows)
    return _report(f"multiview-bench: {args.model}, {len(objects)} held-out objects x {config.seeds} seed(s), "
                   f"{config.width}x{config.height}", results, rows, args.json)


if __name__ == "__main__":
    main()
