"""Where does a built-in model take the shape from: the noisy input or the text? A one-step probe.

A held-out ground-truth clip is noised to flow time t (t = 0 noise, 1 data) and the model's clean
estimate is read with shapes-bench's detector, once with the true caption and once with the shape
word changed (circle -> square -> triangle -> circle). Per t it prints how often the estimate shows
the clip's true shape, and how often it shows the changed caption's shape instead. A model that has
learnt shape from text follows the caption at high noise (small t), where the input cannot show it;
one that has not keeps the input's shape, or a round blob, whatever the caption says. Colour, the
same way: the object's colour word changed to another colour (never the background's).

    python bench/text_probe.py --model tiny --limit 24
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stiv_core import flow  # noqa: E402
from stiv_core.bundle import load_pipeline  # noqa: E402
from stiv_core.conditioning import MicroConditions  # noqa: E402
from stiv_core.config import Prediction  # noqa: E402
from stiv_core.data.shapes import COLORS, SHAPES, parse_caption  # noqa: E402
from stiv_core.evaluate import BenchConfig, ground_truth, heldout_prompts, majority, track  # noqa: E402
from stiv_core.pipeline import STIVPipeline  # noqa: E402

TIMES = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8)


def changed(caption: str, attribute: str) -> tuple[str, str]:
    """The caption with its shape (or object colour) word changed, and the new word."""
    want = parse_caption(caption)
    if attribute == "shape":
        new = SHAPES[(SHAPES.index(want.shape) + 1) % len(SHAPES)]
        return caption.replace(f" {want.shape} ", f" {new} "), new
    names = list(COLORS)
    i = names.index(want.color)
    new = next(c for c in names[i + 1:] + names[:i] if c != want.background)
    return caption.replace(f"a {want.color} ", f"a {new} ", 1), new


@torch.inference_mode()
def clean_estimate(pipe: STIVPipeline, clip: torch.Tensor, caption: str, t: float, seed: int) -> torch.Tensor:
    """The model's clean clip `(3, T, H, W)` from the clip noised to time t, in one forward pass."""
    x1 = pipe.vae.encode(clip[None])
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    x_t = flow.interpolate(x1, noise, t)
    text = pipe.encode_text([caption])
    _, _, frames, height, width = clip[None].shape
    micro = MicroConditions(height, width, frames).tensor(1)
    t_in = torch.tensor([t])
    out = pipe.model(x_t, t_in, text, micro).float()
    if pipe.model.config.prediction is not Prediction.DATA:
        out = flow.data_from_velocity(out, x_t, t_in)
    return pipe.vae.decode(out)[0].clamp(-1, 1)


def probe(pipe: STIVPipeline, prompts: list[str], attribute: str, config: BenchConfig) -> dict[float, Counter]:
    """Per t: counts of 'true' (estimate shows the clip's value, true caption), 'kept' (the clip's value
    under the changed caption) and 'follows' (the changed caption's value)."""
    read = (lambda dets: majority([d.shape for d in dets])) if attribute == "shape" else \
        (lambda dets: majority([d.color for d in dets]))
    counts: dict[float, Counter] = {t: Counter() for t in TIMES}
    for i, caption in enumerate(prompts):
        clip = ground_truth(caption, config.num_frames, config, i)
        truth = getattr(parse_caption(caption), "shape" if attribute == "shape" else "color")
        other, new = changed(caption, attribute)
        for t in TIMES:
            counts[t]["true"] += read(track(clean_estimate(pipe, clip, caption, t, i))) == truth
            got = read(track(clean_estimate(pipe, clip, other, t, i)))
            counts[t]["kept"] += got == truth
            counts[t]["follows"] += got == new
    return counts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--limit", type=int, default=24)
    args = p.parse_args()
    pipe = load_pipeline(args.model)
    prompts = heldout_prompts()[: args.limit]
    config = BenchConfig()
    print(f"{args.model}, {len(prompts)} held-out prompts; one forward pass from the true clip noised to t")
    print("\n| attribute | t | true caption: shows the clip's | changed caption: keeps the clip's | "
          "changed caption: follows the caption |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for attribute in ("shape", "colour"):
        for t, c in probe(pipe, prompts, "shape" if attribute == "shape" else "color", config).items():
            n = len(prompts)
            print(f"| {attribute} | {t:.1f} | {c['true'] / n:.2f} | {c['kept'] / n:.2f} | {c['follows'] / n:.2f} |")
    print(f"\nCommand: `python bench/text_probe.py --model {args.model} --limit {args.limit}`; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}")


if __name__ == "__main__":
    main()
