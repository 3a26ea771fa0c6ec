"""The frame-replacement sampler: guided velocity from batched passes, stepped over a time grid.

Given frames are handled in one place: before each model call, passes that keep the image see the
clean latents (frame replacement); after each step the state of given frames is reset to their clean
latents noised to the new time (so passes that drop the image see what training showed them), and
the final state holds the clean latents exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import flow
from ..conditioning import FrameReplacementPlan
from ..interfaces import TextEmbedding
from ..model.transformer import STIVTransformer
from .guidance import GuidanceConfig, combine
from .schedules import time_grid
from .steppers import STEPPERS, Stepper


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 25
    shift: float = 1.0
    stepper: Stepper = Stepper.EULER
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    # Clamp each step's clean estimate to the latent space's range when it has one (`SampleInputs.
    # latent_range`: pixel space does, learned VAEs don't): see `flow.clamp_data`.
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stepper", Stepper(self.stepper))
        time_grid(self.steps, shift=self.shift)  # validates steps and shift


@dataclass(frozen=True)
class SampleInputs:
    """What one sampling run is conditioned on; every tensor has the batch of the noise.

    text: fitted to the model's max tokens; micro: `(B, 6)` (see `MicroConditions`);
    negative: replaces the learned null text in passes that drop the text, when given.
    latent_range: clean latents lie in [-latent_range, latent_range] (the VAE's `latent_range`), or None.
    """

    text: TextEmbedding
    micro: torch.Tensor
    plan: FrameReplacementPlan
    negative: Optional[TextEmbedding] = None
    latent_range: Optional[float] = None


@dataclass(frozen=True)
class StepInfo:
    step: int                 # 1-based
    total: int
    t: float                  # time reached
    latents: torch.Tensor     # state after the step
    denoised: torch.Tensor    # the clean estimate at the step's start (a preview)


# Return False to stop the run (raises GenerationCancelled); None or True to go on.
StepCallback = Callable[[StepInfo], Optional[bool]]


class GenerationCancelled(RuntimeError):
    """Raised when a step callback asked the run to stop."""


def guided_velocity(model: STIVTransformer, inputs: SampleInputs, guidance: GuidanceConfig,
                    batch: int) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """v(x, t) with guidance: all passes of a step run as ONE batched forward."""
    passes = guidance.passes
    device = next(model.parameters()).device
    plan, text, n = inputs.plan, inputs.text, len(passes)
    null = inputs.negative if inputs.negative is not None else text
    texts = [null if p.drop_text else text for p in passes]
    batched_text = TextEmbedding(*(torch.cat([getattr(e, k) for e in texts]).to(device)
                                   for k in ("tokens", "mask", "pooled")))
    use_null = inputs.negative is None
    text_drop = torch.tensor([p.drop_text and use_null for p in passes], device=device).repeat_interleave(batch)
    given = plan.frame_mask(batch, device)
    generated = ~given
    frame_mask = torch.cat([torch.zeros_like(given) if p.drop_image else given for p in passes])
    micro = inputs.micro.to(device).repeat(n, 1)
    kind = model.config.prediction

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        replaced = plan.replace(x)
        x_in = torch.cat([x if p.drop_image else replaced for p in passes])
        t_in = torch.full((n * batch,), float(t), device=device)
        out = model(x_in, t_in, batched_text, micro, frame_mask=frame_mask, text_drop=text_drop)
        v = flow.velocity_from_prediction(out.float(), x_in, t_in, kind)
        return combine(guidance, v.chunk(n), generated)

    return velocity


@torch.inference_mode()
def sample(model: STIVTransformer, noise: torch.Tensor, inputs: SampleInputs, config: SamplerConfig, *,
           callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Integrate from `noise` `(B, C, T, H, W)` (t = 0) to clean latents (t = 1), float32."""
    batch = noise.shape[0]
    noise = noise.to(next(model.parameters()).device, torch.float32)
    model.token_grid(noise.shape)  # frame count / size errors before any work
    if inputs.plan.num_frames != noise.shape[2]:
        raise ValueError(f"the plan is for {inputs.plan.num_frames} frames, the noise has {noise.shape[2]}")
    for name, emb in (("text", inputs.text), ("negative", inputs.negative)):
        if emb is not None and emb.batch != batch:
            raise ValueError(f"{name} embedding has batch {emb.batch}, the noise has {batch}")
    plan = inputs.plan
    velocity = guided_velocity(model, inputs, config.guidance, batch)
    if config.clip_denoised and inputs.latent_range is not None:
        guided, limit = velocity, inputs.latent_range
        velocity = lambda x, t: flow.clamp_data(guided(x, t), x, t, limit)
    constrain = lambda x, t: plan.renoise(x, noise, t)
    step_fn = STEPPERS[config.stepper]
    times = time_grid(config.steps, shift=config.shift).tolist()
    x = constrain(noise, 0.0)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        x_start = x
        x, v = step_fn(velocity, x, t, t_next, constrain)
        if callback is not None:
            info = StepInfo(i + 1, config.steps, t_next, x, flow.data_from_velocity(v, x_start, torch.tensor(t)))
            if callback(info) is False:
                raise GenerationCancelled(f"stopped by the callback after step {i + 1} of {config.steps}")
    return plan.replace(x)
