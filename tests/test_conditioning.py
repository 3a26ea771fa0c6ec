"""Frame-replacement plans: one per task, their masks, replacement and re-noising."""
import pytest
import torch

from stiv_core.conditioning import FrameReplacementPlan, MicroConditions, Task, given_frames
from stiv_core.config import MICRO_CONDITIONS


def latents(b=2, c=3, t=8, seed=0):
    return torch.randn(b, c, t, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_each_task_gives_its_frames():
    clip = latents()
    assert FrameReplacementPlan.for_task(Task.T2V, 8).given == ()
    assert FrameReplacementPlan.for_task(Task.TI2V, 8, clip[:, :, 0]).given == (0,)
    assert FrameReplacementPlan.for_task(Task.PREDICTION, 8, clip[:, :, :3]).given == (0, 1, 2)
    assert FrameReplacementPlan.interpolation(clip[:, :, 0], clip[:, :, 7], 8).given == (0, 7)
    keys = FrameReplacementPlan.for_task(Task.KEYFRAMES, 8, clip[:, :, ::3], stride=3)
    assert keys.given == (0, 3, 6)
    torch.testing.assert_close(keys.clean, clip[:, :, [0, 3, 6]])


def test_replace_puts_clean_frames_in_place_and_leaves_the_input_alone():
    clean, noisy = latents(seed=0), latents(seed=1)
    plan = FrameReplacementPlan.interpolation(clean[:, :, 0], clean[:, :, 7], 8)
    before = noisy.clone()
    out = plan.replace(noisy)
    assert torch.equal(noisy, before)
    assert torch.equal(out[:, :, [0, 7]], clean[:, :, [0, 7]])
    assert torch.equal(out[:, :, 1:7], noisy[:, :, 1:7])


def test_masks_mark_given_frames():
    plan = FrameReplacementPlan.for_task(Task.PREDICTION, 8, latents()[:, :, :2])
    mask = plan.frame_mask(2)
    assert mask.dtype == torch.bool and mask.shape == (2, 8)
    assert mask[:, :2].all() and not mask[:, 2:].any()
    assert torch.equal(plan.loss_weight(2), (~mask).float())


def test_renoise_follows_the_flow_path_of_the_given_frames():
    clean, state, noise = latents(seed=0), latents(seed=1), latents(seed=2)
    plan = FrameReplacementPlan.for_task(Task.TI2V, 8, clean[:, :, 0])
    out = plan.renoise(state, noise, 0.25)
    torch.testing.assert_close(out[:, :, 0], 0.25 * clean[:, :, 0] + 0.75 * noise[:, :, 0])
    assert torch.equal(out[:, :, 1:], state[:, :, 1:])
    assert torch.equal(plan.renoise(state, noise, 1.0)[:, :, 0], clean[:, :, 0])


@pytest.mark.parametrize("make,match", [
    (lambda c: FrameReplacementPlan(8, (0, 8), c[:, :, :2]), "outside"),
    (lambda c: FrameReplacementPlan(8, (1, 1), c[:, :, :2]), "repeat"),
    (lambda c: FrameReplacementPlan(8, (0,), None), "no clean latents"),
    (lambda c: FrameReplacementPlan(8, (0, 1), c[:, :, :1]), "clean latents must be"),
    (lambda c: FrameReplacementPlan.for_task(Task.KEYFRAMES, 8, c[:, :, :4], stride=3), "need 10 frames"),
    (lambda c: FrameReplacementPlan.interpolation(c[:, :, 0], c[:, :, 1], 1), "at least 2"),
])
def test_bad_plans_say_what_is_wrong(make, match):
    with pytest.raises(ValueError, match=match):
        make(latents())


def test_replace_refuses_latents_of_another_shape():
    plan = FrameReplacementPlan.for_task(Task.TI2V, 8, latents()[:, :, 0])
    with pytest.raises(ValueError, match="do not match the plan"):
        plan.replace(latents(t=6))


def test_micro_conditions_are_in_the_model_order():
    micro = MicroConditions(height=256, width=320, num_frames=20, crop_top=3, crop_left=5, frame_stride=2)
    row = micro.tensor(3)
    assert row.shape == (3, 6)
    # the order is part of every trained checkpoint (one embedder per column): pinned, not derived
    assert MICRO_CONDITIONS == ("height", "width", "crop_top", "crop_left", "frame_stride", "num_frames")
    assert row[1].tolist() == [256.0, 320.0, 3.0, 5.0, 2.0, 20.0]


def test_given_frames_is_the_one_rule_for_every_task():
    assert given_frames(Task.T2V, 8) == ()
    assert given_frames(Task.TI2V, 8) == (0,)
    assert given_frames(Task.LAST_FRAME, 8) == (7,)
    assert given_frames(Task.INTERPOLATION, 8) == (0, 7)
    assert given_frames(Task.PREDICTION, 8, count=3) == (0, 1, 2)
    assert given_frames(Task.KEYFRAMES, 8, count=3, stride=3) == (0, 3, 6)
    assert set(Task) == set(_TASK_EXAMPLES)  # a new task needs a line above and in _TASK_EXAMPLES


_TASK_EXAMPLES = {Task.T2V: 0, Task.TI2V: 1, Task.LAST_FRAME: 1, Task.INTERPOLATION: 2, Task.PREDICTION: 3,
                  Task.KEYFRAMES: 3}


@pytest.mark.parametrize("task", list(Task))
def test_each_plan_constructor_gives_what_given_frames_says(task):
    clip, count = latents(), _TASK_EXAMPLES[task]
    frames = None if count == 0 else clip[:, :, :count]
    plan = FrameReplacementPlan.for_task(task, 8, frames, stride=2)
    assert plan.given == given_frames(task, 8, count=count, stride=2)
    assert torch.equal(plan.frame_mask(2)[0].nonzero().flatten(), torch.tensor(plan.given, dtype=torch.long))


@pytest.mark.parametrize("call,match", [
    (lambda: given_frames(Task.TI2V, 8, count=2), "gives 1 frame, got 2"),
    (lambda: given_frames(Task.PREDICTION, 8), "needs the number of given frames"),
    (lambda: given_frames(Task.PREDICTION, 4, count=5), "need 5 frames"),
    (lambda: given_frames(Task.KEYFRAMES, 8, count=3, stride=0), "stride must be >= 1"),
    (lambda: given_frames("bogus", 8), "bogus"),
])
def test_given_frames_refuses_what_does_not_fit(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_per_sample_plan_replaces_renoises_and_masks_each_sample_on_its_own():
    clip, state, noise = latents(seed=0), latents(seed=1), latents(seed=2)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 0], mask[1, [0, 7]] = True, True
    plan = FrameReplacementPlan.per_sample(clip, mask)
    assert torch.equal(plan.frame_mask(2), mask) and torch.equal(plan.loss_weight(2), (~mask).float())
    out = plan.replace(state)
    assert torch.equal(out[0, :, 0], clip[0, :, 0]) and torch.equal(out[0, :, 1:], state[0, :, 1:])
    assert torch.equal(out[1, :, [0, 7]], clip[1, :, [0, 7]]) and torch.equal(out[1, :, 1:7], state[1, :, 1:7])
    noisy = plan.renoise(state, noise, 0.25)
    torch.testing.assert_close(noisy[1, :, 7], 0.25 * clip[1, :, 7] + 0.75 * noise[1, :, 7])
    assert torch.equal(noisy[0, :, 7], state[0, :, 7])
    with pytest.raises(ValueError, match="do not match"):
        plan.replace(latents(t=6))
    with pytest.raises(ValueError, match="batch of 2"):
        plan.frame_mask(3)
