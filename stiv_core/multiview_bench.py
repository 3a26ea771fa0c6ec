"""The multi-view evaluator (beside shapes-bench): novel views of held-out objects against their true renders.

For each held-out (solid, colours, background) of `data/objects.py` and seed, the input view of the true
clip is given (the TI2V plan, frame 0) and the model makes the other views. Per novel view: PSNR and SSIM
against the true render, and whether the view is right: the same visible colours (object pixels split by
their chroma into the domain's colours, each kept at >= MIN_COLOR_SHARE of the object) and the same
silhouette (IoU >= MIN_IOU). `input_psnr` checks that the given view is kept exactly. The baseline
"repeat the input view" is scored the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import mean
from typing import Callable, Optional, Sequence

import torch

from .data.objects import (NUM_VIEWS, OBJECT_COLORS, ObjectParams, all_combinations, held_out, parse_caption,
                           random_params, render)
from .data.shapes import BACKGROUNDS, COLORS
from .metrics import psnr, ssim

OBJECT_THRESHOLD = 0.12   # RGB distance (0..1) from the background that counts as object
MIN_COLOR_SHARE = 0.15    # a colour is visible when it covers this share of the object's pixels
MIN_IOU = 0.7

# view `(3, T, H, W)` in [-1, 1] of a caption, given its input view `(3, H, W)`, for a seed
MultiviewModel = Callable[[str, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class MultiviewConfig:
    height: int = 32
    width: int = 32
    seed: int = 0
    seeds: int = 1   # clips per object


def heldout_objects() -> list[tuple[str, str, str, str]]:
    return [c for c in all_combinations() if held_out(c)]


def truth(combination: tuple[str, str, str, str], config: MultiviewConfig, seed: int) -> tuple[ObjectParams, torch.Tensor]:
    params = random_params(torch.Generator().manual_seed(seed), combination)
    return params, render(params, config.height, config.width)


def object_mask(view: torch.Tensor, background: str) -> torch.Tensor:
    """`(H, W)` bool: pixels farther than OBJECT_THRESHOLD from the background colour."""
    rgb = (view.float() + 1) / 2
    bg = torch.tensor(BACKGROUNDS[background])[:, None, None]
    return (rgb - bg).norm(dim=0) > OBJECT_THRESHOLD


def visible_colors(view: torch.Tensor, mask: torch.Tensor) -> frozenset[str]:
    """The domain colours covering >= MIN_COLOR_SHARE of the object pixels, each pixel by its chroma (its RGB
    over its largest channel, so Lambert shading does not change it)."""
    if not mask.any():
        return frozenset()
    rgb = ((view.float() + 1) / 2)[:, mask].T                      # (N, 3)
    chroma = rgb / rgb.amax(dim=1, keepdim=True).clamp_min(1e-3)
    palette = torch.tensor([COLORS[c] for c in OBJECT_COLORS])
    palette = palette / palette.amax(dim=1, keepdim=True)
    nearest = torch.cdist(chroma, palette).argmin(dim=1)
    share = torch.bincount(nearest, minlength=len(OBJECT_COLORS)).float() / len(nearest)
    return frozenset(c for c, s in zip(OBJECT_COLORS, share.tolist()) if s >= MIN_COLOR_SHARE)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def view_correct(made: torch.Tensor, true: torch.Tensor, background: str) -> bool:
    made_mask, true_mask = object_mask(made, background), object_mask(true, background)
    return visible_colors(made, made_mask) == visible_colors(true, true_mask) and iou(made_mask, true_mask) >= MIN_IOU


def score_clip(made: torch.Tensor, true: torch.Tensor, background: str) -> dict[str, float]:
    """Metrics of one made clip `(3, T, H, W)` against the true one (the novel views are frames 1..T-1)."""
    if made.shape != true.shape:
        raise ValueError(f"the model made {tuple(made.shape)}, the true clip is {tuple(true.shape)}")
    views = range(1, true.shape[1])
    return {"psnr": mean(psnr(made[:, v], true[:, v]) for v in views),
            "ssim": mean(ssim(made[:, v], true[:, v]) for v in views),
            "view_acc": mean(float(view_correct(made[:, v], true[:, v], background)) for v in views),
            "input_psnr": psnr(made[:, 0], true[:, 0])}


def repeat_input(caption: str, input_view: torch.Tensor, seed: int) -> torch.Tensor:
    """The trivial baseline: every view is the input view."""
    return input_view[:, None].expand(-1, NUM_VIEWS, -1, -1).clone()


def run_multiview(model: MultiviewModel, config: MultiviewConfig = MultiviewConfig(), *,
                  objects: Optional[Sequence[tuple[str, str, str, str]]] = None,
                  rows: Optional[list[dict]] = None) -> dict[str, dict[str, float]]:
    """`multiview` (the model) and `multiview_baseline` (repeat the input view): metric means over the
    held-out objects (or `objects`) x `config.seeds` clips; each clip's metrics appended to `rows`."""
    objects = list(objects if objects is not None else heldout_objects())
    results = {}
    for name, make in (("multiview", model), ("multiview_baseline", repeat_input)):
        scored = []
        for k in range(config.seeds):
            for i, combination in enumerate(objects):
                seed = config.seed + i + k * len(objects)
                params, clip = truth(combination, config, seed)
                made = make(params.caption, clip[:, 0], seed)
                scored.append({"task": name, "caption": params.caption, "seed": seed,
                               **score_clip(made, clip, params.background)})
        if rows is not None:
            rows.extend(scored)
        results[name] = {key: mean(r[key] for r in scored) for key in ("psnr", "ssim", "view_acc", "input_psnr")}
    return results


def pipeline_model(pipeline, sampler, config: MultiviewConfig) -> MultiviewModel:
    """A STIVPipeline as a multi-view model: the input view given as frame 0 (TI2V), NUM_VIEWS frames."""
    from .pipeline import FrameCondition, GenerationRequest, generate

    def make(caption: str, input_view: torch.Tensor, seed: int) -> torch.Tensor:
        request = GenerationRequest(caption, NUM_VIEWS, config.height, config.width, seed=seed, sampler=sampler,
                                    condition=FrameCondition(input_view[None, :, None], (0,)))
        return generate(pipeline, request)[0]
    return make


def true_views(config: MultiviewConfig) -> MultiviewModel:
    """The self-check model: the true render of the captioned object (it must score ~100%)."""

    def make(caption: str, input_view: torch.Tensor, seed: int) -> torch.Tensor:
        return truth(parse_caption(caption).combination, config, seed)[1]
    return make
