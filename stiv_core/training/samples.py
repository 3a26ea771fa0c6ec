"""Sample videos during training, through the same `generate()` that users call, from the EMA model.

Each prompt gives an `.mp4` (H.264, what browsers and TensorBoard-less users play) and a PNG film strip
(every frame side by side: one glance shows what the model has learnt).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..interfaces import TextEncoder, VideoVAE
from ..model.transformer import STIVTransformer
from ..pipeline import GenerationRequest, STIVPipeline, generate
from ..sampling import GuidanceConfig, SamplerConfig
from ..video_io import write_video
from .config import TrainConfig

log = logging.getLogger(__name__)


def write_samples(model: STIVTransformer, text_encoder: TextEncoder, vae: VideoVAE, config: TrainConfig,
                  step: int) -> list[Path]:
    """Per prompt, `step_NNNNNNNN_i.mp4` and a PNG film strip beside it in `output_dir/samples/`."""
    frames, height, width = config.data.buckets[0]
    pipeline = STIVPipeline(model.eval(), text_encoder, vae)
    out_dir = config.output_path / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prompt in enumerate(config.sample_prompts):
        # buckets are in pixels, which is what a request takes
        request = GenerationRequest(prompt, frames, height, width, seed=config.seed + i,
                                    sampler=SamplerConfig(steps=config.sample_steps,
                                                          guidance=GuidanceConfig(scale=config.sample_scale)))
        pixels = generate(pipeline, request)[0]  # (3, T, H, W) in [-1, 1]
        name = f"step_{step:08d}_{i}"
        paths.append(write_video(out_dir / f"{name}.mp4", pixels, upscale=max(1, 256 // max(height, width))))
        save_strip(pixels, out_dir / f"{name}.png")
    log.info("wrote %d sample videos for step %d", len(paths), step)
    return paths


def save_strip(pixels: torch.Tensor, path: Path) -> Path:
    """`(3, T, H, W)` in [-1, 1] -> one `H x (T*W)` PNG."""
    strip = pixels.permute(2, 1, 3, 0).flatten(1, 2)  # (H, T*W, 3)
    array = ((strip.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path
