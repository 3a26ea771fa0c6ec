"""Optimizers and the learning-rate schedule of the paper's recipe.

STIV trains with AdaFactor, beta1 0.9 and a *fixed* beta2 0.999. torch.optim.Adafactor has no first
moment and decays beta2 as 1 - t^-0.8, and transformers' Adafactor ties beta2 to the same schedule,
so neither fits exactly; `AdaFactor` below is written from Shazeer & Stern (2018) with:
- factored second moment for tensors of >= 2 dims (row and column means over the last two dims),
  unfactored for vectors; squared gradients get +1e-30 (epsilon1) so nothing divides by zero;
- fixed beta2 with Adam's bias correction 1 / (1 - beta2^t): without it a fixed 0.999 would make the
  first thousand steps' updates ~30x too large before update clipping;
- update clipping: the normalised update is divided by max(1, RMS(update) / clip_threshold);
- first moment m = beta1 m + (1 - beta1) u on the clipped update (as in the paper's variant and
  big_vision), no relative step, no parameter scaling (the recipe sets lr = 2e-4 explicitly);
- decoupled weight decay p -= lr * wd * p.
State is float32 whatever the parameter dtype.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from .config import OptimConfig, OptimizerKind

log = logging.getLogger(__name__)


class AdaFactor(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 2e-4, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-30, clip_threshold: float = 1.0, weight_decay: float = 0.0):
        if lr <= 0 or not 0 <= beta1 < 1 or not 0 < beta2 < 1:
            raise ValueError(f"AdaFactor needs lr > 0, 0 <= beta1 < 1, 0 < beta2 < 1; got {lr}, {beta1}, {beta2}")
        defaults = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, clip_threshold=clip_threshold,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("AdaFactor does not support sparse gradients")
        grad = p.grad.float()
        state = self.state[p]
        factored = grad.dim() >= 2
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["row_var"] = grad.new_zeros(grad.shape[:-1])
                state["col_var"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["var"] = torch.zeros_like(grad)
        state["step"] += 1
        beta1, beta2 = group["beta1"], group["beta2"]
        correction = 1 - beta2 ** state["step"].item()
        squared = grad.square() + group["eps"]
        if factored:
            row, col = state["row_var"], state["col_var"]
            row.lerp_(squared.mean(dim=-1), 1 - beta2)
            col.lerp_(squared.mean(dim=-2), 1 - beta2)
            # v ~ row col^T / mean(row): the rank-1 estimate of the second moment (Shazeer & Stern, eq. 4)
            r = (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1)
            variance = r * col.unsqueeze(-2) / correction
        else:
            state["var"].lerp_(squared, 1 - beta2)
            variance = state["var"] / correction
        update = grad * variance.rsqrt()
        rms = update.square().mean().sqrt()
        update /= (rms / group["clip_threshold"]).clamp_min(1.0)
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(update, 1 - beta1)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(exp_avg.to(p.dtype), alpha=-group["lr"])


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.name == OptimizerKind.ADAFACTOR:
        return AdaFactor(params, lr=config.lr, beta1=config.beta1, beta2=config.beta2,
                         weight_decay=config.weight_decay)
    if config.name == OptimizerKind.ADAMW:
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                 weight_decay=config.weight_decay)
    if config.name == OptimizerKind.ADAMW_8BIT:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise RuntimeError("optim.name='adamw8bit' needs bitsandbytes (pip install bitsandbytes); "
                               "or choose 'adamw' / 'adafactor'") from err
        return bnb.optim.AdamW8bit(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                   weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.name!r}; choose one of {[k.value for k in OptimizerKind]}")


def warmup_stable_decay(warmup_steps: int, decay_start: int = 0, decay_steps: int = 0, min_ratio: float = 0.0):
    """LR multiplier for step s (0-based): (s + 1) / warmup_steps during warm-up, then 1; with
    `decay_steps > 0`, linear from 1 at step `decay_start` down to `min_ratio` at `decay_start +
    decay_steps`, then `min_ratio` (the WSD schedule: a run kept at a constant LR can be annealed from
    any step, e.g. when resumed from its checkpoint, instead of committing to a length up front)."""
    def factor(step: int) -> float:
        value = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
        if decay_steps > 0 and step >= decay_start:
            value *= 1.0 - (1.0 - min_ratio) * min(1.0, (step - decay_start) / decay_steps)
        return value
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_stable_decay(
        config.warmup_steps, config.decay_start, config.decay_steps, config.min_lr_ratio))
