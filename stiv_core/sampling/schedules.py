"""Time grids for sampling, in the convention of `stiv_core.flow` (t = 0 noise -> t = 1 data)."""
from __future__ import annotations

import torch

from ..flow import shift_time


def time_grid(steps: int, *, shift: float = 1.0) -> torch.Tensor:
    """`steps + 1` increasing times from exactly 0 to exactly 1 (float64), warped by `shift`."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)
