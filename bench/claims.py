"""The paper's claims at the built-in model's scale, measured with shapes-bench.

(a) frame replacement keeps frame 0: TI2V frame-0 PSNR against the given image, next to the frame-0
    PSNR of a T2V video of the same prompt and seed (no image condition) against the same image;
(c) JIT-CFG (2 passes) against SIT-CFG (3 passes): T2V / TI2V accuracies and seconds per video (the two
    timed side by side, prompt by prompt);
(b) with `--stale-motion WITH_DROPOUT WITHOUT_DROPOUT`: TI2V motion of two models trained alike but for
    the image-condition dropout (the paper's "stale motion" fix): the first with JIT-CFG, the second
    with text-only CFG (all it can use: it never saw a dropped image) and with JIT-CFG.

    python bench/claims.py --model tiny --limit 16
    python bench/claims.py --limit 16 --stale-motion runs/drop/model.safetensors runs/nodrop/model.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stiv_core.bundle import load_defaults, load_pipeline, resolve_model_path  # noqa: E402
from stiv_core.evaluate import BenchConfig, PipelineModel, ground_truth, heldout_prompts, run_bench  # noqa: E402
from stiv_core.metrics import psnr  # noqa: E402
from stiv_core.pipeline import FrameCondition  # noqa: E402
from stiv_core.sampling import GuidanceConfig, SamplerConfig  # noqa: E402


def frame0_fidelity(model: PipelineModel, prompts: list[str], config: BenchConfig) -> tuple[float, float]:
    """Mean frame-0 PSNR (dB) against the ground-truth first frame: with it given, and without."""
    given, free = [], []
    for i, caption in enumerate(prompts):
        truth = ground_truth(caption, config.num_frames, config, config.seed + i)
        condition = FrameCondition(truth[None, :, :1], (0,))
        with_image = model.generate(caption, num_frames=config.num_frames, seed=config.seed + i, condition=condition)
        without = model.generate(caption, num_frames=config.num_frames, seed=config.seed + i)
        given.append(psnr(with_image[:, 0], truth[:, 0]))
        free.append(psnr(without[:, 0], truth[:, 0]))
    return mean(given), mean(free)


STALE = 0.2  # px/frame: a TI2V video whose object drifts less than this counts as frozen


def stale_motion(models: dict[str, tuple[str, GuidanceConfig]], prompts: list[str], steps: int) -> list[str]:
    """Claim (b): TI2V direction, motion and frozen rate per (model, guidance), as table rows."""
    rows = []
    for name, (path, guidance) in models.items():
        d = load_defaults(path)
        config = BenchConfig(d.num_frames, d.height, d.width, tasks=("ti2v",))
        model = PipelineModel(load_pipeline(path), config, SamplerConfig(steps=steps, shift=d.shift, guidance=guidance))
        per_prompt = [run_bench(model, [caption], dataclasses.replace(config, seed=config.seed + i))["ti2v"]
                      for i, caption in enumerate(prompts)]
        frozen = mean(float(r["net_motion"] < STALE) for r in per_prompt)
        rows.append(f"| {name} | {mean(r['direction_acc'] for r in per_prompt):.2f} | "
                    f"{mean(r['net_motion'] for r in per_prompt):.2f} | {mean(r['motion'] for r in per_prompt):.2f} | "
                    f"{frozen:.2f} | {mean(r['frame0_psnr'] for r in per_prompt):.1f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--stale-motion", nargs=2, metavar=("WITH_DROPOUT", "WITHOUT_DROPOUT"),
                   help="measure claim (b) on these two models instead of (a) and (c)")
    args = p.parse_args()
    prompts = heldout_prompts()[: args.limit]
    if args.stale_motion:
        drop, nodrop = (str(resolve_model_path(m)) for m in args.stale_motion)
        jit, text = GuidanceConfig("jit", scale=7.5), GuidanceConfig("cfg", scale=7.5)
        rows = stale_motion({"image dropout, JIT-CFG s=7.5": (drop, jit),
                             "no image dropout, text CFG s=7.5": (nodrop, text),
                             "no image dropout, JIT-CFG s=7.5": (nodrop, jit)}, prompts, args.steps)
        print(f"(b) TI2V over {len(prompts)} held-out prompts (frozen: net motion < {STALE} px/frame; ground truth "
              f"moves 0.8-1.4 px/frame)\n")
        print("| model, guidance | TI2V direction | net motion px/frame | motion px/frame | frozen | frame-0 PSNR |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(rows))
        print(f"\nCommand: `python bench/claims.py --limit {args.limit} --steps {args.steps} --stale-motion "
              f"{' '.join(args.stale_motion)}`; {machine()}")
        return
    path = resolve_model_path(args.model)
    d = load_defaults(path)
    pipe = load_pipeline(path)
    config = BenchConfig(d.num_frames, d.height, d.width, tasks=("t2v", "ti2v"))
    guided = {name: PipelineModel(pipe, config, SamplerConfig(steps=args.steps, shift=d.shift, guidance=guidance))
              for name, guidance in (("JIT-CFG s=7.5 (2 passes)", GuidanceConfig("jit", scale=7.5)),
                                     ("SIT-CFG sT=7.5 sI=1.5 (3 passes)",
                                      GuidanceConfig("sit", scale=7.5, image_scale=1.5)))}
    given, free = frame0_fidelity(next(iter(guided.values())), prompts, config)   # also the warm-up
    seconds = side_by_side_seconds(guided, prompts, config)
    rows = []
    for name, model in guided.items():
        r = run_bench(model, prompts, config)
        rows.append(f"| {name} | {r['t2v']['color_acc']:.2f} | {r['t2v']['shape_acc']:.2f} | "
                    f"{r['t2v']['direction_acc']:.2f} | {r['t2v']['background_acc']:.2f} | "
                    f"{r['ti2v']['direction_acc']:.2f} | {r['t2v']['motion']:.2f} | {seconds[name]:.2f} |")
    print(f"(a) frame 0, PSNR against the given image over {len(prompts)} held-out prompts: TI2V (frame "
          f"replacement) {given:.1f} dB; T2V, no image condition, same seed {free:.1f} dB")
    print("\n| guidance | T2V colour | T2V shape | T2V direction | T2V background | TI2V direction | motion px/frame | s/video |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(f"\nCommand: `python bench/claims.py --model {args.model} --limit {args.limit} --steps {args.steps}`; "
          f"{machine()}")


def side_by_side_seconds(models: dict[str, PipelineModel], prompts: list[str], config: BenchConfig) -> dict[str, float]:
    """Median seconds per T2V video of each model, their runs interleaved prompt by prompt (a load change
    on the machine hits both alike)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for i, caption in enumerate(prompts):
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(caption, num_frames=config.num_frames, seed=i)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, {datetime.date.today()}")


if __name__ == "__main__":
    main()
