"""The procedural domain: captions, held-out split, rendering on the torus, determinism."""
import pytest
import torch

from stiv_core.data.sample import SampleKey
from stiv_core.data.shapes import (BACKGROUNDS, COLORS, ShapeParams, ShapesDataset, all_combinations, held_out,
                                   parse_caption, render)


def test_captions_round_trip_and_bad_ones_fail():
    params = ShapeParams("triangle", "orange", "gray", "up")
    assert params.caption == "a orange triangle moving up on a gray background"
    assert parse_caption(params.caption).combination == params.combination
    with pytest.raises(ValueError, match="names no shape"):
        parse_caption("a red blob moving left on a blue background")
    with pytest.raises(ValueError, match="invisible"):
        ShapeParams("circle", "white", "white", "left")


def test_held_out_split_is_disjoint_and_covers_every_word():
    combos = all_combinations()
    test = [c for c in combos if held_out(c)]
    train = [c for c in combos if not held_out(c)]
    assert 0.05 < len(test) / len(combos) < 0.25
    for position in range(4):  # every colour/shape/direction/background is still seen in training
        assert {c[position] for c in test} <= {c[position] for c in train}
    data = ShapesDataset(200, split="train")
    assert all(not held_out(data.params(i).combination) for i in range(200))


def test_render_draws_the_object_in_its_colour_and_moves_it():
    params = ShapeParams("square", "red", "blue", "right", speed=0.05, radius=0.2, start=(0.3, 0.5))
    video = render(params, 4, 32, 32)
    assert video.shape == (3, 4, 32, 32) and video.min() >= -1 and video.max() <= 1
    rgb = (video + 1) / 2
    red = (rgb - torch.tensor(COLORS["red"])[:, None, None, None]).abs().sum(0) < 1e-6
    blue = (rgb - torch.tensor(BACKGROUNDS["blue"])[:, None, None, None]).abs().sum(0) < 1e-6
    assert torch.all(red | blue)
    xs = [red[t].nonzero()[:, 1].float().mean().item() for t in range(4)]
    assert all(b - a == pytest.approx(0.05 * 32, abs=1.0) for a, b in zip(xs, xs[1:]))
    assert red[0].sum() == red[3].sum()  # same object on every frame


def test_objects_wrap_around_instead_of_leaving():
    params = ShapeParams("circle", "yellow", "black", "left", speed=0.045, radius=0.2, start=(0.1, 0.5))
    video = render(params, 64, 32, 32)
    area = ((video + 1) / 2 - torch.tensor(BACKGROUNDS["black"])[:, None, None, None]).abs().sum(0).gt(0).sum((1, 2))
    assert area.min() > 0.9 * area.max()  # the whole disc on every frame (up to pixel aliasing)


def test_dataset_is_deterministic_and_uses_the_key():
    data = ShapesDataset(10, seed=3, frame_strides=(1, 2, 3))
    a, b = data[SampleKey(4, (8, 32, 32), seed=11)], data[SampleKey(4, (8, 32, 32), seed=11)]
    assert torch.equal(a.pixels, b.pixels) and a.caption == b.caption
    assert a.pixels.shape == (3, 8, 32, 32) and a.micro.frame_stride in (1, 2, 3)
    assert data[SampleKey(5, (8, 32, 32), seed=11)].caption != a.caption
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(1, split="test")
