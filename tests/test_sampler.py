"""The frame-replacement sampler: batched guidance passes, steppers, given frames, callbacks."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stiv_core.conditioning import FrameReplacementPlan, Task, MicroConditions
from stiv_core.sampling import (GenerationCancelled, GuidanceConfig, SampleInputs, SamplerConfig, Stepper,
                                sample)
from stiv_core.sampling.guidance import separate_image_text_cfg
from stiv_core.sampling.sampler import guided_velocity
from stiv_core import pipeline as pipeline_module
from stiv_core.pipeline import GenerationRequest
from stiv_core.encoders.pixel import PixelVAE
from tests.fakes import tiny_pipeline


class FieldModel(nn.Module):
    """A stand-in network with a known output: `fn(x, t)`, declared as `prediction`."""

    def __init__(self, fn, prediction="velocity"):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.fn, self.config = fn, SimpleNamespace(prediction=prediction)

    def token_grid(self, shape):
        return shape[2:]

    def forward(self, x, t, *args, **kwargs):
        return self.fn(x, t)


def inputs_for(pipe, prompts, plan):
    text = pipe.encode_text(prompts)
    micro = MicroConditions(8, 8, plan.num_frames).tensor(len(prompts))
    return SampleInputs(text, micro, plan)


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["none", "cfg", "jit", "sit"])
@pytest.mark.parametrize("task", ["ti2v", "interp", "keyframes", "prediction"])
def test_given_frames_are_bit_identical_after_sampling(mode, task):
    pipe = tiny_pipeline()
    clean = noise((2, 12, 8, 4, 4), seed=5)
    plan = {"ti2v": lambda: FrameReplacementPlan.for_task(Task.TI2V, 8, clean[:, :, 0]),
            "interp": lambda: FrameReplacementPlan.interpolation(clean[:, :, 0], clean[:, :, 7], 8),
            "keyframes": lambda: FrameReplacementPlan.for_task(Task.KEYFRAMES, 8, clean[:, :, ::3], stride=3),
            "prediction": lambda: FrameReplacementPlan.for_task(Task.PREDICTION, 8, clean[:, :, :3])}[task]()
    config = SamplerConfig(steps=3, guidance=GuidanceConfig(mode, scale=4.0, image_scale=2.0))
    out = sample(pipe.model, noise(clean.shape), inputs_for(pipe, ["a red circle", "a cat"], plan), config)
    idx = list(plan.given)
    assert torch.equal(out[:, :, idx], clean[:, :, idx])
    generated = [i for i in range(8) if i not in idx]
    assert not torch.allclose(out[:, :, generated], clean[:, :, generated])


@pytest.mark.parametrize("mode", ["jit", "sit"])
@pytest.mark.parametrize("stepper", ["euler", "heun"])
def test_every_model_call_sees_the_clean_given_frames_and_every_step_keeps_their_path(mode, stepper):
    # the final replacement alone would make the output right: this watches each call and each step
    pipe = tiny_pipeline()
    clean, start = noise((2, 12, 6, 4, 4), seed=5), noise((2, 12, 6, 4, 4), seed=6)
    plan = FrameReplacementPlan.interpolation(clean[:, :, 0], clean[:, :, 5], 6)
    calls, states = [], []
    model = FieldModel(lambda x, t: (calls.append((x.clone(), t.clone())), -0.3 * x)[1])
    config = SamplerConfig(steps=4, stepper=stepper, guidance=GuidanceConfig(mode, scale=3.0, image_scale=2.0))
    inputs = inputs_for(pipe, ["a red circle", "a cat"], plan)
    sample(model, start, inputs, config, callback=lambda info: states.append((info.t, info.latents.clone())))
    passes = config.guidance.passes
    assert len(calls) == {"euler": 4, "heun": 2 * 4 - 1}[stepper]   # Heun's last step (to t = 1) is Euler
    for x_in, t in calls:
        for k, p in enumerate(passes):
            given = x_in[2 * k : 2 * k + 2][:, :, [0, 5]]
            if p.drop_image:   # no replacement: the given frames on their noisy path at this call's time
                expected = t[0] * clean[:, :, [0, 5]] + (1 - t[0]) * start[:, :, [0, 5]]
                torch.testing.assert_close(given, expected)
            else:
                assert torch.equal(given, clean[:, :, [0, 5]])
    assert [round(t, 6) for t, _ in states][-1] == 1.0 and len(states) == 4
    for t, latents in states:
        torch.testing.assert_close(latents[:, :, [0, 5]], t * clean[:, :, [0, 5]] + (1 - t) * start[:, :, [0, 5]])


def manual_passes(pipe, inputs, x, t, passes):
    """Each pass as its own forward (no batching), the reference for the batched velocity."""
    model, plan, text = pipe.model, inputs.plan, inputs.text
    out = []
    for drop_text, drop_image in passes:
        x_in = x if drop_image else plan.replace(x)
        mask = torch.zeros(x.shape[0], x.shape[2], dtype=torch.bool) if drop_image else plan.frame_mask(x.shape[0])
        emb = inputs.negative if (drop_text and inputs.negative is not None) else text
        drop = torch.full((x.shape[0],), drop_text and inputs.negative is None)
        out.append(model(x_in, torch.full((x.shape[0],), t), emb, inputs.micro,
                         frame_mask=mask, text_drop=drop))
    return out


def test_batched_sit_passes_equal_separate_forwards():
    # The model in float64: in float32 the guidance scales multiply the batch-size-dependent rounding of
    # each pass (~1e-6) by ~10, which is not what this test is about. The sampler's velocity is float32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pipe = tiny_pipeline()
        clean, x = noise((2, 12, 4, 4, 4), 1), noise((2, 12, 4, 4, 4), 2)
        plan = FrameReplacementPlan.for_task(Task.TI2V, 4, clean[:, :, 0])
        inputs = inputs_for(pipe, ["red circle left", "blue square up"], plan)
        config = GuidanceConfig("sit", scale=7.5, image_scale=1.5)
        with torch.no_grad():
            batched = guided_velocity(pipe.model, inputs, config, 2)(x, 0.4)
            v_full, v_image, v_null = manual_passes(pipe, inputs, x, 0.4, config.passes)
    finally:
        torch.set_default_dtype(previous)
    expected = separate_image_text_cfg(v_full, v_image, v_null, scale_text=7.5, scale_image=1.5)
    assert v_full.dtype == torch.float64 and batched.dtype == torch.float32
    torch.testing.assert_close(batched, expected.float(), rtol=1e-6, atol=1e-6)


def test_negative_prompt_replaces_the_null_text():
    pipe = tiny_pipeline()
    x = noise((1, 12, 4, 4, 4), 3)
    inputs = inputs_for(pipe, ["red circle"], FrameReplacementPlan.for_task(Task.T2V, 4))
    negative = SampleInputs(inputs.text, inputs.micro, inputs.plan, pipe.encode_text(["blurry"]))
    config = GuidanceConfig("cfg", scale=5.0)
    with torch.no_grad():
        with_negative = guided_velocity(pipe.model, negative, config, 1)(x, 0.5)
        with_null = guided_velocity(pipe.model, inputs, config, 1)(x, 0.5)
        v_full, v_neg = manual_passes(pipe, negative, x, 0.5, config.passes)
    torch.testing.assert_close(with_negative, v_neg + 5.0 * (v_full - v_neg), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(with_negative, with_null)


@pytest.mark.parametrize("stepper", [Stepper.EULER, Stepper.HEUN])
def test_data_prediction_lands_exactly_on_the_predicted_clip(stepper):
    target = noise((1, 2, 4, 2, 2), 7)
    model = FieldModel(lambda x, t: target.expand_as(x), prediction="data")
    plan = FrameReplacementPlan.for_task(Task.T2V, 4)
    inputs = SampleInputs(tiny_pipeline().encode_text(["x"]), torch.zeros(1, 6), plan)
    out = sample(model, noise(target.shape), inputs, SamplerConfig(steps=4, stepper=stepper, shift=3.0,
                                                                      guidance=GuidanceConfig("none")))
    torch.testing.assert_close(out, target)


@pytest.mark.parametrize("stepper", [Stepper.EULER, Stepper.HEUN])
def test_clip_denoised_clamps_to_the_latent_range_only_when_it_is_known_and_asked_for(stepper):
    """A data prediction out of range (as strong guidance makes): pixel space lands on the clamped clip."""
    target = 3 * noise((1, 2, 4, 2, 2), 7)
    model = FieldModel(lambda x, t: target.expand_as(x), prediction="data")
    inputs = SampleInputs(tiny_pipeline().encode_text(["x"]), torch.zeros(1, 6), FrameReplacementPlan.for_task(Task.T2V, 4))
    pixel = dataclasses.replace(inputs, latent_range=1.0)

    def run(inputs, clip):
        return sample(model, noise(target.shape), inputs, SamplerConfig(steps=4, stepper=stepper, clip_denoised=clip,
                                                                       guidance=GuidanceConfig("none")))

    torch.testing.assert_close(run(pixel, True), target.clamp(-1, 1))
    torch.testing.assert_close(run(pixel, False), target)
    torch.testing.assert_close(run(inputs, True), target)   # no known range (a learned VAE): untouched


def test_the_pipeline_passes_its_vae_range_to_the_sampler(monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline_module, "sample", lambda model, noise, inputs, config, **kw:
                        seen.append(inputs.latent_range) or noise)
    pipe = tiny_pipeline()
    pipe.sample_latents(GenerationRequest("a red circle", 4, 8, 8))   # a VAE without a range
    pipe.vae.latent_range = 2.0
    pipe.sample_latents(GenerationRequest("a red circle", 4, 8, 8))
    assert seen == [None, 2.0] and PixelVAE.latent_range == 1.0


def test_heun_is_second_order_on_a_known_ode():
    """dx/dt = -x from t=0 to 1: x(1) = x(0) / e; Heun's error shrinks ~4x per halving, Euler's ~2x."""
    x0 = noise((1, 2, 4, 2, 2), 8)
    model = FieldModel(lambda x, t: -x)
    inputs = SampleInputs(tiny_pipeline().encode_text(["x"]), torch.zeros(1, 6), FrameReplacementPlan.for_task(Task.T2V, 4))

    def error(stepper, steps):
        out = sample(model, x0, inputs, SamplerConfig(steps=steps, stepper=stepper, guidance=GuidanceConfig("none")))
        return (out - x0 / math.e).abs().max().item()

    euler, heun = [error(Stepper.EULER, n) for n in (10, 20)], [error(Stepper.HEUN, n) for n in (10, 20)]
    assert 1.8 < euler[0] / euler[1] < 2.2
    assert 3.0 < heun[0] / heun[1] < 5.0 and heun[1] < euler[1] / 10


def test_callback_sees_every_step_and_can_stop_the_run():
    pipe = tiny_pipeline()
    inputs = inputs_for(pipe, ["red"], FrameReplacementPlan.for_task(Task.T2V, 4))
    seen = []
    sample(pipe.model, noise((1, 12, 4, 4, 4)), inputs, SamplerConfig(steps=5, shift=2.0),
           callback=lambda info: seen.append((info.step, info.total, info.t, info.denoised.shape)))
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5] and seen[-1][2] == 1.0
    assert all(a[2] < b[2] for a, b in zip(seen, seen[1:])) and seen[0][3] == (1, 12, 4, 4, 4)
    calls = []
    with pytest.raises(GenerationCancelled, match="after step 2 of 5"):
        sample(pipe.model, noise((1, 12, 4, 4, 4)), inputs, SamplerConfig(steps=5),
               callback=lambda info: calls.append(info.step) or info.step < 2)
    assert calls == [1, 2]


def test_mismatched_inputs_are_refused_before_any_step():
    pipe = tiny_pipeline()
    inputs = inputs_for(pipe, ["red"], FrameReplacementPlan.for_task(Task.T2V, 4))
    with pytest.raises(ValueError, match="plan is for 4 frames"):
        sample(pipe.model, noise((1, 12, 6, 4, 4)), inputs, SamplerConfig(steps=2))
    with pytest.raises(ValueError, match="batch"):
        sample(pipe.model, noise((2, 12, 4, 4, 4)), inputs, SamplerConfig(steps=2))
    with pytest.raises(ValueError, match="multiple of 2"):
        sample(pipe.model, noise((1, 12, 5, 4, 4)), inputs, SamplerConfig(steps=2))
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
