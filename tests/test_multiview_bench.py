"""The multi-view evaluator: ~100% on the true renders, the repeat-the-input baseline well below, SSIM equal to
scikit-image's, the given view checked."""
import pytest
import torch

from stiv_core.data.objects import NUM_VIEWS, ObjectParams, render
from stiv_core.metrics import ssim
from stiv_core.multiview_bench import (MultiviewConfig, heldout_objects, object_mask, repeat_input, run_multiview,
                                       score_clip, truth, view_correct, visible_colors)

CONFIG = MultiviewConfig()
OBJECTS = heldout_objects()[:6]


def true_model(caption, input_view, seed):
    combination = next(c for c in OBJECTS if truth(c, CONFIG, seed)[0].caption == caption)
    return truth(combination, CONFIG, seed)[1]


def test_the_truth_scores_full_marks_and_the_baseline_does_not():
    rows = []
    results = run_multiview(true_model, CONFIG, objects=OBJECTS, rows=rows)
    got, base = results["multiview"], results["multiview_baseline"]
    assert got["view_acc"] == 1.0 and got["psnr"] == 100.0 and got["ssim"] == pytest.approx(1.0)
    assert got["input_psnr"] == base["input_psnr"] == 100.0  # the baseline keeps the input view too
    assert base["view_acc"] < 0.7 and base["psnr"] < 30 and base["ssim"] < 0.95
    assert len(rows) == 2 * len(OBJECTS) and {r["task"] for r in rows} == {"multiview", "multiview_baseline"}


def test_ssim_is_scikit_images_gaussian_ssim():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(3, 32, 32, generator=g)).clamp(-1, 1)
    ours = ssim(a, b)
    theirs = metrics.structural_similarity(((a + 1) / 2).double().numpy(), ((b + 1) / 2).double().numpy(),
                                           channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False)
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)


def test_a_view_is_right_only_with_its_colours_and_its_silhouette():
    params = ObjectParams("cube", ("red", "blue"), "gray", azimuth=0.0)
    clip = render(params, 32, 32)
    front = clip[:, 0]  # the camera between the halves: both colours
    assert visible_colors(front, object_mask(front, "gray")) == {"red", "blue"}
    assert view_correct(front, front, "gray")
    other = render(ObjectParams("cube", ("red", "green"), "gray", azimuth=0.0), 32, 32)[:, 0]
    assert not view_correct(other, front, "gray")                      # a wrong colour
    sphere = render(ObjectParams("sphere", ("red", "blue"), "gray", azimuth=0.0), 32, 32)[:, 0]
    assert not view_correct(sphere, front, "gray")                     # a wrong silhouette
    background = torch.full_like(front, 0.0)                          # gray is 0.0 in [-1, 1]
    assert not view_correct(background, front, "gray")                 # no object at all


def test_a_changed_input_view_and_a_wrong_shape_are_reported():
    params, clip = truth(OBJECTS[0], CONFIG, 0)
    made = repeat_input(params.caption, clip[:, 0], 0)
    assert made.shape == (3, NUM_VIEWS, 32, 32)
    made[:, 0] += 0.5
    assert score_clip(made, clip, params.background)["input_psnr"] < 20
    with pytest.raises(ValueError, match="true clip"):
        score_clip(made[:, :4], clip, params.background)
