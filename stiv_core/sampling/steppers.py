"""ODE steppers for dx/dt = v(x, t) over a time grid (t increasing, see `stiv_core.flow`).

`constrain(x, t)` puts frame-replacement constraints back on a state at time t; it is applied to
every state a stepper produces, including Heun's predictor.
"""
from __future__ import annotations

import enum
from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
ConstrainFn = Callable[[torch.Tensor, float], torch.Tensor]


class Stepper(str, enum.Enum):
    EULER = "euler"
    HEUN = "heun"


def euler_step(velocity_fn: VelocityFn, x: torch.Tensor, t: float, t_next: float,
               constrain: ConstrainFn) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step; returns (x at t_next, the velocity used at t)."""
    v = velocity_fn(x, t)
    return constrain(x + (t_next - t) * v, t_next), v


def heun_step(velocity_fn: VelocityFn, x: torch.Tensor, t: float, t_next: float,
              constrain: ConstrainFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Heun's second-order step; the step that reaches t = 1 is an Euler step (as in EDM)."""
    x_euler, v = euler_step(velocity_fn, x, t, t_next, constrain)
    if t_next >= 1.0:
        return x_euler, v
    v_next = velocity_fn(x_euler, t_next)
    return constrain(x + (t_next - t) * 0.5 * (v + v_next), t_next), v


STEPPERS = {Stepper.EULER: euler_step, Stepper.HEUN: heun_step}
