"""Progressive initialisation (the paper's T2I -> T2V -> STIV, 256 -> 512 px, 20 -> 40 frames).

- `FULL`: a checkpoint of the same architecture (a lower-resolution or fewer-frame stage). Weights
  load as they are; the larger grid is handled by RoPE position interpolation, which is the target
  config's `rope_position_scale` (e.g. 0.5 on H and W for 256 -> 512 px): positions are not weights.
- `T2I`: a text-to-image model (`temporal_patch` 1, trained on 1-frame clips). Spatial weights are
  copied; the patch embedding and the final projection are inflated along time (so a static clip
  gives each frame the image model's output); temporal attention's output projection is zeroed, so
  the video model starts as the image model.
- `SPLIT`: spatial weights from one checkpoint (a T2I model, inflated as above when needed) and the
  temporal attention weights from another (e.g. a T2V model), as the paper combines them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import COMPONENT_PREFIXES, check_keys, check_safetensors, load_config
from ..model.transformer import STIVTransformer, inflate_patch_embed
from .config import InitConfig, InitKind

log = logging.getLogger(__name__)
TEMPORAL = ".temporal_attn."


def initialize(model: STIVTransformer, config: InitConfig) -> None:
    """Apply `config` to a freshly built `model` in place."""
    if config.kind == InitKind.NONE:
        return
    if config.kind == InitKind.FULL:
        state = _read(config.path)
        check_keys(model, {k: tuple(v.shape) for k, v in state.items()}, Path(config.path).name)
        model.load_state_dict(state)
    elif config.kind == InitKind.T2I:
        model.load_state_dict(video_state_from_image(model, _read(config.path), Path(config.path).name))
    elif config.kind == InitKind.SPLIT:
        spatial = _read(config.path)
        image_config = load_config(config.path)
        if image_config.temporal_patch != model.config.temporal_patch:
            spatial = video_state_from_image(model, spatial, Path(config.path).name)
        temporal = {k: v for k, v in _read(config.temporal_path).items() if TEMPORAL in k}
        model.load_state_dict(combine_spatial_temporal(model, spatial, temporal, Path(config.temporal_path).name))
    log.info("initialised from %s (%s)", config.path, config.kind.value)


def video_state_from_image(model: STIVTransformer, image_state: dict[str, torch.Tensor],
                           name: str) -> dict[str, torch.Tensor]:
    """The video model's state dict made from a T2I model's (any temporal patch in the source)."""
    target = model.state_dict()
    pt = model.config.temporal_patch
    state = dict(image_state)
    w = state["patch_embed.weight"]  # (D, C, pt_src, p, p)
    if w.shape[2] != pt:
        if w.shape[2] != 1:
            raise ValueError(f"{name}: a T2I source must have temporal patch 1 to be inflated, has {w.shape[2]}")
        state["patch_embed.weight"] = inflate_patch_embed(w[:, :, 0], pt)
        # The final layer predicts (pt, p, p, C) per token, pt outermost: repeat the image rows.
        state["final_linear.weight"] = state["final_linear.weight"].repeat(pt, 1)
        state["final_linear.bias"] = state["final_linear.bias"].repeat(pt)
        state["given_frame_embed.weight"] = torch.zeros_like(target["given_frame_embed.weight"])
    for key, value in target.items():
        if TEMPORAL in key and key.endswith((".proj.weight", ".proj.bias")):
            state[key] = torch.zeros_like(value)  # temporal attention adds nothing at the start
    check_keys(model, {k: tuple(v.shape) for k, v in state.items()}, name)
    return state


def combine_spatial_temporal(model: STIVTransformer, spatial: dict[str, torch.Tensor],
                             temporal: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Everything but temporal attention from `spatial`; temporal attention from `temporal`."""
    state = {k: v for k, v in spatial.items() if TEMPORAL not in k}
    expected = [k for k in model.state_dict() if TEMPORAL in k]
    missing = [k for k in expected if k not in temporal]
    if missing:
        raise ValueError(f"{name} lacks temporal attention weights, e.g. {missing[:3]}: it is not a video model "
                         f"of this depth")
    state.update({k: temporal[k] for k in expected})
    check_keys(model, {k: tuple(v.shape) for k, v in state.items()}, name)
    return state


def rope_scale_for(source_grid: tuple[int, int, int], target_grid: tuple[int, int, int],
                   source_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[float, float, float]:
    """`rope_position_scale` that maps the target token grid (T', H', W') onto the source's positions."""
    return tuple(s * a / b for s, a, b in zip(source_scale, source_grid, target_grid))


def _read(path: str) -> dict[str, torch.Tensor]:
    """The model's tensors of a checkpoint or bundle (other components' keys left out), as float32."""
    state = load_file(str(check_safetensors(path)))
    return {k: v.float() for k, v in state.items() if not k.startswith(COMPONENT_PREFIXES)}
