"""Frame-replacement plans: one per task, their masks, replacement and re-noising."""
import pytest
import torch

from stiv_core.conditioning import FrameReplacementPlan, MicroConditions
from stiv_core.config import MICRO_CONDITIONS


def latents(b=2, c=3, t=8, seed=0):
    return torch.randn(b, c, t, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_each_task_gives_its_frames():
    clip = latents()
    assert FrameReplacementPlan.text_to_video(8).given == ()
    assert FrameReplacementPlan.first_frame(clip[:, :, 0], 8).given == (0,)
    assert FrameReplacementPlan.prediction(clip[:, :, :3], 8).given == (0, 1, 2)
    assert FrameReplacementPlan.interpolation(clip[:, :, 0], clip[:, :, 7], 8).given == (0, 7)
    keys = FrameReplacementPlan.keyframes(clip[:, :, ::3], 8, stride=3)
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
    plan = FrameReplacementPlan.prediction(latents()[:, :, :2], 8)
    mask = plan.frame_mask(2)
    assert mask.dtype == torch.bool and mask.shape == (2, 8)
    assert mask[:, :2].all() and not mask[:, 2:].any()
    assert torch.equal(plan.loss_weight(2), (~mask).float())


def test_renoise_follows_the_flow_path_of_the_given_frames():
    clean, state, noise = latents(seed=0), latents(seed=1), latents(seed=2)
    plan = FrameReplacementPlan.first_frame(clean[:, :, 0], 8)
    out = plan.renoise(state, noise, 0.25)
    torch.testing.assert_close(out[:, :, 0], 0.25 * clean[:, :, 0] + 0.75 * noise[:, :, 0])
    assert torch.equal(out[:, :, 1:], state[:, :, 1:])
    assert torch.equal(plan.renoise(state, noise, 1.0)[:, :, 0], clean[:, :, 0])


@pytest.mark.parametrize("make,match", [
    (lambda c: FrameReplacementPlan(8, (0, 8), c[:, :, :2]), "outside"),
    (lambda c: FrameReplacementPlan(8, (1, 1), c[:, :, :2]), "repeat"),
    (lambda c: FrameReplacementPlan(8, (0,), None), "no clean latents"),
    (lambda c: FrameReplacementPlan(8, (0, 1), c[:, :, :1]), "clean latents must be"),
    (lambda c: FrameReplacementPlan.keyframes(c[:, :, :4], 8, stride=3), "need 10 frames"),
    (lambda c: FrameReplacementPlan.interpolation(c[:, :, 0], c[:, :, 1], 1), "at least 2"),
])
def test_bad_plans_say_what_is_wrong(make, match):
    with pytest.raises(ValueError, match=match):
        make(latents())


def test_replace_refuses_latents_of_another_shape():
    plan = FrameReplacementPlan.first_frame(latents()[:, :, 0], 8)
    with pytest.raises(ValueError, match="do not match the plan"):
        plan.replace(latents(t=6))


def test_micro_conditions_are_in_the_model_order():
    micro = MicroConditions(height=256, width=320, num_frames=20, crop_top=3, crop_left=5, frame_stride=2)
    row = micro.tensor(3)
    assert row.shape == (3, 6)
    # the order is part of every trained checkpoint (one embedder per column): pinned, not derived
    assert MICRO_CONDITIONS == ("height", "width", "crop_top", "crop_left", "frame_stride", "num_frames")
    assert row[1].tolist() == [256.0, 320.0, 3.0, 5.0, 2.0, 20.0]
