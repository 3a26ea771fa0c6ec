"""Clip scores for the data engine: scene cuts (PySceneDetect), motion (OpenCV optical flow), and basic
quality (size, sharpness). Frames are `(H, W, 3)` uint8 RGB arrays, as `folders.decode_video` gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

# Motion is measured on frames resized to this width, so scores compare across resolutions.
MOTION_WIDTH = 256


@dataclass(frozen=True)
class Scene:
    """Frames `[start, end)` of a source video."""

    start: int
    end: int

    @property
    def frames(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ClipScores:
    frames: int
    height: int
    width: int
    motion: float     # mean optical-flow magnitude, pixels per frame at MOTION_WIDTH wide
    sharpness: float  # mean variance of the Laplacian of the grey frames (higher = sharper)


def detect_scenes(path: str | Path, total_frames: int, *, threshold: float = 27.0,
                  min_scene_frames: int = 8) -> list[Scene]:
    """Scenes split at hard cuts (PySceneDetect's ContentDetector); one scene when there is no cut."""
    try:
        from scenedetect import ContentDetector, detect
    except ImportError as err:
        raise ImportError("splitting at scene cuts needs PySceneDetect: pip install scenedetect "
                          "(or run prepare with --no-split)") from err
    found = detect(str(path), ContentDetector(threshold=threshold, min_scene_len=min_scene_frames))
    scenes = [Scene(start.frame_num, end.frame_num) for start, end in found]
    return [s for s in scenes if s.frames > 0] or [Scene(0, total_frames)]


def motion_score(frames: Sequence[np.ndarray], *, pairs: int = 8) -> float:
    """Mean Farneback optical-flow magnitude over up to `pairs` evenly spaced consecutive frame pairs."""
    if len(frames) < 2:
        return 0.0
    starts = np.unique(np.linspace(0, len(frames) - 2, num=min(pairs, len(frames) - 1)).round().astype(int))
    # Larger frames are shrunk to MOTION_WIDTH; smaller ones are measured as they are (enlarging them
    # only blurs the texture flow needs) and their flow scaled up to MOTION_WIDTH.
    width = min(frames[0].shape[1], MOTION_WIDTH)
    magnitudes = []
    for i in starts:
        a, b = _grey(frames[i], width), _grey(frames[i + 1], width)
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return float(np.mean(magnitudes)) * MOTION_WIDTH / width


def sharpness_score(frames: Sequence[np.ndarray], *, samples: int = 4) -> float:
    """Mean variance of the Laplacian over up to `samples` evenly spaced frames (blur lowers it)."""
    picks = np.unique(np.linspace(0, len(frames) - 1, num=min(samples, len(frames))).round().astype(int))
    return float(np.mean([cv2.Laplacian(_grey(frames[i]), cv2.CV_64F).var() for i in picks]))


def score_clip(frames: Sequence[np.ndarray]) -> ClipScores:
    if not len(frames):
        raise ValueError("cannot score an empty clip")
    h, w = frames[0].shape[:2]
    return ClipScores(frames=len(frames), height=h, width=w, motion=motion_score(frames),
                      sharpness=sharpness_score(frames))


def _grey(frame: np.ndarray, width: int | None = None) -> np.ndarray:
    grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    if width and grey.shape[1] != width:
        height = max(1, round(grey.shape[0] * width / grey.shape[1]))
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
    return grey
