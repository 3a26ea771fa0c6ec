"""The data engine: raw videos -> captioned, scored, filtered clips the trainer reads.

    python -m stiv_core.data.prepare SRC_DIR OUT_DIR [--min-motion 0.3] [--caption-command "cmd {clip}"]

Each video under SRC_DIR is split at scene cuts (PySceneDetect), each scene is scored for motion
(OpenCV optical flow) and basic quality (size, sharpness), scenes that pass the thresholds and have a
caption are written to `OUT_DIR/clips/` as H.264 mp4, and `OUT_DIR/metadata.jsonl` lists them (`path`,
`caption`, and the scores, among them the frame `width` and `height` that aspect buckets read), the
layout `data.kind = "video_folder"` reads. Rejected scenes go to
`OUT_DIR/rejected.jsonl` with their reasons. Captions come from the source's sidecar `video.txt`, or
from a captioner: a callable `(clip_path, source_path) -> caption | None`, or on the command line a
command whose stdout is the caption (`{clip}` and `{source}` are replaced by the paths).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shlex
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import av
import numpy as np
import torch

from .. import cli
from ..video_io import write_video
from .folders import decode_video
from .listing import VIDEO_SUFFIXES
from .scoring import ClipScores, Scene, detect_scenes, score_clip

log = logging.getLogger(__name__)
Captioner = Callable[[Path, Path], Optional[str]]  # (clip, source video) -> caption, or None if none


@dataclass(frozen=True)
class Thresholds:
    min_frames: int = 16
    min_short_side: int = 256
    min_motion: float = 0.3     # pixels / frame at 256 px wide: below is a still image
    max_motion: float = 40.0    # above: shaking, flashes or a missed cut
    min_sharpness: float = 20.0

    def reasons(self, scores: ClipScores) -> list[str]:
        """Why a clip with `scores` is rejected (empty = kept)."""
        checks = [(scores.frames >= self.min_frames, f"{scores.frames} frames < {self.min_frames}"),
                  (min(scores.height, scores.width) >= self.min_short_side,
                   f"short side {min(scores.height, scores.width)} px < {self.min_short_side}"),
                  (scores.motion >= self.min_motion, f"motion {scores.motion:.3g} < {self.min_motion}"),
                  (scores.motion <= self.max_motion, f"motion {scores.motion:.3g} > {self.max_motion}"),
                  (scores.sharpness >= self.min_sharpness, f"sharpness {scores.sharpness:.3g} < {self.min_sharpness}")]
        return [message for ok, message in checks if not ok]


@dataclass(frozen=True)
class PrepareOptions:
    thresholds: Thresholds = Thresholds()
    split_scenes: bool = True
    cut_threshold: float = 27.0   # PySceneDetect ContentDetector threshold
    min_scene_frames: int = 8


@dataclass(frozen=True)
class PrepareSummary:
    videos: int
    scenes: int
    kept: int
    rejected: int
    metadata: Path


def sidecar_caption(clip: Path, source: Path) -> Optional[str]:
    """The source video's `same-name.txt`, if it exists and is not empty."""
    sidecar = source.with_suffix(".txt")
    text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
    return text or None


def command_captioner(template: str, *, timeout_s: float = 600.0) -> Captioner:
    """A captioner running `template` (with `{clip}` / `{source}` replaced); its stdout is the caption."""
    def caption(clip: Path, source: Path) -> Optional[str]:
        args = [part.format(clip=str(clip), source=str(source)) for part in shlex.split(template)]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
        except (subprocess.TimeoutExpired, OSError) as err:   # one clip's failure, not the run's
            log.warning("captioner failed on %s: %s", clip, err)
            return None
        if result.returncode != 0:
            log.warning("captioner failed on %s (exit %d): %s", clip, result.returncode, result.stderr.strip()[-300:])
            return None
        return result.stdout.strip() or None
    return caption


def prepare(src_dir: str | Path, out_dir: str | Path, *, options: PrepareOptions = PrepareOptions(),
            captioner: Captioner = sidecar_caption) -> PrepareSummary:
    """Split, score, filter and caption every video under `src_dir` into `out_dir` (see the module doc)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"source folder {str(src_dir)!r} does not exist")
    videos = sorted(p for p in src_dir.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ValueError(f"no videos in {src_dir} (looked for {', '.join(VIDEO_SUFFIXES)})")
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    kept, rejected = [], []
    for video in videos:
        for row in _prepare_video(video, src_dir, out_dir, options, captioner):
            (rejected if row.get("rejected") else kept).append(row)
        # after every video: a run stopped later keeps what it has done
        _write_jsonl(out_dir / "metadata.jsonl", kept)
        _write_jsonl(out_dir / "rejected.jsonl", rejected)
    return PrepareSummary(len(videos), len(kept) + len(rejected), len(kept), len(rejected), out_dir / "metadata.jsonl")


def _prepare_video(video: Path, src_dir: Path, out_dir: Path, options: PrepareOptions,
                   captioner: Captioner) -> list[dict]:
    try:
        frames, fps = decode_video(str(video)), _frame_rate(video)
    except (av.FFmpegError, OSError, ValueError) as err:
        log.warning("skipping unreadable %s: %s", video, err)
        return [{"source": str(video.relative_to(src_dir)), "rejected": [f"unreadable: {err}"]}]
    source = video.relative_to(src_dir)
    try:
        scenes = (detect_scenes(video, len(frames), threshold=options.cut_threshold,
                                min_scene_frames=options.min_scene_frames)
                  if options.split_scenes else [Scene(0, len(frames))])
    except Exception as err:  # the scene detector's own errors: this video is skipped, the run goes on
        log.warning("skipping %s: scene detection failed: %s", video, err)
        return [{"source": str(source), "rejected": [f"scene detection failed: {type(err).__name__}: {err}"]}]
    # the name keeps the folders and the extension apart (a/b_c.mp4 vs a_b/c.mp4, dog.mp4 vs dog.webm)
    stem = "_".join(source.with_suffix("").parts) + "_" + hashlib.sha1(str(source).encode()).hexdigest()[:6]
    rows = []
    for number, scene in enumerate(scenes):
        clip_frames = frames[scene.start:scene.end]
        scores = score_clip(clip_frames)
        row = {"source": str(video.relative_to(src_dir)), "start_frame": scene.start, "end_frame": scene.end,
               "fps": fps, **asdict(scores)}
        reasons = options.thresholds.reasons(scores)
        clip = out_dir / "clips" / f"{stem}_{number:03d}.mp4"
        if not reasons:
            try:
                write_video(clip, _to_video(clip_frames), fps=fps)
                caption = captioner(clip, video)
            except Exception as err:  # a codec or captioner failure costs this scene, not the run
                log.warning("skipping scene %d of %s: %s", number, video, err)
                caption, failure = None, f"writing or captioning failed: {type(err).__name__}: {err}"
            else:
                failure = "no caption (no sidecar .txt, or the captioner gave none)"
            if caption is None:
                clip.unlink(missing_ok=True)
                reasons = [failure]
            else:
                row = {"path": str(clip.relative_to(out_dir)), "caption": caption, **row}
        rows.append({**row, "rejected": reasons} if reasons else row)
    return rows


def _to_video(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 `(H, W, 3)` frames -> `(3, T, H, W)` in [-1, 1] (write_video rounds back exactly)."""
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


def _frame_rate(path: Path) -> float:
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 24.0


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


@cli.entry_point
def main(argv: Optional[Sequence[str]] = None) -> PrepareSummary:
    """The summary; a user error exits with status 2 and one line before any video is read (see cli.py)."""
    parser = cli.ArgumentParser(prog="python -m stiv_core.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir")
    parser.add_argument("out_dir")
    defaults = Thresholds()
    for name, value in asdict(defaults).items():   # a minimum of 0: no minimum
        kind = cli.positive_float if name.startswith("max_") else {int: cli.nonnegative_int}.get(
            type(value), cli.nonnegative_float)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--no-split", action="store_true", help="keep each video whole (no scene detection)")
    parser.add_argument("--cut-threshold", type=cli.positive_float, default=27.0)
    parser.add_argument("--caption-command", default=None,
                        help="a command printing a caption; {clip} and {source} are replaced by paths")
    args = parser.parse_args(argv)
    if not Path(args.src_dir).is_dir():
        raise FileNotFoundError(f"src_dir {args.src_dir!r} is not a folder (of videos)")
    cli.writable_output(args.out_dir, folder=True)
    thresholds = Thresholds(**{name: getattr(args, name) for name in asdict(defaults)})
    options = PrepareOptions(thresholds=thresholds, split_scenes=not args.no_split, cut_threshold=args.cut_threshold)
    captioner = command_captioner(args.caption_command) if args.caption_command else sidecar_caption
    summary = prepare(args.src_dir, args.out_dir, options=options, captioner=captioner)
    print(f"{summary.videos} videos, {summary.scenes} scenes: {summary.kept} kept, {summary.rejected} rejected "
          f"(see rejected.jsonl); wrote {summary.metadata}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
