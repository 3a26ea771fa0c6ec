"""One training step's conditioning and loss: the task mixture, condition dropout, MaskDiT.

Every sample of a batch draws a task (which latent frames are given, as in the frame-replacement
plans of `conditioning.py`), then the image condition is dropped with `image_dropout` (no frame is
given: no replacement, no frame mask) and, independently, the text with `text_dropout` (the model's
learned null text). Given frames enter the model as their clean latents and weigh 0 in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import flow
from ..conditioning import FrameReplacementPlan, Task, given_frames
from ..interfaces import TextEmbedding
from ..model.transformer import STIVTransformer, num_spatial_tokens, sample_keep_index
from .config import RecipeConfig


TRAINED_TASKS = (Task.T2V, Task.TI2V, Task.PREDICTION, Task.INTERPOLATION, Task.KEYFRAMES)


def trained_frames(task: Task, num_frames: int, recipe: RecipeConfig) -> list[int]:
    """The latent frames `task` gives in a training clip, by `given_frames` (the sampler's rule) with the
    recipe's k and S; never all of them (something must be generated): a 1-frame clip (T2I) gives none,
    prediction at most T - 1 frames, interpolation of 2 frames only the first, keyframes that would cover
    every frame only the first."""
    task = Task(task)
    if task is Task.T2V or num_frames == 1:
        return []
    if task is Task.PREDICTION:
        return list(given_frames(task, num_frames, count=min(recipe.prediction_frames, num_frames - 1)))
    if task is Task.INTERPOLATION and num_frames == 2:
        return list(given_frames(Task.TI2V, num_frames))
    if task is Task.KEYFRAMES:
        count = -(-num_frames // recipe.keyframe_stride)
        return list(given_frames(task, num_frames, count=count if count < num_frames else 1,
                                 stride=recipe.keyframe_stride))
    if task in TRAINED_TASKS:
        return list(given_frames(task, num_frames))
    raise ValueError(f"task {task!r} is not part of the training mixture {[t.value for t in TRAINED_TASKS]}")


@dataclass(frozen=True)
class Conditioning:
    """What one batch is trained on. tasks: per sample; given `(B, T)` bool after image dropout."""

    tasks: tuple[Task, ...]
    given: torch.Tensor
    text_drop: torch.Tensor           # (B,) bool
    keep_index: Optional[torch.Tensor]  # (B, S_keep) or None (no MaskDiT)


def draw_conditioning(batch: int, num_frames: int, num_spatial: int, recipe: RecipeConfig, *,
                      masked: bool, generator: torch.Generator) -> Conditioning:
    mixture = recipe.task_weights
    names = list(mixture)
    weights = torch.tensor([mixture[n] for n in names], dtype=torch.float64)
    picks = torch.multinomial(weights, batch, replacement=True, generator=generator)
    tasks = tuple(names[i] for i in picks.tolist())
    given = torch.zeros(batch, num_frames, dtype=torch.bool)
    for row, task in enumerate(tasks):
        given[row, trained_frames(task, num_frames, recipe)] = True
    drop_image = torch.rand(batch, generator=generator) < recipe.image_dropout
    given[drop_image] = False
    text_drop = torch.rand(batch, generator=generator) < recipe.text_dropout
    keep = None
    if masked:
        keep = sample_keep_index(batch, num_spatial, keep_ratio=1 - recipe.maskdit_ratio, generator=generator)
    return Conditioning(tasks, given, text_drop, keep)


@dataclass(frozen=True)
class TrainBatch:
    """latents `(B, C, T, H, W)` (float32), text fitted to the model, micro `(B, 6)`."""

    latents: torch.Tensor
    text: TextEmbedding
    micro: torch.Tensor


def masking_active(recipe: RecipeConfig, step: int) -> bool:
    """MaskDiT until `maskdit_until_step` (exclusive), then the unmasked fine-tune."""
    return recipe.maskdit_ratio > 0 and (recipe.maskdit_until_step < 0 or step < recipe.maskdit_until_step)


def training_loss(model: torch.nn.Module, batch: TrainBatch, recipe: RecipeConfig, *, step: int,
                  generator: torch.Generator, config=None) -> tuple[torch.Tensor, Conditioning]:
    """The flow-matching loss of one batch; all randomness comes from `generator` (CPU).

    `model` may be wrapped (DDP/FSDP); `config` is its STIVConfig (taken from `model` if omitted).
    """
    config = config or model.config
    x1 = batch.latents.float()
    b, _, frames, h, w = x1.shape
    cond = draw_conditioning(b, frames, num_spatial_tokens(config, h, w), recipe,
                             masked=masking_active(recipe, step), generator=generator)
    t = flow.sample_time(b, generator=generator, mean=recipe.time_mean, std=recipe.time_std,
                         shift=recipe.time_shift)
    noise = torch.randn(x1.shape, generator=generator)
    device = x1.device
    t, noise, given = t.to(device), noise.to(device), cond.given.to(device)
    # Frame replacement: given frames are seen clean, exactly as the sampler shows them (the same plan).
    plan = FrameReplacementPlan.per_sample(x1, given)
    x_in = plan.replace(flow.interpolate(x1, noise, t))
    keep = cond.keep_index.to(device) if cond.keep_index is not None else None
    out = model(x_in, t, batch.text, batch.micro,
                frame_mask=plan.frame_mask(b, device), text_drop=cond.text_drop.to(device), keep_index=keep)
    velocity = flow.velocity_from_prediction(out.float(), x_in, t, config.prediction)
    spatial = None if keep is None else kept_pixels(keep, h, w, config.patch_size)
    loss = flow.flow_loss(velocity, flow.velocity_target(x1, noise), plan.loss_weight(b), spatial)
    if keep is None and (idle := idle_mask_token(model)) is not None:
        loss = loss + idle
    return loss, cond


def idle_mask_token(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """0 x MaskDiT's mask token on an unmasked step of a DDP-wrapped model (None otherwise).

    The mask token only takes part when tokens are dropped; DDP waits for a gradient of every parameter
    ("Expected to have finished reduction in the prior iteration"), so it gets a zero one.
    """
    token = getattr(getattr(model, "module", None), "mask_token", None)
    if token is None or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    return 0 * token.sum()


def kept_pixels(keep_index: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """`(B, H, W)` float: 1 on the latent pixels of the spatial tokens MaskDiT kept, 0 on the dropped ones.

    Only kept tokens are scored (MaskDiT): a dropped token's velocity target holds noise the network never
    saw, so its error could not be reduced and would only add gradient noise.
    """
    b = keep_index.shape[0]
    grid = torch.zeros(b, (height // patch) * (width // patch), device=keep_index.device)
    grid.scatter_(1, keep_index, 1.0)
    grid = grid.view(b, height // patch, width // patch)
    return grid.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)


def frozen_parameter_names(model: STIVTransformer, recipe: RecipeConfig) -> list[str]:
    """Parameters the recipe keeps fixed: temporal attention in the T2I stage."""
    if not recipe.freeze_temporal:
        return []
    return [name for name, _ in model.named_parameters() if ".temporal_attn." in name]
