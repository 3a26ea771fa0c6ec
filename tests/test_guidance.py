"""Guidance as pure functions: CFG, JIT-CFG, SIT-CFG, renormalization and their validation."""
import math

import pytest
import torch

from stiv_core.sampling import guidance as G
from stiv_core.sampling.guidance import GuidanceConfig, GuidanceMode


def velocities(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 6, 3, 3, generator=g, dtype=torch.float64) for _ in range(n)]


def test_sit_with_equal_scales_equals_jit():
    v_full, v_image, v_null = velocities()
    for s in (0.0, 1.0, 4.5, 7.5):
        sit = G.separate_image_text_cfg(v_full, v_image, v_null, scale_text=s, scale_image=s)
        torch.testing.assert_close(sit, G.joint_image_text_cfg(v_full, v_null, s))


def test_scale_one_is_the_conditional_velocity():
    v_full, v_image, v_null = velocities()
    torch.testing.assert_close(G.cfg(v_full, v_null, 1.0), v_full)
    torch.testing.assert_close(G.joint_image_text_cfg(v_full, v_null, 1.0), v_full)
    torch.testing.assert_close(G.separate_image_text_cfg(v_full, v_image, v_null, scale_text=1, scale_image=1), v_full)
    # scale 0 is the unconditional one
    torch.testing.assert_close(G.cfg(v_full, v_null, 0.0), v_null)


def test_sit_matches_the_paper_formula():
    v_full, v_image, v_null = velocities()
    st, si = 7.5, 1.5
    expected = v_null + si * (v_image - v_null) + st * (v_full - v_image)
    torch.testing.assert_close(G.separate_image_text_cfg(v_full, v_image, v_null, scale_text=st, scale_image=si), expected)


def test_renormalization_keeps_the_conditional_norm_per_sample():
    v_full, _, v_null = velocities()
    v_full[1] *= 10  # samples with very different norms stay separate
    guided = G.renormalize(G.cfg(v_full, v_null, 7.5), v_full)
    for i in range(2):
        assert guided[i].norm().item() == pytest.approx(v_full[i].norm().item(), rel=1e-12)
    direction = G.cfg(v_full, v_null, 7.5)
    cosine = torch.nn.functional.cosine_similarity(guided.flatten(1), direction.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(2, dtype=torch.float64))


def test_renormalization_measures_only_the_generated_frames():
    # A given frame's velocity is unconstrained (loss-masked in training; replacement overwrites it): a
    # huge value there must not shrink the generated frames' velocity.
    v_full, _, v_null = velocities()
    generated = torch.ones(2, 6, dtype=torch.bool)
    generated[:, 0] = False
    reference = G.renormalize(G.cfg(v_full[:, :, 1:], v_null[:, :, 1:], 7.5), v_full[:, :, 1:])
    v_null[:, :, 0] *= 1e4
    guided = G.renormalize(G.cfg(v_full, v_null, 7.5), v_full, generated)
    torch.testing.assert_close(guided[:, :, 1:], reference)
    config = GuidanceConfig("jit", scale=7.5, renormalize=True)
    torch.testing.assert_close(G.combine(config, [v_full, v_null], generated)[:, :, 1:], reference)
    # without the mask the given frame sets the scale: what this guards against
    unmasked = G.renormalize(G.cfg(v_full, v_null, 7.5), v_full)
    assert unmasked[:, :, 1:].norm() < 0.1 * reference.norm()


@pytest.mark.parametrize("mode,passes", [("none", 1), ("cfg", 2), ("jit", 2), ("sit", 3)])
def test_combine_uses_the_passes_of_each_mode(mode, passes):
    config = GuidanceConfig(mode, scale=3.0, image_scale=2.0)
    assert len(config.passes) == passes and config.passes[0] == G.FULL
    vs = velocities(passes)
    out = G.combine(config, vs)
    expected = {"none": lambda: vs[0], "cfg": lambda: vs[1] + 3.0 * (vs[0] - vs[1]),
                "jit": lambda: vs[1] + 3.0 * (vs[0] - vs[1]),
                "sit": lambda: vs[2] + 2.0 * (vs[1] - vs[2]) + 3.0 * (vs[0] - vs[1])}[mode]()
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="takes"):
        G.combine(config, vs + vs)


def test_passes_drop_what_each_mode_says():
    assert GuidanceConfig("jit").passes == (G.Pass(False, False), G.Pass(True, True))
    assert GuidanceConfig("cfg").passes == (G.Pass(False, False), G.Pass(True, False))
    assert GuidanceConfig("sit").passes == (G.Pass(False, False), G.Pass(True, False), G.Pass(True, True))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "7"])
def test_bad_scales_are_refused(bad):
    with pytest.raises(ValueError, match="scale"):
        GuidanceConfig(GuidanceMode.JIT, scale=bad)
    with pytest.raises(ValueError, match="image_scale"):
        GuidanceConfig(GuidanceMode.SIT, image_scale=bad)


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="jit"):
        GuidanceConfig("joint")
