"""Forward-pass benchmark: our STIVTransformer against diffusers' LatteTransformer3DModel on the CPU.

Both models run in one process, float32, under `torch.inference_mode`, timed interleaved (ours,
matmul, Latte, then Latte, matmul, ours, ...; the matmul is a plain square float32 product that gives
this machine's matmul rate under the same conditions) so that load from other processes hits all three
alike; medians of wall time and of process CPU time are reported. FLOPs are counted analytically: `2*m*n*k` for every linear, the patch
embedding and the two attention matmuls (q k^T and p v); norms, activations, RoPE, softmax and copies
are not counted, so "achieved FLOP/s" is matmul work per second of the whole forward.

What is compared, at the same width, heads, token grid and text length:
- ours: `--depth` STIV blocks (spatial self-attn, cross-attn, temporal self-attn, one FFN each),
  temporal_patch 1 so that the token count equals Latte's (which has no temporal patching);
- Latte: `--depth` spatial+temporal block PAIRS (Latte's `num_layers`); the spatial block has
  self-attn, cross-attn and an FFN, the temporal block self-attn and its own FFN, so a Latte layer
  does two FFNs where a STIV block does one, and Latte projects the text keys/values once per frame.
  Latte therefore does more work per layer; "time per FLOP" compares the two at equal work.

    python bench/forward.py                       # the default configuration, all cores
    python bench/forward.py --threads 1           # steadiest on a shared machine (CPU time ~ wall)
    python bench/forward.py --profile             # also: where our forward spends its time
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stiv_core.config import MICRO_CONDITIONS  # noqa: E402
from stiv_core.config import STIVConfig  # noqa: E402
from stiv_core.model import STIVTransformer  # noqa: E402

LATENT_CHANNELS, PATCH, FREQ_DIM = 4, 2, 256
LOAD_BEFORE = " ".join(f"{v:.1f}" for v in os.getloadavg())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512, help="hidden size of both models")
    p.add_argument("--depth", type=int, default=6, help="STIV blocks = Latte spatial+temporal pairs")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--frames", type=int, default=16, help="latent frames")
    p.add_argument("--size", type=int, default=32, help="latent height = width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--text-dim", type=int, default=4096, help="text-encoder width (T5-XXL: 4096)")
    p.add_argument("--repeats", type=int, default=7, help="timed forwards per model (after one warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul rate probe")
    p.add_argument("--profile", action="store_true", help="also profile our forward (by module and by op)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ models
def build_ours(a: argparse.Namespace) -> STIVTransformer:
    config = STIVConfig(name="bench", depth=a.depth, hidden_size=a.width, num_heads=a.heads,
                        latent_channels=LATENT_CHANNELS, patch_size=PATCH, temporal_patch=1,
                        text_dim=a.text_dim, pooled_text_dim=a.text_dim, max_text_tokens=a.text_tokens)
    return STIVTransformer(config).eval()


def build_latte(a: argparse.Namespace):
    from diffusers import LatteTransformer3DModel

    # The PixArt-style text-to-video Latte: adaLN-single, tanh-GELU FFNs, biased q/k/v, non-affine
    # norms; out_channels equals in_channels (no learned sigma) so both models produce the same output.
    return LatteTransformer3DModel(
        num_attention_heads=a.heads, attention_head_dim=a.width // a.heads, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=a.depth, cross_attention_dim=a.width, attention_bias=True,
        sample_size=a.size, patch_size=PATCH, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=a.text_dim, video_length=a.frames,
    ).eval()


def make_inputs(a: argparse.Namespace):
    g = torch.Generator().manual_seed(0)
    b = a.batch
    x = torch.randn(b, LATENT_CHANNELS, a.frames, a.size, a.size, generator=g)
    text = torch.randn(b, a.text_tokens, a.text_dim, generator=g)
    mask = torch.ones(b, a.text_tokens, dtype=torch.bool)
    ours = dict(x=x, t=torch.full((b,), 0.5), text=text, text_mask=mask,
                pooled_text=torch.randn(b, a.text_dim, generator=g),
                micro=torch.zeros(b, len(MICRO_CONDITIONS)))
    # Latte's forward passes the text mask to its blocks as an additive bias `(B*T, 1, L)` (0 = keep,
    # -10000 = drop), one row per frame, as diffusers' Transformer2DModel would have built it.
    latte_bias = ((1.0 - mask.float()) * -10000.0)[:, None].repeat_interleave(a.frames, dim=0)
    latte = dict(hidden_states=x, timestep=torch.full((b,), 500, dtype=torch.long),
                 encoder_hidden_states=text, encoder_attention_mask=latte_bias,
                 return_dict=False)
    return ours, latte


# ------------------------------------------------------------------------------------------- FLOPs
def linear(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def attn(batch: int, nq: int, nk: int, dim: int) -> int:
    """q k^T and p v over all heads: 2 * (2 * nq * nk * head_dim) * heads per batch element."""
    return 2 * linear(batch * nq, dim, nk)


def flops_ours(a: argparse.Namespace) -> dict[str, int]:
    b, d, t, s, l = a.batch, a.width, a.frames, (a.size // PATCH) ** 2, a.text_tokens
    n, f = b * t * s, 4 * d
    embed = (linear(n, LATENT_CHANNELS * PATCH * PATCH, d) + linear(b * l, a.text_dim, d) + linear(b * l, d, d)
             + (1 + len(MICRO_CONDITIONS)) * (linear(b, FREQ_DIM, d) + linear(b, d, d))
             + linear(b, a.text_dim, d) + linear(b, d, d) + linear(b, d, 6 * d))
    block_linear = (linear(n, d, 3 * d) + linear(n, d, d)                          # spatial
                    + linear(n, d, d) + linear(b * l, d, 2 * d) + linear(n, d, d)  # cross
                    + linear(n, d, 3 * d) + linear(n, d, d)                        # temporal
                    + linear(n, d, f) + linear(n, f, d))                           # FFN
    block_attn = attn(b * t, s, s, d) + attn(b, t * s, l, d) + attn(b * s, t, t, d)
    final = linear(n, d, PATCH * PATCH * LATENT_CHANNELS)
    return dict(linear=embed + final + a.depth * block_linear, attention=a.depth * block_attn)


def flops_latte(a: argparse.Namespace) -> dict[str, int]:
    b, d, t, s, l = a.batch, a.width, a.frames, (a.size // PATCH) ** 2, a.text_tokens
    n, f = b * t * s, 4 * d
    embed = (linear(n, LATENT_CHANNELS * PATCH * PATCH, d) + linear(b * l, a.text_dim, d) + linear(b * l, d, d)
             + linear(b, FREQ_DIM, d) + linear(b, d, d) + linear(b, d, 6 * d))
    ffn = linear(n, d, f) + linear(n, f, d)
    spatial = (4 * linear(n, d, d)                                         # q, k, v, out
               + 2 * linear(n, d, d) + 2 * linear(b * t * l, d, d)         # cross q, out; k, v per frame
               + ffn)
    temporal = 4 * linear(n, d, d) + ffn
    pair_attn = attn(b * t, s, s, d) + attn(b * t, s, l, d) + attn(b * s, t, t, d)
    final = linear(n, d, PATCH * PATCH * LATENT_CHANNELS)
    return dict(linear=embed + final + a.depth * (spatial + temporal), attention=a.depth * pair_attn)


# ------------------------------------------------------------------------------------------ timing
def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(a: argparse.Namespace, ours, latte, ours_in, latte_in) -> dict[str, dict[str, list[float]]]:
    """Interleaved timings: {"wall" | "cpu": {"ours" | "latte" | "matmul": [seconds per repeat]}}.

    CPU time is reported beside wall time because other processes on a shared machine stretch wall
    time by whatever they take; with one thread CPU time is nearly immune to that (with several,
    OpenMP threads spinning at barriers while a sibling is descheduled still count).
    """
    x = torch.randn(a.matmul_size, a.matmul_size)
    y = torch.randn(a.matmul_size, a.matmul_size)
    runs = {"ours": lambda: ours(**ours_in), "latte": lambda: latte(**latte_in), "matmul": lambda: x @ y}
    for fn in runs.values():  # warm-up: allocator, oneDNN primitive caches
        fn()
    times = {"wall": defaultdict(list), "cpu": defaultdict(list)}
    for r in range(a.repeats):
        order = ["ours", "matmul", "latte"] if r % 2 == 0 else ["latte", "matmul", "ours"]
        for name in order:
            wall, cpu = timed(runs[name])
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
    return times


# ----------------------------------------------------------------------------------------- profile
def profile_by_module(ours, ours_in, runs: int = 5) -> None:
    """Time of each sublayer kind per forward (forward hooks; the CPU runs synchronously).

    The whole forward is hooked too, so the shares come from the same runs; the forward with the
    smallest total of `runs` is reported (the least disturbed by other load on the machine).
    """
    kinds = {ours: "forward"}
    for block in ours.blocks:
        kinds.update({block.spatial_attn: "spatial attention", block.cross_attn: "cross attention",
                      block.temporal_attn: "temporal attention", block.ffn: "FFN", block: "blocks"})
    starts, spent = {}, defaultdict(float)

    def pre(module, _args):
        starts[module] = time.perf_counter()

    def post(module, _args, _out):
        spent[kinds[module]] += time.perf_counter() - starts.pop(module)

    handles = [m.register_forward_pre_hook(pre) for m in kinds] + [m.register_forward_hook(post) for m in kinds]
    samples = []
    for _ in range(runs):
        spent.clear()
        ours(**ours_in)
        samples.append(dict(spent))
    for h in handles:
        h.remove()
    parts = min(samples, key=lambda p: p["forward"])
    total, blocks = parts.pop("forward"), parts.pop("blocks")
    parts["block glue (norms, modulate, residuals, layout copies)"] = blocks - sum(parts.values())
    parts["outside the blocks (embeddings, condition, final layer)"] = total - blocks
    print(f"\n### Where our forward's time goes (forward hooks; fastest of {runs}: {total:.3f} s)\n")
    print("| part | s / forward | share |\n| --- | ---: | ---: |")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.3f} | {v / total:.0%} |")


def profile_by_op(ours, ours_in, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        ours(**ours_in)
    print("\n### Our forward by op and input shape (torch.profiler, one forward, self time)\n")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=70))


# ------------------------------------------------------------------------------------------ report
def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}"


def report(a: argparse.Namespace, times: dict[str, dict[str, list[float]]], argv: list[str]) -> None:
    import diffusers

    fo, fl = flops_ours(a), flops_latte(a)
    fo_total, fl_total = sum(fo.values()), sum(fl.values())
    med = {kind: {k: statistics.median(v) for k, v in runs.items()} for kind, runs in times.items()}
    t_ours, t_latte, t_mm = (med["wall"][k] for k in ("ours", "latte", "matmul"))
    c_ours, c_latte, c_mm = (med["cpu"][k] for k in ("ours", "latte", "matmul"))
    mm_flops = 2 * a.matmul_size ** 3
    peak = mm_flops / t_mm
    rate_o, rate_l = fo_total / t_ours, fl_total / t_latte
    tokens = a.batch * a.frames * (a.size // PATCH) ** 2
    shape = (f"w{a.width} h{a.heads}x{a.width // a.heads} d{a.depth}, B{a.batch} {a.frames}x{a.size}x{a.size} "
             f"latents = {tokens} tokens, text {a.text_tokens}")
    print("| config | threads | ours s | Latte s | time ours/Latte | CPU time ours/Latte | GFLOP ours / Latte "
          "| time per FLOP ours/Latte | ours GFLOP/s (% of matmul) | Latte GFLOP/s (% of matmul) | matmul GFLOP/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {shape} | {a.threads} | {t_ours:.3f} | {t_latte:.3f} | {t_ours / t_latte:.2f} | {c_ours / c_latte:.2f} | "
          f"{fo_total / 1e9:.1f} / {fl_total / 1e9:.1f} | {rate_l / rate_o:.2f} | "
          f"{rate_o / 1e9:.0f} ({rate_o / peak:.0%}) | {rate_l / 1e9:.0f} ({rate_l / peak:.0%}) | {peak / 1e9:.0f} |")
    print()
    print(f"FLOPs: ours {fo['linear'] / 1e9:.1f} G linear + {fo['attention'] / 1e9:.1f} G attention; "
          f"Latte {fl['linear'] / 1e9:.1f} G linear + {fl['attention'] / 1e9:.1f} G attention "
          f"(Latte/ours work = {fl_total / fo_total:.2f}).")
    spread = lambda v: f"{min(v):.3f}-{max(v):.3f}"
    print(f"Wall time over {a.repeats} interleaved repeats (min-max s): ours {spread(times['wall']['ours'])}, "
          f"Latte {spread(times['wall']['latte'])}, matmul {a.matmul_size}^2 {spread(times['wall']['matmul'])}.")
    print(f"By CPU time (medians): ours {c_ours:.3f} s, Latte {c_latte:.3f} s; per CPU-second ours "
          f"{fo_total / c_ours / 1e9:.0f}, Latte {fl_total / c_latte / 1e9:.0f}, matmul {mm_flops / c_mm / 1e9:.0f} "
          f"GFLOP; time per FLOP ours/Latte {(c_ours / fo_total) / (c_latte / fl_total):.2f}.")
    print(f"Command: `python bench/forward.py {' '.join(argv)}`")
    print(f"Machine: {machine()}; diffusers {diffusers.__version__}; load average before the run "
          f"{LOAD_BEFORE}")
    print(f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        ours, latte = build_ours(a), build_latte(a)
        ours_in, latte_in = make_inputs(a)
        out_o, out_l = ours(**ours_in), latte(**latte_in)[0]
        if out_o.shape != out_l.shape:
            raise RuntimeError(f"output shapes differ: ours {tuple(out_o.shape)}, Latte {tuple(out_l.shape)}")
        times = measure(a, ours, latte, ours_in, latte_in)
        report(a, times, argv)
        if a.profile:
            profile_by_module(ours, ours_in)
            profile_by_op(ours, ours_in)


if __name__ == "__main__":
    main()
