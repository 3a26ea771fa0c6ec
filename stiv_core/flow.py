"""Flow matching: the ONE time convention of this project, stated here and converted nowhere else.

Convention (the paper's): time `t` runs over [0, 1]; **t = 0 is pure Gaussian noise, t = 1 is data**.
    x_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I),  x1 = data
    velocity v = dx_t/dt = x1 - x0      (the training target)
Sampling integrates dx/dt = v from t = 0 to t = 1. A "shift" > 1 spends more of the steps near
t = 0 (high noise), which large resolutions need (SD3's timestep shift, written for this convention).
The network embeds `TIMESTEP_SCALE * t` (DiT's and PixArt's timestep range); if it predicts clean data instead of velocity
(`STIVConfig.prediction == "data"`), `velocity_from_prediction` turns that into velocity here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import Prediction

# The model's timestep embedder sees u = TIMESTEP_SCALE * t; the PixArt converter's time reversal
# (PixArt's s = 1000 - u, s = 0 data) holds because this equals PixArt's 1000 DDPM timesteps.
TIMESTEP_SCALE = 1000.0

# 1 - t never goes below this when dividing by it (data prediction at t -> 1): smaller values let
# the velocity of a data-predicting network, and so its training loss, blow up near the data end.
MIN_REMAINING_TIME = 0.05


def interpolate(x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t for data `x1` `(B, ...)`, noise of the same shape and `t` `(B,)`, or one time (a float) for all."""
    if not isinstance(t, torch.Tensor):
        t = float(t)  # a sampler's time: Python-scalar arithmetic, so no float32 rounding of t itself
    else:
        t = _expand(t, x1)
    return t * x1 + (1 - t) * noise


def velocity_target(x1: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x1 - noise


def velocity_from_prediction(prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                             kind: Prediction) -> torch.Tensor:
    """The velocity implied by the network output `prediction` of `kind` (`Prediction` or its value)."""
    if kind not in tuple(Prediction):
        raise ValueError(f"unknown prediction kind {kind!r}; expected 'velocity' or 'data'")
    if Prediction(kind) is Prediction.VELOCITY:
        return prediction
    remaining = (1 - _expand(t, x_t)).clamp_min(MIN_REMAINING_TIME)
    return (prediction - x_t) / remaining


def data_from_velocity(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean sample x1 implied by velocity at (x_t, t): x1 = x_t + (1 - t) v (for previews)."""
    return x_t + (1 - _expand(t, x_t)) * velocity


def clamp_data(velocity: torch.Tensor, x_t: torch.Tensor, t: float, limit: float) -> torch.Tensor:
    """The velocity whose clean sample `x_t + (1 - t) v` is clamped to [-limit, limit].

    Static thresholding (DDPM, Imagen) for latent spaces with a known range (pixels in [-1, 1]): strong
    guidance extrapolates the clean estimate far out of range (a white background guided to +5), and the
    final clamp to the range then washes out whatever sits on it. `1 - t` is floored as in
    `velocity_from_prediction`, so for t <= 1 - MIN_REMAINING_TIME the clamp is exact.
    """
    remaining = max(1.0 - float(t), MIN_REMAINING_TIME)
    x1 = x_t + remaining * velocity
    return (x1.clamp(-limit, limit) - x_t) / remaining


def flow_loss(velocity: torch.Tensor, target: torch.Tensor, frame_weight: Optional[torch.Tensor] = None,
              spatial_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared velocity error over `(B, C, T, H, W)`, counting only frames with weight > 0.

    `frame_weight` `(B, T)`: 1 for generated frames, 0 for given (frame-replaced) frames, whose error
    must not reach the loss. `spatial_weight` `(B, H, W)`: 1 where the loss counts in every frame, 0 where
    it does not (MaskDiT's dropped tokens). Returns a scalar; 0 if every frame is given.
    """
    squared = (velocity.float() - target.float()).square()
    if spatial_weight is None:
        error = squared.mean(dim=(1, 3, 4))  # (B, T)
    else:
        sw = spatial_weight.to(squared.dtype)[:, None, None]
        error = (squared * sw).sum(dim=(3, 4)).mean(dim=1) / sw.sum(dim=(3, 4)).clamp_min(1.0)[:, 0]
    if frame_weight is None:
        return error.mean()
    weight = frame_weight.to(error.dtype)
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


def sample_time(batch: int, *, generator: Optional[torch.Generator] = None, mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Training times `(B,)`: logit-normal (SD3) on the data-time axis, then `shift_time`."""
    t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    return shift_time(t, shift)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift > 1 moves times toward noise (t = 0); keeps 0 and 1 fixed.

    With noise level sigma = 1 - t this is SD3's `sigma' = s*sigma / (1 + (s-1)*sigma)`.
    """
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"time shift must be a positive finite number, got {shift!r}")
    return t / (t + shift * (1 - t))


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))
