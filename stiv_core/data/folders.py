"""Video-folder (PyAV decoding) and image-folder datasets that skip unreadable files.

A file that cannot be decoded, or a clip too short for the bucket at every allowed stride, is never
fatal: the dataset moves on to the next entry and reports the skipped path inside the sample it
returns (`VideoSample.skipped`), so the trainer counts skips even from worker processes.
"""
from __future__ import annotations

import logging

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..conditioning import MicroConditions
from .listing import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Entry, list_entries
from .sample import SampleKey, VideoSample
from .transforms import TooShortError, choose_window, plan_crop, resize_crop

log = logging.getLogger(__name__)
# What a broken or unsupported file raises while being decoded (PyAV's errors are OSError/ValueError).
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError, UnidentifiedImageError)


class SkippingDataset(Dataset):
    """Base: `load(entry, key)` may raise a DECODE_ERROR; the next entry is tried instead."""

    def __init__(self, entries: list[Entry], *, frame_strides: tuple[int, ...] = (1,), random_crop: bool = True):
        self.entries, self.frame_strides, self.random_crop = entries, frame_strides, random_crop
        self.bad: set[str] = set()  # known-bad paths of this process, not retried

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: SampleKey) -> VideoSample:
        skipped: list[str] = []
        for offset in range(len(self.entries)):
            entry = self.entries[(key.index + offset) % len(self.entries)]
            if str(entry.path) in self.bad:
                skipped.append(str(entry.path))
                continue
            try:
                sample = self.load(entry, key)
            except DECODE_ERRORS as err:
                log.warning("skipping %s: %s", entry.path, err)
                self.bad.add(str(entry.path))
                skipped.append(str(entry.path))
                continue
            return VideoSample(sample.pixels, sample.caption, sample.micro, tuple(skipped))
        raise RuntimeError(f"every one of the {len(self.entries)} files was unreadable or too short for "
                           f"bucket {key.bucket}; e.g. {skipped[:3]}")

    def load(self, entry: Entry, key: SampleKey) -> VideoSample:
        raise NotImplementedError

    def _sample(self, frames: torch.Tensor, entry: Entry, key: SampleKey, stride: int,
                gen: torch.Generator) -> VideoSample:
        """frames `(T, 3, H, W)` uint8, already the bucket's frame count."""
        count, height, width = key.bucket
        crop = plan_crop(tuple(frames.shape[-2:]), (height, width), random=self.random_crop, generator=gen)
        pixels = resize_crop(frames, crop, (height, width))
        micro = MicroConditions(int(frames.shape[-2]), int(frames.shape[-1]), count, crop.top, crop.left, stride)
        return VideoSample(pixels, entry.caption, micro)


class VideoFolder(SkippingDataset):
    def __init__(self, folder: str, **kwargs):
        super().__init__(list_entries(folder, VIDEO_SUFFIXES), **kwargs)

    def load(self, entry: Entry, key: SampleKey) -> VideoSample:
        gen = torch.Generator().manual_seed(key.seed)
        frames = decode_video(str(entry.path))
        window = choose_window(len(frames), key.bucket[0], self.frame_strides, gen)
        clip = torch.from_numpy(np.stack([frames[i] for i in window.indices])).permute(0, 3, 1, 2)
        return self._sample(clip, entry, key, window.stride, gen)


class ImageFolder(SkippingDataset):
    """Images as static clips of the bucket's frame count (1 for the T2I stage)."""

    def __init__(self, folder: str, **kwargs):
        super().__init__(list_entries(folder, IMAGE_SUFFIXES), **kwargs)

    def load(self, entry: Entry, key: SampleKey) -> VideoSample:
        gen = torch.Generator().manual_seed(key.seed)
        with Image.open(entry.path) as image:
            array = np.asarray(image.convert("RGB"))
        frame = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
        return self._sample(frame.expand(key.bucket[0], -1, -1, -1), entry, key, 1, gen)


def decode_video(path: str) -> list[np.ndarray]:
    """Every frame of the first video stream as `(H, W, 3)` uint8 RGB (PyAV)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise TooShortError("no decodable frames")
    return frames
