"""Bit-identity record of the built-in model's outputs: every task, guidance mode and stepper, plus one
training loss, hashed, so a refactor can show that it changed no video.

    python bench/identity.py --out before.json          # record
    python bench/identity.py --check before.json        # compare (exit 1 on any difference)

The hashes hold for one machine and torch build (float rounding differs across CPUs); compare runs made
on the same machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stiv_core.bundle import load_pipeline, resolve_model_path  # noqa: E402
from stiv_core.pipeline import (FrameCondition, GenerationRequest, long_video_latents,  # noqa: E402
                                temporal_upsample_latents)
from stiv_core.sampling import GuidanceConfig, SamplerConfig, Stepper  # noqa: E402

PROMPT = "a red circle moving left on a blue background"


def digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def records(steps: int) -> dict[str, str]:
    pipe = load_pipeline(resolve_model_path("tiny"))
    base = GenerationRequest(PROMPT, 16, 32, 32, seed=3, sampler=SamplerConfig(steps=steps))
    out: dict[str, str] = {}
    t2v = pipe.sample_latents(base)
    out["t2v_jit"] = digest(t2v)
    frames = pipe.decode(t2v)
    out["decode"] = digest(frames)
    variants = {
        "t2v_sit": GuidanceConfig("sit", scale=7.5, image_scale=1.5),
        "t2v_cfg_renorm": GuidanceConfig("cfg", scale=4.0, renormalize=True),
        "t2v_none": GuidanceConfig("none"),
    }
    for name, guidance in variants.items():
        out[name] = digest(pipe.sample_latents(replace(base, sampler=replace(base.sampler, guidance=guidance))))
    out["t2v_heun"] = digest(pipe.sample_latents(replace(base, sampler=replace(base.sampler, stepper=Stepper.HEUN))))
    out["t2v_negative"] = digest(pipe.sample_latents(replace(base, negative_prompt="a green square")))
    out["t2v_batch2"] = digest(pipe.sample_latents(replace(base, prompt=[PROMPT, "a yellow triangle moving up on "
                                                                                  "a black background"])))
    conds = {
        "ti2v": FrameCondition(frames[:, :, :1], (0,)),
        "ti2v_sit": FrameCondition(frames[:, :, :1], (0,)),
        "prediction": FrameCondition(frames[:, :, :3], (0, 1, 2)),
        "interpolation": FrameCondition(frames[:, :, [0, 15]], (0, 15)),
        "keyframes": FrameCondition(frames[:, :, [0, 5, 10]], (0, 5, 10)),
    }
    for name, cond in conds.items():
        request = replace(base, condition=cond, seed=5)
        if name.endswith("_sit"):
            request = replace(request, sampler=replace(base.sampler, guidance=GuidanceConfig("sit")))
        out[name] = digest(pipe.sample_latents(request))
    out["long_video"] = digest(long_video_latents(pipe, replace(base, seed=7), keyframes=4, stride=5))
    out["tup"] = digest(temporal_upsample_latents(pipe, replace(base, seed=9), t2v[:, :, :8]))
    out["train_loss"] = training_record(pipe.model)
    return out


def training_record(model: torch.nn.Module) -> str:
    from stiv_core.interfaces import TextEmbedding
    from stiv_core.training.config import RecipeConfig
    from stiv_core.training.recipe import TrainBatch, training_loss

    g = torch.Generator().manual_seed(11)
    latents = torch.randn(4, 3, 8, 32, 32, generator=g)
    text = TextEmbedding(torch.randn(4, 16, 128, generator=g), torch.ones(4, 16, dtype=torch.bool),
                         torch.randn(4, 128, generator=g))
    micro = torch.tensor([[32.0, 32, 0, 0, 1, 8]]).expand(4, -1)
    recipe = RecipeConfig(task_ti2v=1, task_prediction=1, task_interpolation=1, task_keyframes=1)
    parts = []
    for step in range(3):
        loss, cond = training_loss(model, TrainBatch(latents, text, micro), recipe, step=step,
                                   generator=g)
        parts.append(f"{loss.item():.10e}:{cond.given.int().tolist()}:{[t.value for t in cond.tasks]}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out"), p.add_argument("--check"), p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(1)
    got = records(args.steps)
    if args.out:
        Path(args.out).write_text(json.dumps(got, indent=1))
    if args.check:
        want = json.loads(Path(args.check).read_text())
        bad = [k for k in want if want[k] != got.get(k)]
        print("identical" if not bad else f"DIFFERENT: {bad}")
        return 1 if bad else 0
    print(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
