"""Reading condition images and writing videos (.mp4 via PyAV H.264, .gif/.webp via Pillow, PNG folders).

Videos here are `(3, T, H, W)` float tensors in [-1, 1], the pipeline's pixel format. Pillow's GIF
writer merges identical consecutive frames into one longer frame (playback time is kept).
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8_frames(video: torch.Tensor, upscale: int = 1) -> np.ndarray:
    """`(3, T, H, W)` in [-1, 1] -> `(T, H*u, W*u, 3)` uint8, enlarged by nearest neighbour."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video (3, T, H, W), got {tuple(video.shape)}")
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    if upscale > 1:
        frames = frames.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    return frames.cpu().numpy()


def output_kind(path: str | Path) -> str:
    """'mp4', 'gif', 'webp', 'png' (a folder: no suffix or a trailing slash) or 'grid' (a .png file: every frame
    side by side, e.g. the views of a multi-view model); else a clear error."""
    text = str(path)
    suffix = Path(text).suffix.lower()
    if text.endswith(("/", "\\")) or suffix == "":
        return "png"
    if suffix == ".png":
        return "grid"
    if suffix in VIDEO_SUFFIXES:
        return suffix[1:]
    raise ValueError(f"cannot write {suffix!r} files; supported outputs: {', '.join(VIDEO_SUFFIXES)}, a .png "
                     f"(the frames side by side) or a folder of PNGs (a path without extension)")


def write_video(path: str | Path, video: torch.Tensor, *, fps: float = 8.0, upscale: int = 1) -> Path:
    """Write `video` to `path`; the format follows the extension (see `output_kind`)."""
    kind = output_kind(path)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = to_uint8_frames(video, upscale)
    path = Path(path)
    if kind == "png":
        path.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(path / f"frame_{i:05d}.png")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "grid":
        Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)
    elif kind == "mp4":
        _write_mp4(path, frames, fps)
    else:
        images = [Image.fromarray(f) for f in frames]
        extra = {"lossless": True} if kind == "webp" else {}
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **extra)
    return path


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """H.264 in yuv420p (what browsers play); sizes are padded to even numbers as the codec needs."""
    import av  # PyAV: a requirement, imported here so the rest of the library does not need it

    t, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))  # 29.97, 12.5 kept
        stream.width, stream.height, stream.pix_fmt = w + pad_w, h + pad_h, "yuv420p"
        stream.options = {"crf": "12"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def read_video(path: str | Path) -> torch.Tensor:
    """A GIF/WebP (Pillow) or any video PyAV decodes -> `(3, T, H, W)` in [-1, 1]."""
    path = _existing(path)
    if path.suffix.lower() in (".gif", ".webp"):
        with Image.open(path) as image:
            frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    else:
        import av

        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return _to_tensor(np.stack(frames)).permute(3, 0, 1, 2)


EXIF_ORIENTATION = 0x0112
# Pillow's modes deeper than 8 bits, each with the value that means full brightness. 16-bit grayscale
# PNGs and TIFFs open as "I;16" (older Pillow: "I", 32-bit int holding the 16-bit values, which is also
# how ComfyUI reads "I"); 32-bit float images ("F") hold [0, 1]. Deeper RGB files open as 8-bit RGB.
HIGH_DEPTH_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def image_pixels(image: Image.Image) -> torch.Tensor:
    """A Pillow image of any mode as `(3, H, W)` float32 in [-1, 1], as the picture is meant to be seen:
    its EXIF orientation applied (phone portraits are stored sideways), transparency composited onto
    black rather than whatever colour hides under alpha 0, grayscale repeated over the three channels,
    and every bit depth scaled by its own full scale (255, 65535 or 1.0, see `HIGH_DEPTH_FULL_SCALE`).
    8-bit images give exactly `value / 127.5 - 1`. Values outside the mode's range are a ValueError."""
    image = ImageOps.exif_transpose(image)
    full_scale = HIGH_DEPTH_FULL_SCALE.get(image.mode)
    if full_scale is None:
        return _to_tensor(np.asarray(_composited_rgb(image))).permute(2, 0, 1)
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not 0 <= low <= high <= full_scale:  # NaN fails every comparison
        raise ValueError(f"a mode {image.mode} image must hold values in [0, {full_scale:g}]; this one "
                         f"spans [{low:g}, {high:g}]")
    gray = torch.from_numpy((values / full_scale * 2 - 1).astype(np.float32))
    return gray.expand(3, -1, -1).contiguous()


def _composited_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit image as RGB, transparency composited onto black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image as `(3, H, W)` in [-1, 1] (see `image_pixels`); another size is centre-cropped to the
    aspect, then resized."""
    path = _existing(path)
    try:
        with Image.open(path) as opened:
            pixels = image_pixels(opened)
    except OSError as err:
        raise ValueError(f"{path} is not an image Pillow can read ({err})") from err
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if pixels.shape[1:] != (height, width):
        log.warning("%s is %dx%d px; centre-cropped and resized to the video's %dx%d", path.name,
                    pixels.shape[2], pixels.shape[1], width, height)
        pixels = fit_image(pixels, height, width)
    return pixels


def fit_image(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(3, h, w)` centre-cropped to the aspect of `height x width`, then resized (area/bilinear)."""
    _, h, w = pixels.shape
    scale = min(h / height, w / width)
    ch, cw = round(height * scale), round(width * scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = pixels[:, top : top + ch, left : left + cw]
    mode = "area" if ch >= height else "bilinear"
    return F.interpolate(crop[None], size=(height, width), mode=mode)[0].clamp(-1, 1)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    return path


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32)) / 127.5 - 1
