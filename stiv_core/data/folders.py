"""Video-folder (PyAV decoding) and image-folder datasets that skip unreadable files.

A file that cannot be decoded, or a clip too short for the bucket at every allowed stride, is never
fatal: the dataset moves on to the next entry and reports the skipped path inside the sample it
returns (`VideoSample.skipped`), so the trainer counts skips even from worker processes.

Sizes: `entry_sizes()` gives each entry's (H, W) for aspect-ratio buckets (see `loader`), from the
metadata when it has them, else from the file's header (no decoding), read once. A file whose size
cannot be read is marked bad and reported with the first sample each process returns. Once the loader
has grouped the entries by aspect (`set_groups`), a bad file falls through only to the next entry of
its own group, so the sample keeps the aspect its bucket was chosen for.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..conditioning import MicroConditions
from ..video_io import EXIF_ORIENTATION, image_pixels
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
        self._sizes: Optional[list[Optional[tuple[int, int]]]] = None
        self._unreported: tuple[str, ...] = ()  # bad before any sample: reported with the first one
        self._groups: list[np.ndarray] = []  # entry indices of each aspect group (set_groups)
        self._group_of = np.full(len(entries), -1)  # entry -> its group (-1: none)
        self._place = np.zeros(len(entries), dtype=np.int64)  # entry -> its place in its group

    def __len__(self) -> int:
        return len(self.entries)

    def entry_sizes(self) -> list[Optional[tuple[int, int]]]:
        """(H, W) of every entry (None: unreadable), from the metadata or the file header, read once."""
        if self._sizes is None:
            missing = sum(entry.size is None for entry in self.entries)
            if missing:
                log.info("reading the frame size of %d files (no width/height in the metadata)", missing)
            self._sizes = [entry.size or self._probe(entry) for entry in self.entries]
        return self._sizes

    def _probe(self, entry: Entry) -> Optional[tuple[int, int]]:
        try:
            return self.probe_size(str(entry.path))
        except DECODE_ERRORS as err:
            log.warning("skipping %s: size unreadable: %s", entry.path, err)
            self.bad.add(str(entry.path))
            self._unreported += (str(entry.path),)
            return None

    def set_groups(self, groups: Sequence[Sequence[int]]) -> None:
        """Entry indices by aspect group: a bad file then falls through only within its own group."""
        self._groups = [np.asarray(members, dtype=np.int64) for members in groups]
        self._group_of[:] = -1
        for group, members in enumerate(self._groups):
            self._group_of[members] = group
            self._place[members] = np.arange(len(members))

    def __getitem__(self, key: SampleKey) -> VideoSample:
        skipped, self._unreported = list(self._unreported), ()
        members: Sequence[int] = range(len(self.entries))
        start = key.index
        if self._group_of[key.index] >= 0:
            members, start = self._groups[self._group_of[key.index]], int(self._place[key.index])
        for offset in range(len(members)):
            entry = self.entries[int(members[(start + offset) % len(members)])]
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
        raise RuntimeError(f"every one of the {len(members)} files was unreadable or too short for "
                           f"bucket {key.bucket}; e.g. {skipped[:3]}")

    def load(self, entry: Entry, key: SampleKey) -> VideoSample:
        raise NotImplementedError

    def probe_size(self, path: str) -> tuple[int, int]:
        """(H, W) of the file at `path` without decoding it; may raise a DECODE_ERROR."""
        raise NotImplementedError

    def _sample(self, frames: torch.Tensor, entry: Entry, key: SampleKey, stride: int,
                gen: torch.Generator) -> VideoSample:
        """frames `(T, 3, H, W)`, uint8 or float in [-1, 1], already the bucket's frame count."""
        count, height, width = key.bucket
        crop = plan_crop(tuple(frames.shape[-2:]), (height, width), random=self.random_crop, generator=gen)
        pixels = resize_crop(frames, crop, (height, width))
        micro = MicroConditions(int(frames.shape[-2]), int(frames.shape[-1]), count, crop.top, crop.left, stride)
        return VideoSample(pixels, entry.caption, micro)


class VideoFolder(SkippingDataset):
    def __init__(self, folder: str, **kwargs):
        super().__init__(list_entries(folder, VIDEO_SUFFIXES), **kwargs)

    def load(self, entry: Entry, key: SampleKey) -> VideoSample:
        """The window is chosen from the frame count first, and only its frames are kept (decoding stops
        after its last): a long clip never sits in memory whole."""
        path = str(entry.path)
        for trust_header in (True, False):
            gen = torch.Generator().manual_seed(key.seed)
            window = choose_window(count_frames(path, trust_header=trust_header), key.bucket[0],
                                   self.frame_strides, gen)
            frames = decode_frames(path, window.indices)
            if frames is not None:
                clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
                return self._sample(clip, entry, key, window.stride, gen)
        raise TooShortError("fewer decodable frames than counted")

    def probe_size(self, path: str) -> tuple[int, int]:
        return probe_video_size(path)


class ImageFolder(SkippingDataset):
    """Images as static clips of the bucket's frame count (1 for the T2I stage)."""

    def __init__(self, folder: str, **kwargs):
        super().__init__(list_entries(folder, IMAGE_SUFFIXES), **kwargs)

    def load(self, entry: Entry, key: SampleKey) -> VideoSample:
        gen = torch.Generator().manual_seed(key.seed)
        with Image.open(entry.path) as image:
            frame = image_pixels(image)[None]  # (1, 3, H, W) in [-1, 1], whatever the bit depth
        return self._sample(frame.expand(key.bucket[0], -1, -1, -1), entry, key, 1, gen)

    def probe_size(self, path: str) -> tuple[int, int]:
        with Image.open(path) as image:  # reads the header only
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)   # a quarter turn: H and W swap
            return (image.width, image.height) if turned else (image.height, image.width)


def decode_video(path: str) -> list[np.ndarray]:
    """Every frame of the first video stream as `(H, W, 3)` uint8 RGB (PyAV)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise TooShortError("no decodable frames")
    return frames


def count_frames(path: str, *, trust_header: bool = True) -> int:
    """Frames of the first video stream: the container's count when it has one (and `trust_header`), else
    counted by decoding (no pixel conversion)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        counted = container.streams.video[0].frames if trust_header else 0
        if counted <= 0:
            counted = sum(1 for _ in container.decode(video=0))
    if counted <= 0:
        raise TooShortError("no decodable frames")
    return counted


def decode_frames(path: str, indices: Sequence[int]) -> Optional[list[np.ndarray]]:
    """Frames `indices` (increasing) of the first video stream as `(H, W, 3)` uint8 RGB, decoding no
    further than the last; None if the stream ends before it (a header that overstated its length)."""
    wanted, last, kept = set(indices), max(indices), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    return [kept[i] for i in indices] if len(kept) == len(wanted) else None


def probe_video_size(path: str) -> tuple[int, int]:
    """(H, W) of the first video stream, from the container's header (PyAV; no frame decoded)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        context = container.streams.video[0].codec_context
        height, width = context.height, context.width
    if height <= 0 or width <= 0:
        raise ValueError(f"no frame size in the header ({width} x {height})")
    return height, width
