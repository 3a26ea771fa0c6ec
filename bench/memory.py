"""Low-VRAM benchmark: time per forward (one sampling step, batched JIT-CFG) and peak memory for
resident vs half swapped vs all swapped blocks, for each quantization.

Rows run interleaved in one process (resident, half, all, resident, ...), so load from other
processes hits every row alike; medians are reported with the planner's estimate beside them.
Random weights (speed and memory do not depend on their values). On the CPU ("device = CPU") the
swapped rows run the block swapper as the CLI and nodes do there: its full ring/hook machinery with
slots pointing at the CPU masters (no copies), so their overhead column is what the machinery costs;
the extra "+ copies" rows add the synchronous memcpy of every streamed block (what tests exercise, and
what a CPU cannot overlap with compute). On CUDA the peak is `torch.cuda.max_memory_allocated` above
what was allocated before the row's weights were loaded; the other rows are offloaded meanwhile
(`MemoryHandle.offload`), so each peak is its own.

    python bench/memory.py                                   # CPU rows (a small config)
    python bench/memory.py --device cuda --preset XL --size 256 --frames 20
    python bench/memory.py --device cuda --preset M --size 512 --frames 20 --quant nf4 fp8-scaled
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stiv_core.config import STIVConfig, preset  # noqa: E402
from stiv_core.interfaces import TextEmbedding  # noqa: E402
from stiv_core.memory.options import MemoryOptions, apply_memory_options  # noqa: E402
from stiv_core.memory.planner import GiB, MiB, Budget, RunShape, plan_memory  # noqa: E402
from stiv_core.memory.quant import QuantMode  # noqa: E402
from stiv_core.memory.swap import BlockSwapper  # noqa: E402
from stiv_core.model.transformer import STIVTransformer  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, help="tiny/XL/XXL/M (default: a small CPU config)")
    ap.add_argument("--size", type=int, default=128, help="pixels (latent = size / 8)")
    ap.add_argument("--frames", type=int, default=8, help="latent frames")
    ap.add_argument("--quant", nargs="+", default=["none"], choices=[m.value for m in QuantMode])
    ap.add_argument("--repeats", type=int, default=5)
    return ap.parse_args()


def small_cpu_config() -> STIVConfig:
    # Wide enough that a block's compute, not Python, dominates: the regime swap is for.
    return STIVConfig(name="bench-cpu", depth=8, hidden_size=512, num_heads=8, text_dim=256,
                      pooled_text_dim=256, max_text_tokens=32)


def build(config: STIVConfig, dtype: torch.dtype) -> STIVTransformer:
    with torch.device("meta"):
        model = STIVTransformer(config)
    model = model.to_empty(device="cpu").to(dtype).eval().requires_grad_(False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def inputs_for(config: STIVConfig, shape: RunShape, device: str, dtype: torch.dtype) -> dict:
    b = shape.passes * shape.batch  # all guidance passes in one batched forward, as the sampler runs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, config.latent_channels, shape.frames, shape.height, shape.width, generator=g)
    cpu = dict(x=x, t=torch.rand(b, generator=g), micro=torch.randn(b, 6))
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in cpu.items()}
    text = TextEmbedding(torch.randn(b, config.max_text_tokens, config.text_dim),
                         torch.ones(b, config.max_text_tokens, dtype=torch.bool), torch.randn(b, config.pooled_text_dim))
    return {**inputs, "text": text.to(device=device, dtype=dtype)}


def timed(model, inputs, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(**inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available on this machine; GPU rows need a GPU")
    config = preset(args.preset) if args.preset else small_cpu_config()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = RunShape(args.frames, args.size // 8, args.size // 8)
    inputs = inputs_for(config, shape, args.device, dtype)
    base = build(config, dtype)
    blocks = len(base.all_blocks())
    swaps = {"resident": 0, "half swapped": blocks // 2, "all swapped": blocks}
    copied = {}  # CPU only: the same swap with a real memcpy into the ring per streamed block
    if args.device == "cpu":
        copied = {"half swapped + copies": blocks // 2, "all swapped + copies": blocks}
    rows = []
    for quant in args.quant:
        handles = {}
        for label, n in swaps.items():
            opts = MemoryOptions(QuantMode(quant), block_swap=n, device=args.device)
            handles[label] = apply_memory_options(copy.deepcopy(base), opts)
        for label, n in copied.items():
            handle = apply_memory_options(copy.deepcopy(base), MemoryOptions(QuantMode(quant), device="cpu"))
            BlockSwapper(handle.model, n, device="cpu", cpu_copies=True).attach()
            handles[label] = handle
        rows_of = {**swaps, **copied}
        times = {label: [] for label in rows_of}
        peaks = {label: 0 for label in rows_of}
        for handle in handles.values():   # one row's weights on the GPU at a time (its peak is its own)
            handle.offload()
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for label, handle in handles.items():
                before = torch.cuda.memory_allocated() if args.device == "cuda" else 0   # inputs, not weights
                handle.load()
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times[label].append(timed(handle.model, inputs, args.device))
                if args.device == "cuda":
                    peaks[label] = max(peaks[label], torch.cuda.max_memory_allocated() - before)
                handle.offload()
        for label, n in rows_of.items():
            est = plan_memory(config, shape, Budget.unbounded(args.device), quant=handles[label].quant,
                              dtype=dtype, blocks_to_swap=n)
            median = statistics.median(times[label][1:])
            rows.append((quant, label, n, median, est.peak_bytes, peaks[label], est.swap_bytes_per_step))
        del handles
    report(args, config, shape, rows)


def report(args, config: STIVConfig, shape: RunShape, rows: list) -> None:
    print(f"# bench/memory.py {' '.join(sys.argv[1:])}")
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__} threads {torch.get_num_threads()} device {args.device}")
    print(f"# {config.name}: depth {config.depth}, width {config.hidden_size}; latents {shape.frames}x"
          f"{shape.height}x{shape.width}, JIT-CFG batched ({shape.passes} passes); median of {args.repeats}")
    print("| quant | blocks | swapped | s/forward | vs resident | planned peak | measured peak | swap/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    resident = {q: t for q, label, _, t, *_ in rows if label == "resident"}
    for quant, label, n, t, est, peak, traffic in rows:
        measured = f"{peak / GiB:.2f} GiB" if peak else "n/a (CPU)"
        print(f"| {quant} | {label} | {n} | {t:.3f} | {t / resident[quant]:.3f}x | {est / MiB:.0f} MiB | "
              f"{measured} | {traffic / MiB:.0f} MiB |")


if __name__ == "__main__":
    main()
