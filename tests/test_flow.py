"""The flow-matching convention (t = 0 noise, t = 1 data), its loss and time sampling."""
import math

import pytest
import torch

from stiv_core import flow
from stiv_core.conditioning import FrameReplacementPlan, Task
from tests.fakes import tiny_pipeline


def test_interpolation_endpoints_and_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(0)
    x1, noise = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    assert torch.equal(flow.interpolate(x1, noise, torch.zeros(2)), noise)
    assert torch.equal(flow.interpolate(x1, noise, torch.ones(2)), x1)
    t, h = torch.tensor([0.3, 0.7], dtype=torch.float64), 1e-6
    x1, noise = x1.double(), noise.double()
    numeric = (flow.interpolate(x1, noise, t + h) - flow.interpolate(x1, noise, t - h)) / (2 * h)
    torch.testing.assert_close(numeric, flow.velocity_target(x1, noise), rtol=1e-6, atol=1e-6)


def test_data_prediction_converts_to_the_same_velocity():
    g = torch.Generator().manual_seed(1)
    x1, noise = torch.randn(3, 2, 2, 4, 4, generator=g).double(), torch.randn(3, 2, 2, 4, 4, generator=g).double()
    t = torch.tensor([0.0, 0.4, 0.9], dtype=torch.float64)
    x_t = flow.interpolate(x1, noise, t)
    v = flow.velocity_from_prediction(x1, x_t, t, "data")
    torch.testing.assert_close(v, flow.velocity_target(x1, noise))
    torch.testing.assert_close(flow.data_from_velocity(v, x_t, t), x1)
    with pytest.raises(ValueError, match="prediction kind"):
        flow.velocity_from_prediction(x1, x_t, t, "epsilon")


def test_clamp_data_clamps_the_implied_clean_sample_and_keeps_one_in_range():
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    x1 = 3 * torch.randn(2, 3, 2, 4, 4, generator=g, dtype=torch.float64)   # mostly out of [-1, 1]
    for t in (0.0, 0.5, 0.9):
        v = flow.velocity_from_prediction(x1, x_t, torch.full((2,), t, dtype=torch.float64), "data")
        clamped = flow.clamp_data(v, x_t, t, 1.0)
        torch.testing.assert_close(flow.data_from_velocity(clamped, x_t, torch.tensor(t, dtype=torch.float64)),
                                   x1.clamp(-1, 1))
        inside = x1.abs() <= 1
        torch.testing.assert_close(clamped[inside], v[inside])   # in-range values: the velocity unchanged
    # past 1 - MIN_REMAINING_TIME the floor of `velocity_from_prediction` is used, never a division by ~0
    assert torch.isfinite(flow.clamp_data(torch.ones(3), torch.zeros(3), 1.0, 0.5)).all()


def test_loss_counts_only_weighted_frames():
    pred, target = torch.zeros(1, 1, 3, 2, 2), torch.zeros(1, 1, 3, 2, 2)
    pred[:, :, 0] = 10.0  # a huge error on frame 0 only
    pred[:, :, 2] = 1.0
    weight = torch.tensor([[0.0, 1.0, 1.0]])
    assert flow.flow_loss(pred, target, weight).item() == pytest.approx(0.5)  # frames 1, 2: (0 + 1) / 2
    assert flow.flow_loss(pred, target).item() == pytest.approx((100 + 0 + 1) / 3)
    assert flow.flow_loss(pred, target, torch.zeros(1, 3)).item() == 0.0


def test_given_frames_get_no_gradient_through_frame_replacement_and_loss():
    """Training step: the given frame's noisy input and its prediction never reach the loss."""
    pipe = tiny_pipeline()
    model = pipe.model.train()
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(2, 12, 4, 4, 4, generator=g)
    noise = torch.randn(x1.shape, generator=g)
    plan = FrameReplacementPlan.for_task(Task.TI2V, 4, x1[:, :, 0])
    t = torch.tensor([0.3, 0.8])
    x_t = flow.interpolate(x1, noise, t).requires_grad_(True)
    text = pipe.encode_text(["a red circle", "a blue square"])
    micro = torch.tensor([[8.0, 8.0, 0, 0, 1, 4]]).repeat(2, 1)
    out = model(plan.replace(x_t), t, text, micro, frame_mask=plan.frame_mask(2))
    out.retain_grad()
    loss = flow.flow_loss(out, flow.velocity_target(x1, noise), plan.loss_weight(2))
    loss.backward()
    assert torch.count_nonzero(x_t.grad[:, :, 0]) == 0
    assert torch.count_nonzero(out.grad[:, :, 0]) == 0
    assert torch.count_nonzero(x_t.grad[:, :, 1:]) > 0


def test_shift_keeps_endpoints_and_moves_time_toward_noise():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = flow.shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(shifted[1:-1] < t[1:-1]) and torch.all(shifted.diff() > 0)
    torch.testing.assert_close(flow.shift_time(t, 1.0), t)
    # With noise level sigma = 1 - t this is SD3's formula.
    sigma, s = 1 - t, 3.0
    torch.testing.assert_close(1 - shifted, s * sigma / (1 + (s - 1) * sigma))
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="shift"):
            flow.shift_time(t, bad)


def test_time_sampling_is_seeded_logit_normal():
    a = flow.sample_time(20000, generator=torch.Generator().manual_seed(0))
    b = flow.sample_time(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() > 0 and a.max() < 1
    logit = torch.log(a / (1 - a))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    shifted = flow.sample_time(20000, generator=torch.Generator().manual_seed(0), shift=3.0)
    torch.testing.assert_close(shifted, flow.shift_time(a, 3.0))


def test_flow_loss_with_a_spatial_weight_is_the_mean_over_the_kept_pixels():
    g = torch.Generator().manual_seed(0)
    v, target = torch.randn(2, 3, 4, 6, 6, generator=g), torch.randn(2, 3, 4, 6, 6, generator=g)
    spatial = (torch.rand(2, 6, 6, generator=g) > 0.5).float()
    frames = torch.tensor([[1.0, 1, 0, 1], [0, 1, 1, 1]])
    expected = torch.stack([((v[b, :, t] - target[b, :, t]) ** 2)[:, spatial[b].bool()].mean()
                            for b in range(2) for t in range(4) if frames[b, t]]).mean()
    torch.testing.assert_close(flow.flow_loss(v, target, frames, spatial), expected)
    torch.testing.assert_close(flow.flow_loss(v, target, frames, torch.ones(2, 6, 6)), flow.flow_loss(v, target, frames))
