"""AdaFactor (beta1 0.9, fixed beta2 0.999) against a float64 reference, and the LR schedule."""
import math

import pytest
import torch

from stiv_core.training.config import ConfigError, OptimConfig, OptimizerKind
from stiv_core.training.optim import AdaFactor, build_optimizer, build_scheduler, warmup_stable_decay


def reference_adafactor(p0, grads, *, lr, beta1=0.9, beta2=0.999, eps=1e-30, clip=1.0, wd=0.0):
    """Shazeer & Stern's algorithm written out in float64 with explicit loops over rows/columns."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    factored = p.dim() >= 2
    rows, cols = (p.shape[-2], p.shape[-1]) if factored else (1, p.shape[-1])
    R = torch.zeros(p.shape[:-1], dtype=torch.float64) if factored else None
    C = torch.zeros(p.shape[:-2] + (cols,), dtype=torch.float64) if factored else None
    V = torch.zeros_like(p)
    for step, g in enumerate(grads, 1):
        g = g.double()
        g2 = g * g + eps
        if factored:
            R = beta2 * R + (1 - beta2) * g2.mean(-1)
            C = beta2 * C + (1 - beta2) * g2.mean(-2)
            v = torch.empty_like(p)
            for i in range(rows):
                for j in range(cols):
                    v[..., i, j] = R[..., i] * C[..., j] / R.mean(-1)
        else:
            V = beta2 * V + (1 - beta2) * g2
            v = V
        v = v / (1 - beta2 ** step)
        u = g / v.sqrt()
        u = u / max(1.0, math.sqrt(float((u * u).mean())) / clip)
        m = beta1 * m + (1 - beta1) * u
        p = p * (1 - lr * wd) - lr * m
    return p


@pytest.mark.parametrize("shape", [(5,), (4, 6), (3, 4, 5)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adafactor_matches_float64_reference(shape, wd):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(shape, generator=gen)
    # Gradients of different scales, so update clipping both triggers and does not.
    grads = [torch.randn(shape, generator=gen) * scale for scale in (1.0, 3.0, 0.01, 1.0, 10.0)]
    param = torch.nn.Parameter(p0.clone())
    opt = AdaFactor([param], lr=0.05, weight_decay=wd)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = reference_adafactor(p0, grads, lr=0.05, wd=wd)
    assert not torch.allclose(param.double(), p0.double(), atol=1e-3)  # it moved
    torch.testing.assert_close(param.double(), expected, rtol=1e-5, atol=1e-6)


def test_adafactor_first_step_is_clipped_to_unit_rms():
    """With bias correction, the first normalised update is sign-like; clipping keeps RMS <= 1."""
    param = torch.nn.Parameter(torch.zeros(8, 8))
    opt = AdaFactor([param], lr=1.0, beta1=0.0)
    param.grad = torch.randn(8, 8) * 1e3
    opt.step()
    rms = param.detach().square().mean().sqrt()
    assert 0.5 < float(rms) <= 1.0 + 1e-6


def test_adafactor_state_is_float32_for_bf16_params():
    param = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = AdaFactor([param])
    param.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    assert {v.dtype for v in opt.state[param].values()} == {torch.float32}


def test_warmup_then_constant():
    factor = warmup_stable_decay(4)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_stable_decay(0)(0) == 1.0
    param = torch.nn.Parameter(torch.zeros(2))
    config = OptimConfig(name=OptimizerKind.ADAMW, lr=1e-3, warmup_steps=2)
    opt = build_optimizer([param], config)
    sched = build_scheduler(opt, config)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])


def test_decay_is_linear_from_its_start_to_the_floor_and_stays_there():
    factor = warmup_stable_decay(2, decay_start=4, decay_steps=4, min_ratio=0.2)
    assert [factor(s) for s in range(11)] == pytest.approx([0.5, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2])
    assert warmup_stable_decay(0, decay_start=0, decay_steps=2)(1) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        OptimConfig(min_lr_ratio=1.5)
    with pytest.raises(ConfigError, match="optim.decay_steps"):
        OptimConfig(decay_steps=-1)


def test_a_constant_run_resumed_with_a_decay_anneals_from_where_it_stopped():
    # LambdaLR keeps no function in its state: the schedule of the resuming config applies from the
    # checkpoint's step on, so a constant-LR run can be annealed late (WSD).
    def lrs_after(sched_state, config, steps):
        param = torch.nn.Parameter(torch.zeros(2))
        opt = build_optimizer([param], config)
        sched = build_scheduler(opt, config)
        if sched_state is not None:
            state = sched.state_dict()
            state.update(sched_state)
            sched.load_state_dict(state)
        out = []
        for _ in range(steps):
            param.grad = torch.ones(2)
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out, sched.state_dict()

    constant = OptimConfig(name=OptimizerKind.ADAMW, lr=1e-3, warmup_steps=1)
    _, state = lrs_after(None, constant, 5)                       # 5 steps at 1e-3
    annealed = OptimConfig(name=OptimizerKind.ADAMW, lr=1e-3, warmup_steps=1, decay_start=5, decay_steps=4)
    lrs, _ = lrs_after(state, annealed, 5)                        # the LR for steps 6..10
    assert lrs == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0, 0.0])


def test_build_optimizer_kinds_and_frozen_params_left_out():
    train, frozen = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    for kind, cls in ((OptimizerKind.ADAFACTOR, AdaFactor), (OptimizerKind.ADAMW, torch.optim.AdamW)):
        opt = build_optimizer([train, frozen], OptimConfig(name=kind))
        assert isinstance(opt, cls)
        assert opt.param_groups[0]["params"] == [train]
        assert opt.param_groups[0]["betas" if kind == OptimizerKind.ADAMW else "beta2"] in ((0.9, 0.999), 0.999)
