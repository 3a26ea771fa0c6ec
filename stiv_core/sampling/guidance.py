"""Classifier-free guidance as pure functions on velocities.

Passes are named by what they drop: `Pass(drop_text, drop_image)`. Dropping the image means no frame
replacement for that pass (the given frames stay noisy, as in training with image dropout).

- plain CFG (text only):  v = v(cI, ∅T) + s * (v(cI, cT) - v(cI, ∅T))
- JIT-CFG (2 passes):     v = v(∅, ∅) + s * (v(cI, cT) - v(∅, ∅))
- SIT-CFG (3 passes):     v = v(∅, ∅) + sI * (v(cI, ∅T) - v(∅, ∅)) + sT * (v(cI, cT) - v(cI, ∅T))
- renormalization: rescale the guided velocity, per sample, to the norm of the conditional one, both
  taken over the generated frames only (a given frame's velocity is unconstrained by training and is
  overwritten by frame replacement, so it must not set the scale).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch


class GuidanceMode(str, enum.Enum):
    NONE = "none"
    CFG = "cfg"
    JIT = "jit"
    SIT = "sit"


class Pass(NamedTuple):
    drop_text: bool
    drop_image: bool


FULL, NO_TEXT, NULL = Pass(False, False), Pass(True, False), Pass(True, True)
_PASSES = {GuidanceMode.NONE: (FULL,), GuidanceMode.CFG: (FULL, NO_TEXT),
           GuidanceMode.JIT: (FULL, NULL), GuidanceMode.SIT: (FULL, NO_TEXT, NULL)}


@dataclass(frozen=True)
class GuidanceConfig:
    """`scale` guides text (or text+image for JIT); `image_scale` is SIT's image scale."""

    mode: GuidanceMode = GuidanceMode.JIT
    scale: float = 7.5
    image_scale: float = 1.5
    renormalize: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", GuidanceMode(self.mode))
        except ValueError:
            raise ValueError(f"unknown guidance mode {self.mode!r}; choose one of "
                             f"{[m.value for m in GuidanceMode]}") from None
        check_scale("scale", self.scale)
        check_scale("image_scale", self.image_scale)

    @property
    def passes(self) -> tuple[Pass, ...]:
        """The model passes one guided step needs, in the order `combine` takes them."""
        return _PASSES[self.mode]


def check_scale(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance {name} must be a finite number >= 0, got {value!r}")


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def joint_image_text_cfg(v_cond: torch.Tensor, v_null: torch.Tensor, scale: float) -> torch.Tensor:
    """JIT-CFG: one scale over text and image together (v_null drops both)."""
    return cfg(v_cond, v_null, scale)


def separate_image_text_cfg(v_full: torch.Tensor, v_image: torch.Tensor, v_null: torch.Tensor, *,
                            scale_text: float, scale_image: float) -> torch.Tensor:
    """SIT-CFG: v_image keeps the image and drops the text; v_null drops both."""
    return v_null + scale_image * (v_image - v_null) + scale_text * (v_full - v_image)


def renormalize(v_guided: torch.Tensor, v_cond: torch.Tensor, generated: Optional[torch.Tensor] = None,
                eps: float = 1e-12) -> torch.Tensor:
    """v_guided `(B, C, T, H, W)` rescaled per sample to the norm of v_cond.

    generated: optional `(B, T)` bool, True for the frames the norms are taken over (None: all frames).
    """
    keep = 1.0 if generated is None else generated.to(v_guided.device, v_guided.dtype)[:, None, :, None, None]
    per_sample = lambda v: torch.linalg.vector_norm((v * keep).flatten(1), dim=1)
    ratio = per_sample(v_cond) / per_sample(v_guided).clamp_min(eps)
    return v_guided * ratio.view(-1, *([1] * (v_guided.dim() - 1)))


def combine(config: GuidanceConfig, velocities: Sequence[torch.Tensor],
            generated: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The guided velocity from the passes' velocities, given in `config.passes` order.

    generated: `(B, T)` bool of the frames being generated; renormalization measures only those.
    """
    if len(velocities) != len(config.passes):
        raise ValueError(f"{config.mode.value} guidance takes {len(config.passes)} velocities, "
                         f"got {len(velocities)}")
    mode, v_full = config.mode, velocities[0]
    if mode is GuidanceMode.NONE:
        return v_full
    if mode is GuidanceMode.CFG:
        guided = cfg(v_full, velocities[1], config.scale)
    elif mode is GuidanceMode.JIT:
        guided = joint_image_text_cfg(v_full, velocities[1], config.scale)
    else:
        guided = separate_image_text_cfg(v_full, velocities[1], velocities[2],
                                         scale_text=config.scale, scale_image=config.image_scale)
    return renormalize(guided, v_full, generated) if config.renormalize else guided
