"""Sampling: time grids, guidance (pure functions), ODE steppers and the frame-replacement sampler."""
from .guidance import GuidanceConfig, GuidanceMode
from .sampler import GenerationCancelled, SampleInputs, SamplerConfig, StepInfo, sample
from .schedules import time_grid
from .steppers import Stepper

__all__ = ["GuidanceConfig", "GuidanceMode", "GenerationCancelled", "SampleInputs", "SamplerConfig",
           "StepInfo", "Stepper", "sample", "time_grid"]
