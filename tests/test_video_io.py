"""Video and image IO: every output format round-trips, bad paths and extensions are clear errors."""
import logging
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from stiv_core.data.shapes import ShapeParams, render
from stiv_core.metrics import psnr
from stiv_core.video_io import output_kind, read_image, read_video, to_uint8_frames, write_video

CLIP = render(ShapeParams("circle", "red", "blue", "left"), 6, 32, 32)


# Bounds: 8-bit quantisation alone gives ~57 dB (lossless WebP); GIF palettes cost a little; mp4 is
# lossy: yuv420p halves the chroma resolution, which costs sharp colour edges at 32 px.
@pytest.mark.parametrize("name,min_psnr", [("clip.gif", 40), ("clip.webp", 50), ("clip.mp4", 24)])
def test_videos_round_trip(tmp_path, name, min_psnr):
    path = write_video(tmp_path / name, CLIP, fps=8)
    back = read_video(path)
    assert back.shape == CLIP.shape
    assert psnr(back, CLIP) >= min_psnr


@pytest.mark.parametrize("fps,rate", [(12.5, "25/2"), (30000 / 1001, "30000/1001"), (8, "8")])
def test_mp4_keeps_a_fractional_frame_rate(tmp_path, fps, rate):
    path = write_video(tmp_path / "clip.mp4", CLIP, fps=fps)
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == Fraction(rate)
    with pytest.raises(ValueError, match="fps must be > 0"):
        write_video(tmp_path / "x.mp4", CLIP, fps=0)


def test_png_folder_and_upscale(tmp_path):
    folder = write_video(tmp_path / "frames", CLIP, upscale=4)
    files = sorted(folder.glob("*.png"))
    assert len(files) == 6
    frame = np.asarray(Image.open(files[2]))
    assert frame.shape == (128, 128, 3)
    expected = ((CLIP[:, 2] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(frame[::4, ::4], expected)


def test_mp4_is_h264_and_odd_sizes_are_padded(tmp_path):
    import av

    path = write_video(tmp_path / "odd.mp4", render(ShapeParams("square", "green", "gray", "up"), 4, 30, 30)[:, :, :29])
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and (stream.width, stream.height) == (30, 30)


def test_unsupported_extension_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"\.mp4, \.gif, \.webp"):
        output_kind("clip.avi")
    assert output_kind("out/") == "png" and output_kind("out") == "png"


def test_images_of_another_size_are_fitted_with_a_warning(tmp_path, caplog):
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # a white square in the middle, black bars on the sides
    Image.fromarray(image).save(tmp_path / "wide.png")
    with caplog.at_level(logging.WARNING):
        pixels = read_image(tmp_path / "wide.png", 32, 32)
    assert "resized" in caplog.text and pixels.shape == (3, 32, 32)
    assert pixels.min() > 0.9  # the centre crop kept only the white part
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_image(tmp_path / "missing.png", 32, 32)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image"):
        read_image(tmp_path / "bad.png", 32, 32)


def test_images_are_read_upright_and_transparency_is_black(tmp_path):
    from stiv_core.data.folders import ImageFolder

    # stored 40 wide x 20 high, left half white; EXIF orientation 6: shown turned 90 degrees clockwise
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_image(tmp_path / "phone.jpg", 40, 20)          # (3, H=40, W=20)
    assert upright.shape == (3, 40, 20)
    assert upright[:, :18].mean() > 0.9 and upright[:, 22:].mean() < -0.9   # the white half is on top now
    (tmp_path / "phone.txt").write_text("a phone photo")
    folder = ImageFolder(str(tmp_path))
    assert folder.probe_size(str(tmp_path / "phone.jpg")) == (40, 20)
    # under alpha 0 the file stores red: it must not show
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert read_image(tmp_path / "clear.png", 8, 8).max() == -1.0


def _gray(mode, value, shape=(6, 8)):
    """A uniform image of a grayscale-like `mode` holding `value`, built from a numpy array."""
    dtype = {"L": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    return Image.fromarray(np.full(shape, value, dtype), mode if mode != "I;16" else None)


# One row per Pillow mode: the image, the file it is saved as (a format that keeps the mode), the RGB
# in [0, 1] it must read as. Mid-gray 16-bit is 32768 / 65535, not white (it was clipped to 255).
MODES = {
    "L": (lambda: _gray("L", 51), "g.png", (0.2, 0.2, 0.2)),
    "I;16": (lambda: _gray("I;16", 32768), "g16.png", (32768 / 65535,) * 3),
    "I": (lambda: _gray("I", 16384), "g32.tif", (16384 / 65535,) * 3),
    "F": (lambda: _gray("F", 0.25), "f.tif", (0.25, 0.25, 0.25)),
    "LA": (lambda: Image.new("LA", (8, 6), (255, 51)), "la.png", (0.2, 0.2, 0.2)),   # white at alpha 0.2
    "P": (lambda: Image.new("RGB", (8, 6), (255, 0, 51)).quantize(4), "p.png", (1.0, 0.0, 0.2)),
    "RGBA": (lambda: Image.new("RGBA", (8, 6), (255, 102, 0, 51)), "rgba.png", (0.2, 0.08, 0.0)),
    "CMYK": (lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "cmyk.tif", (1.0, 0.0, 0.0)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_reads_at_its_own_bit_depth(tmp_path, mode):
    from stiv_core.data.folders import ImageFolder
    from stiv_core.data.listing import Entry
    from stiv_core.data.sample import SampleKey

    make, name, rgb = MODES[mode]
    make().save(tmp_path / name)
    with Image.open(tmp_path / name) as reopened:
        assert reopened.mode == mode  # the file kept the mode under test
    expected = torch.tensor(rgb)[:, None, None].expand(3, 6, 8) * 2 - 1
    torch.testing.assert_close(read_image(tmp_path / name, 6, 8), expected, atol=1 / 255, rtol=0)
    # the image-folder dataset decodes the same way (loaded directly: it lists no .tif files)
    Image.new("RGB", (8, 6)).save(tmp_path / "any.png")
    (tmp_path / "any.txt").write_text("any")
    folder = ImageFolder(str(tmp_path))
    sample = folder.load(Entry(tmp_path / name, "a caption"), SampleKey(0, (2, 6, 8), 0))
    torch.testing.assert_close(sample.pixels, expected[:, None].expand(3, 2, 6, 8), atol=1 / 255, rtol=0)


@pytest.mark.parametrize("mode,value", [("I", -1), ("I", 65536), ("F", 1.5), ("F", float("nan"))])
def test_deep_images_outside_their_range_are_a_clear_error(tmp_path, mode, value):
    _gray(mode, value).save(tmp_path / "deep.tif")
    with pytest.raises(ValueError, match=r"deep\.tif: a mode . image must hold values in \[0, (65535|1)\]"):
        read_image(tmp_path / "deep.tif", 6, 8)


def test_8bit_rgb_reads_exactly_as_before(tmp_path):
    """value / 127.5 - 1, bit for bit, in read_image and in the dataset (resized like a uint8 clip)."""
    from stiv_core.data.folders import ImageFolder
    from stiv_core.data.sample import SampleKey
    from stiv_core.data.transforms import plan_crop, resize_crop

    array = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "rgb.png")
    (tmp_path / "rgb.txt").write_text("noise")
    assert torch.equal(read_image(tmp_path / "rgb.png", 12, 20), torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1)
    sample = ImageFolder(str(tmp_path), random_crop=False)[SampleKey(0, (3, 8, 8), 0)]
    frames = torch.from_numpy(array).permute(2, 0, 1)[None].expand(3, -1, -1, -1)   # uint8, as it used to be
    crop = plan_crop((12, 20), (8, 8), random=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample.pixels, resize_crop(frames, crop, (8, 8)))


def test_a_png_file_is_every_frame_side_by_side(tmp_path):
    video = torch.rand(3, 4, 6, 5) * 2 - 1
    out = write_video(tmp_path / "views.png", video, upscale=2)
    assert output_kind("views.png") == "grid" and output_kind("views/") == "png"
    grid = np.asarray(Image.open(out))
    assert grid.shape == (12, 4 * 10, 3)
    frames = to_uint8_frames(video, 2)
    for i in range(4):
        assert np.array_equal(grid[:, i * 10 : (i + 1) * 10], frames[i])
