"""Training-step time and peak memory: MaskDiT (50% of spatial tokens) vs unmasked, with and without
gradient checkpointing, at the same batch. Each variant runs in its own process so peak memory is its own,
the variants interleaved over `--rounds` rounds so they are timed side by side.

    python bench/train_step.py                                   # CPU, a small model
    python bench/train_step.py --device cuda --preset XL --frames 20 --size 256 --batch 4 --bf16

Prints a Markdown table for BENCHMARKS.md. Peak memory: torch.cuda.max_memory_allocated on CUDA; on
the CPU, the process's peak resident memory minus its resident memory before the first step.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stiv_core.config import preset  # noqa: E402
from stiv_core.encoders.hashed import HashedTextEncoder  # noqa: E402
from stiv_core.model.transformer import STIVTransformer  # noqa: E402
from stiv_core.training.config import RecipeConfig  # noqa: E402
from stiv_core.training.optim import AdaFactor  # noqa: E402
from stiv_core.training.recipe import TrainBatch, training_loss  # noqa: E402

VARIANTS = [("unmasked", False, False), ("masked 50%", True, False),
            ("unmasked + ckpt", False, True), ("masked 50% + ckpt", True, True)]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="latent height = width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="every variant once per round, rounds interleaved")
    p.add_argument("--variant", type=int, default=-1, help=argparse.SUPPRESS)  # child process
    return p.parse_args()


def model_config(args):
    if args.preset == "tiny":
        return preset("tiny", depth=args.depth, hidden_size=args.hidden, num_heads=args.heads,
                      maskdit_extra_blocks=2)
    return preset(args.preset, maskdit_extra_blocks=2)


def run_variant(args) -> dict:
    name, masked, ckpt = VARIANTS[args.variant]
    device = torch.device(args.device)
    config = model_config(args)
    model = STIVTransformer(config).to(device).train()
    model.gradient_checkpointing = ckpt
    optimizer = AdaFactor(model.parameters())
    text = HashedTextEncoder(config.text_dim, config.pooled_text_dim, config.max_text_tokens)
    latents = torch.randn(args.batch, config.latent_channels, args.frames, args.size, args.size)
    batch = TrainBatch(latents.to(device), text.encode(["a red square moving left"] * args.batch).to(device),
                       torch.ones(args.batch, 6, device=device))
    recipe = RecipeConfig(maskdit_ratio=0.5 if masked else 0.0, task_t2v=1, task_ti2v=1)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, _ = training_loss(model, batch, recipe, step=0, generator=gen, config=config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    step_time = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]
    return {"variant": name, "step_s": step_time, "peak_mib": peak}


def main() -> None:
    args = parse()
    if args.variant >= 0:
        print(json.dumps(run_variant(args)))
        return
    runs: list[list[dict]] = [[] for _ in VARIANTS]
    for _ in range(args.rounds):   # A B C D A B C D: a load change on the machine hits every variant
        for i in range(len(VARIANTS)):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", str(i)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[i].append(json.loads(out.strip().splitlines()[-1]))
    rows = [{"variant": r[0]["variant"], "step_s": statistics.median(x["step_s"] for x in r),
             "peak_mib": max(x["peak_mib"] for x in r)} for r in runs]
    config = model_config(args)
    tokens = (args.frames // config.temporal_patch) * (args.size // config.patch_size) ** 2
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"model {args.preset} depth {config.depth}+2 width {config.hidden_size}, batch {args.batch}, "
          f"latents {args.frames}x{args.size}x{args.size} ({tokens} tokens), "
          f"{'bf16' if args.bf16 else 'fp32'}, {device}, {args.steps} timed steps (median), {args.rounds} "
          f"interleaved rounds (median of the rounds)\n")
    print("| variant | step time (s) | speed-up vs unmasked | peak memory (MiB) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        ref = rows[0] if "ckpt" not in row["variant"] else rows[2]
        print(f"| {row['variant']} | {row['step_s']:.3f} | {ref['step_s'] / row['step_s']:.2f}x | "
              f"{row['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
