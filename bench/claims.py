"""The paper's claims at the built-in model's scale, measured with shapes-bench.

(a) frame replacement keeps frame 0: TI2V frame-0 PSNR against the given image, next to the frame-0
    PSNR of a T2V video of the same prompt and seed (no image condition) against the same image;
(c) JIT-CFG (2 passes) against SIT-CFG (3 passes): T2V / TI2V accuracies and seconds per video.
(b) needs a second model trained without image-condition dropout; not run here.

    python bench/claims.py --model tiny --limit 16
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stiv_core.bundle import load_defaults, load_pipeline, resolve_model_path  # noqa: E402
from stiv_core.evaluate import (BenchConfig, PipelineModel, ground_truth, heldout_prompts, psnr,  # noqa: E402
                                run_bench)
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args()
    path = resolve_model_path(args.model)
    d = load_defaults(path)
    pipe = load_pipeline(path)
    prompts = heldout_prompts()[: args.limit]
    config = BenchConfig(d.num_frames, d.height, d.width, tasks=("t2v", "ti2v"))
    jit = PipelineModel(pipe, config, SamplerConfig(steps=args.steps, guidance=GuidanceConfig("jit", scale=7.5)))
    given, free = frame0_fidelity(jit, prompts, config)
    rows = []
    for name, guidance in (("JIT-CFG s=7.5 (2 passes)", GuidanceConfig("jit", scale=7.5)),
                           ("SIT-CFG sT=7.5 sI=1.5 (3 passes)", GuidanceConfig("sit", scale=7.5, image_scale=1.5))):
        r = run_bench(PipelineModel(pipe, config, SamplerConfig(steps=args.steps, guidance=guidance)), prompts, config)
        rows.append(f"| {name} | {r['t2v']['color_acc']:.2f} | {r['t2v']['shape_acc']:.2f} | "
                    f"{r['t2v']['direction_acc']:.2f} | {r['t2v']['background_acc']:.2f} | "
                    f"{r['ti2v']['direction_acc']:.2f} | {r['t2v']['motion']:.2f} | {r['seconds_per_video']:.2f} |")
    print(f"(a) frame 0, PSNR against the given image over {len(prompts)} held-out prompts: TI2V (frame "
          f"replacement) {given:.1f} dB; T2V, no image condition, same seed {free:.1f} dB")
    print("\n| guidance | T2V colour | T2V shape | T2V direction | T2V background | TI2V direction | motion px/frame | s/video |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(f"\nCommand: `python bench/claims.py --model {args.model} --limit {args.limit} --steps {args.steps}`; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {datetime.date.today()}")


if __name__ == "__main__":
    main()
