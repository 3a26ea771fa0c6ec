"""The data engine on short videos generated here with PyAV: scene cuts, motion order, trainer-valid metadata."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("scenedetect")

from stiv_core.data.folders import VideoFolder, decode_video  # noqa: E402
from stiv_core.data.prepare import (PrepareOptions, Thresholds, command_captioner, main, prepare,  # noqa: E402
                                    sidecar_caption)
from stiv_core.data.sample import SampleKey  # noqa: E402
from stiv_core.data.scoring import detect_scenes, score_clip  # noqa: E402
from stiv_core.video_io import write_video  # noqa: E402

SIZE, FRAMES = 64, 24


def texture(seed: int, size: int = 160) -> np.ndarray:
    """A smooth random colour texture (uint8 RGB) that optical flow can track."""
    noise = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 6)  # smooth: a pan is not a cut
    return np.clip((blurred - blurred.min()) / np.ptp(blurred) * 255, 0, 255).astype(np.uint8)


def moving(seed: int, speed: int, frames: int = FRAMES) -> list[np.ndarray]:
    tex = texture(seed)
    return [tex[10:10 + SIZE, 10 + speed * i:10 + speed * i + SIZE] for i in range(frames)]


def save(path: Path, frames: list[np.ndarray], caption: str | None) -> Path:
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
    write_video(path, video, fps=12)
    if caption:
        path.with_suffix(".txt").write_text(caption)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("raw")
    dark = [(f // 2).astype(np.uint8) for f in moving(2, 2)]  # another scene: other texture, darker
    save(src / "cut.mp4", moving(1, 2) + dark, "a textured wall, then another")
    save(src / "static.mp4", moving(3, 0), "a still texture")
    save(src / "pan.mp4", moving(4, 3), "a panning texture")
    save(src / "uncaptioned.mp4", moving(5, 2), None)
    return src


LOOSE = Thresholds(min_frames=8, min_short_side=32, min_motion=0.5, max_motion=40.0, min_sharpness=1.0)


class TestScores:
    def test_the_hard_cut_is_found(self, sources):
        scenes = detect_scenes(sources / "cut.mp4", 2 * FRAMES)
        assert len(scenes) == 2
        assert abs(scenes[1].start - FRAMES) <= 1 and scenes[0].start == 0 and scenes[1].end == 2 * FRAMES

    def test_no_cut_gives_one_scene(self, sources):
        assert [(s.start, s.end) for s in detect_scenes(sources / "pan.mp4", FRAMES)] == [(0, FRAMES)]

    def test_motion_orders_static_slow_and_fast(self, sources):
        static = score_clip(decode_video(str(sources / "static.mp4"))).motion
        slow = score_clip(decode_video(str(sources / "uncaptioned.mp4"))).motion  # 2 px / frame
        fast = score_clip(decode_video(str(sources / "pan.mp4"))).motion          # 3 px / frame
        assert static < 0.1 < slow < fast  # (Farneback underestimates on this very smooth texture)

    def test_blur_lowers_sharpness(self, sources):
        frames = decode_video(str(sources / "pan.mp4"))
        blurred = [cv2.GaussianBlur(f, (0, 0), 2) for f in frames]
        assert score_clip(blurred).sharpness < 0.5 * score_clip(frames).sharpness


class TestPrepare:
    def test_metadata_is_read_by_the_trainer_dataset(self, sources, tmp_path):
        summary = prepare(sources, tmp_path, options=PrepareOptions(thresholds=LOOSE))
        rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
        rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
        assert sorted(r["caption"] for r in rows) == ["a panning texture", "a textured wall, then another",
                                                      "a textured wall, then another"]
        reasons = {r["source"]: r["rejected"][0] for r in rejected}
        assert reasons["static.mp4"].startswith("motion") and reasons["uncaptioned.mp4"].startswith("no caption")
        assert (summary.kept, summary.rejected, summary.scenes) == (3, 2, 5)
        assert not list((tmp_path / "clips").glob("uncaptioned_*")) and len(list((tmp_path / "clips").iterdir())) == 3
        data = VideoFolder(str(tmp_path), random_crop=False)
        assert len(data) == 3
        sample = data[SampleKey(0, (8, 32, 32), 0)]
        assert sample.pixels.shape == (3, 8, 32, 32) and sample.skipped == ()
        cut_rows = sorted((r for r in rows if r["source"] == "cut.mp4"), key=lambda r: r["start_frame"])
        assert [len(decode_video(str(tmp_path / r["path"]))) for r in cut_rows] == [r["frames"] for r in cut_rows]
        # width / height in the metadata are the clips' frame sizes, read without opening the files.
        assert [e.size for e in data.entries] == [(r["height"], r["width"]) for r in rows]
        assert [decode_video(str(e.path))[0].shape[:2] for e in data.entries] == [e.size for e in data.entries]

    def test_command_captioner_and_cli(self, sources, tmp_path, capsys):
        script = f"{sys.executable} -c \"import sys; print('caption of ' + sys.argv[1].split('/')[-1])\" {{clip}}"
        caption = command_captioner(script)(Path("/x/clip_001.mp4"), Path("/x/src.mp4"))
        assert caption == "caption of clip_001.mp4"
        main([str(sources), str(tmp_path), "--min-short-side", "32", "--min-frames", "8", "--min-motion", "0.5",
              "--min-sharpness", "1", "--caption-command", script])
        assert "4 kept, 1 rejected" in capsys.readouterr().out
        rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
        assert all(r["caption"] == "caption of " + Path(r["path"]).name for r in rows)

    @pytest.mark.slow  # a subprocess
    def test_names_never_collide_and_one_failure_does_not_stop_the_run(self, tmp_path):
        src = tmp_path / "raw"
        (src / "a").mkdir(parents=True)
        (src / "a_b").mkdir()
        save(src / "a" / "b_c.mp4", moving(6, 2), "first")
        save(src / "a_b" / "c.mp4", moving(7, 2), "second")
        save(src / "z.mp4", moving(8, 2), "third")
        calls = []

        def flaky(clip, source):   # times out on the second clip, stops the whole run on the third
            calls.append(source.name)
            if len(calls) == 2:
                raise subprocess.TimeoutExpired("captioner", 1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return sidecar_caption(clip, source)

        out = tmp_path / "out"
        with pytest.raises(KeyboardInterrupt):
            prepare(src, out, options=PrepareOptions(thresholds=LOOSE, split_scenes=False), captioner=flaky)
        rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
        assert [r["caption"] for r in rows] == ["first"]   # written before the run stopped
        script = f"{sys.executable} -c \"import time; time.sleep(5)\""
        assert command_captioner(script, timeout_s=0.2)(Path("/x.mp4"), Path("/y.mp4")) is None   # logged, not raised
        summary = prepare(src, out, options=PrepareOptions(thresholds=LOOSE, split_scenes=False))
        rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
        assert summary.kept == 3 and len({r["path"] for r in rows}) == 3   # a/b_c and a_b/c: two files
        assert sorted(r["caption"] for r in rows) == ["first", "second", "third"]

    def test_strict_thresholds_and_missing_source(self, sources, tmp_path):
        summary = prepare(sources, tmp_path, options=PrepareOptions(split_scenes=False))  # default: 256 px
        assert summary.kept == 0
        assert "short side 64 px < 256" in (tmp_path / "rejected.jsonl").read_text()
        with pytest.raises(FileNotFoundError, match="does not exist"):
            prepare(tmp_path / "nope", tmp_path / "out")
