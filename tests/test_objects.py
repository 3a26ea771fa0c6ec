"""The multi-view object domain: the renderer's geometry and shading against closed forms, the camera layout,
determinism and the held-out split."""
import math

import pytest
import torch

from stiv_core.data import objects
from stiv_core.data.objects import (NUM_VIEWS, SOLIDS, VIEWS, ObjectParams, ObjectsDataset, all_combinations,
                                    held_out, render, render_view)
from stiv_core.data.sample import SampleKey
from stiv_core.data.shapes import BACKGROUNDS, COLORS


def rgb(image, y, x):
    return ((image[:, y, x] + 1) / 2).tolist()


def test_the_camera_layout_is_zero123pp_with_the_input_first():
    assert NUM_VIEWS == 8 and NUM_VIEWS % 2 == 0  # fits temporal patch 2
    assert VIEWS[0] == (0.0, objects.INPUT_ELEVATION)
    assert [a for a, _ in VIEWS[1:7]] == [30, 90, 150, 210, 270, 330]
    assert [e for _, e in VIEWS[1:7]] == [20, -10, 20, -10, 20, -10]
    assert VIEWS[7] == (180.0, objects.INPUT_ELEVATION)  # the back view


def test_a_cube_shows_the_face_that_faces_the_camera():
    cube = ObjectParams("cube", ("red", "blue"), "gray")
    first, second = (torch.tensor(COLORS[c]) for c in cube.colors)
    for azimuth, color in ((90.0, first), (270.0, second)):  # the camera on the +x / -x axis: one face, one colour
        view = render_view(cube, azimuth, 0.0, 32, 32)
        centre = torch.tensor(rgb(view, 16, 16))
        shade = centre / color.clamp_min(1e-6)
        assert torch.allclose(centre, color * shade[color.argmax()], atol=2e-3), (azimuth, centre)
    front = render_view(cube, 0.0, 0.0, 32, 32)  # the camera on +z: the +x half is on the image's right
    right, left = torch.tensor(rgb(front, 16, 20)), torch.tensor(rgb(front, 16, 11))
    assert right.argmax() == first.argmax() and left.argmax() == second.argmax()


def test_lambert_shading_at_the_sphere_centre_is_the_closed_form():
    sphere = ObjectParams("sphere", ("green", "purple"), "black")
    eye, _, light = objects.camera_rays(90.0, 0.0, 2, 2)
    normal = eye / eye.norm()  # the centre of the sphere's silhouette faces the camera
    shade = objects.AMBIENT + objects.DIFFUSE * float((normal * light).sum().clamp_min(0))
    view = render_view(sphere, 90.0, 0.0, 63, 63)  # odd size: a pixel centred on the axis
    torch.testing.assert_close(torch.tensor(rgb(view, 31, 31)), torch.tensor(COLORS["green"]) * shade,
                               atol=5e-3, rtol=0)


def test_the_sphere_silhouette_has_the_projected_area():
    sphere = ObjectParams("sphere", ("red", "blue"), "white")
    size = 64
    view = render_view(sphere, 0.0, 0.0, size, size)
    background = torch.tensor(BACKGROUNDS["white"]) * 2 - 1
    covered = ((view - background[:, None, None]).abs().amax(0) > 1e-6).float().sum()
    half_angle = math.asin(objects.SIZE / objects.CAMERA_DISTANCE)
    radius = math.tan(half_angle) / math.tan(math.radians(objects.FIELD_OF_VIEW) / 2) * size / 2
    assert covered.item() == pytest.approx(math.pi * radius ** 2, rel=0.05)


@pytest.mark.parametrize("solid", SOLIDS)
def test_every_solid_is_inside_the_frame_in_every_view_on_an_exact_background(solid):
    clip = render(ObjectParams(solid, ("yellow", "orange"), "gray", azimuth=17.0), 32, 32)
    assert clip.shape == (3, NUM_VIEWS, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    gray = BACKGROUNDS["gray"][0] * 2 - 1
    border = torch.cat([clip[:, :, 0], clip[:, :, -1], clip[:, :, :, 0], clip[:, :, :, -1]], dim=-1)
    assert torch.all((border - gray).abs() < 1e-6)  # the object never touches the frame's edge
    object_pixels = ((clip - gray).abs().amax(0) > 1e-6).flatten(1).sum(1)
    assert (object_pixels > 40).all()  # and is seen in every view
    assert not torch.equal(clip[:, 0], clip[:, 4])  # views differ


def test_the_same_seed_gives_the_same_clip_and_indices_differ():
    a, b = ObjectsDataset(10, seed=3), ObjectsDataset(10, seed=3)
    key = SampleKey(index=4, bucket=(NUM_VIEWS, 32, 32), seed=0)
    first, again = a[key], b[key]
    assert torch.equal(first.pixels, again.pixels) and first.caption == again.caption
    assert not torch.equal(a[SampleKey(index=5, bucket=(NUM_VIEWS, 32, 32), seed=0)].pixels, first.pixels)
    assert first.caption.startswith("a ") and first.caption.endswith(" background")
    assert first.micro.num_frames == NUM_VIEWS
    with pytest.raises(ValueError, match="8 frames"):
        a[SampleKey(index=0, bucket=(16, 32, 32), seed=0)]


def test_held_out_combinations_are_never_trained_on():
    train = set(ObjectsDataset(1).combinations)
    heldout = set(ObjectsDataset(1, split="heldout").combinations)
    assert train and heldout and not train & heldout
    assert train | heldout == set(all_combinations())
    assert len(heldout) / len(all_combinations()) == pytest.approx(1 / objects.HELD_OUT_EVERY, abs=0.05)
    assert all(held_out(c) for c in heldout)


@pytest.mark.parametrize("bad", [dict(solid="torus"), dict(colors=("red", "red")), dict(colors=("red", "pink")),
                                 dict(background="blue")])
def test_bad_params_say_what_is_allowed(bad):
    with pytest.raises(ValueError):
        ObjectParams(**{**dict(solid="cube", colors=("red", "blue"), background="gray"), **bad})
