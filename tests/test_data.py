"""Datasets: one typed sample, PyAV video folders that skip and count bad files, crops, data order."""
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from stiv_core.data.folders import ImageFolder, VideoFolder
from stiv_core.data.loader import PositionSampler, build_dataset, build_loader
from stiv_core.data.sample import SampleKey, VideoSample, collate
from stiv_core.data.squares import MovingSquares
from stiv_core.data.transforms import plan_crop
from stiv_core.data.config import DataConfig, DataKind


def write_video(path, frames, height=24, width=32):
    """A clip whose frame i has brightness 10 * i, so the sampled frames can be identified."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 10 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture()
def video_folder(tmp_path):
    write_video(tmp_path / "a.mp4", 12)
    (tmp_path / "a.txt").write_text("a grey clip\n")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    (tmp_path / "broken.txt").write_text("broken")
    write_video(tmp_path / "short.mp4", 2)
    (tmp_path / "short.txt").write_text("too short")
    return tmp_path


def test_video_folder_skips_and_reports_corrupt_and_short_files(video_folder):
    data = VideoFolder(str(video_folder), frame_strides=(2,), random_crop=False)
    assert [e.path.name for e in data.entries] == ["a.mp4", "broken.mp4", "short.mp4"]
    sample = data[SampleKey(1, (4, 16, 16), seed=0)]  # broken -> short (2 < 7 frames) -> a
    assert sample.caption == "a grey clip"
    assert [p.split("/")[-1] for p in sample.skipped] == ["broken.mp4", "short.mp4"]
    assert sample.pixels.shape == (3, 4, 16, 16) and sample.micro.frame_stride == 2
    # Frames come at stride 2: brightness steps of 20 (in [-1, 1]: 20 / 127.5).
    steps = sample.pixels.mean(dim=(0, 2, 3)).diff()
    torch.testing.assert_close(steps, torch.full((3,), 20 / 127.5), atol=0.03, rtol=0)
    assert (sample.micro.height, sample.micro.width) == (24, 32)  # the source size
    assert (sample.micro.crop_top, sample.micro.crop_left) == (0, 2)  # centre crop of 16x21
    again = data[SampleKey(2, (4, 16, 16), seed=0)]  # known-bad files are not decoded again
    assert len(again.skipped) == 1 and again.caption == "a grey clip"


def test_a_video_window_decodes_only_up_to_its_last_frame_and_survives_a_wrong_header(tmp_path, monkeypatch):
    from stiv_core.data import folders
    from stiv_core.data.transforms import choose_window

    write_video(tmp_path / "a.mp4", 25)
    (tmp_path / "a.txt").write_text("a grey clip")
    data = VideoFolder(str(tmp_path), frame_strides=(1, 2), random_crop=False)
    key = SampleKey(0, (4, 16, 16), seed=3)
    # the reference: every frame decoded, the window chosen from their count
    every = folders.decode_video(str(tmp_path / "a.mp4"))
    window = choose_window(len(every), 4, (1, 2), torch.Generator().manual_seed(3))
    expected = data._sample(torch.from_numpy(np.stack([every[i] for i in window.indices])).permute(0, 3, 1, 2),
                            data.entries[0], key, window.stride, torch.Generator().manual_seed(3))
    converted = []
    real = av.VideoFrame.to_ndarray
    monkeypatch.setattr(av.VideoFrame, "to_ndarray", lambda self, **kw: converted.append(1) or real(self, **kw))
    sample = data[key]
    assert torch.equal(sample.pixels, expected.pixels) and len(converted) == 4   # only the window's frames
    # a header that says 400 frames: the window lands past the end, so it counts by decoding and chooses again
    real_count = folders.count_frames
    monkeypatch.setattr(folders, "count_frames", lambda path, trust_header=True:
                        400 if trust_header else real_count(path, trust_header=False))
    decodes = []
    real_decode = folders.decode_frames
    monkeypatch.setattr(folders, "decode_frames", lambda path, idx: decodes.append(real_decode(path, idx)) or decodes[-1])
    assert torch.equal(data[key].pixels, expected.pixels)
    assert [d is None for d in decodes] == [True, False]   # past the end, then the real count


def test_all_bad_files_is_a_clear_error(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"garbage")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(RuntimeError, match="every one of the 1 files was unreadable"):
        VideoFolder(str(tmp_path))[SampleKey(0, (2, 8, 8), 0)]


def test_metadata_jsonl_and_csv(tmp_path):
    write_video(tmp_path / "clip.mp4", 4)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"path": "clip.mp4", "caption": "from jsonl"}) + "\n")
    assert VideoFolder(str(tmp_path))[SampleKey(0, (2, 8, 8), 0)].caption == "from jsonl"
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("path,caption\nclip.mp4,\"from csv, quoted\"\n")
    assert VideoFolder(str(tmp_path))[SampleKey(0, (2, 8, 8), 0)].caption == "from csv, quoted"
    (tmp_path / "metadata.csv").write_text("file,text\nclip.mp4,x\n")
    with pytest.raises(ValueError, match="'path' and 'caption'"):
        VideoFolder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFolder(str(tmp_path / "nope"))


def test_image_folder_gives_static_clips(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "red.txt").write_text("red")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad.txt").write_text("bad")
    sample = ImageFolder(str(tmp_path))[SampleKey(0, (1, 8, 8), 5)]  # bad.png sorts first
    assert sample.caption == "red" and len(sample.skipped) == 1
    assert sample.pixels.shape == (3, 1, 8, 8)
    torch.testing.assert_close(sample.pixels[:, 0, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_crop_covers_the_bucket_and_stays_inside():
    gen = torch.Generator().manual_seed(0)
    for source in ((24, 32), (100, 30), (8, 8)):
        crop = plan_crop(source, (16, 20), random=True, generator=gen)
        assert crop.resized[0] >= 16 and crop.resized[1] >= 20
        assert 0 <= crop.top <= crop.resized[0] - 16 and 0 <= crop.left <= crop.resized[1] - 20
        assert abs(crop.resized[0] / crop.resized[1] - source[0] / source[1]) < 0.1  # aspect kept


def test_squares_are_deterministic_captioned_and_move():
    data = MovingSquares(10, frame_strides=(1, 3))
    a, b = data[SampleKey(3, (4, 16, 16), 9)], data[SampleKey(3, (4, 16, 16), 9)]
    assert isinstance(a, VideoSample) and torch.equal(a.pixels, b.pixels)
    assert a.caption == "a yellow square moving right"
    assert not torch.equal(a.pixels[:, 0], a.pixels[:, -1])
    batch = collate([a, data[SampleKey(4, (4, 16, 16), 1)]])
    assert batch.pixels.shape == (2, 3, 4, 16, 16) and batch.micro.shape == (2, 6)
    with pytest.raises(ValueError, match="one shape"):
        collate([a, data[SampleKey(4, (4, 8, 8), 1)]])


def test_data_order_is_a_function_of_seed_and_step():
    sampler = PositionSampler.uniform(10, 3, ((2, 8, 8), (2, 8, 16)), seed=5)
    first = [sampler.keys(s) for s in range(8)]
    resumed = PositionSampler.uniform(10, 3, ((2, 8, 8), (2, 8, 16)), seed=5, start_step=4)
    assert [next(iter(resumed)) for _ in range(1)] == [first[4]]
    indices = [k.index for step in first[:10] for k in step]
    assert sorted(indices[:10]) == list(range(10))  # each epoch is a permutation
    assert {k.bucket for step in first for k in step} == {(2, 8, 8), (2, 8, 16)}
    ranks = [PositionSampler.uniform(10, 3, ((2, 8, 8),), seed=5, rank=r, world=2).keys(0) for r in range(2)]
    assert {k.index for k in ranks[0]}.isdisjoint({k.index for k in ranks[1]})
    # One group (no aspect grouping) keeps the order runs made before aspect groups existed.
    assert [[k.index for k in step] for step in first[:5]] == [[8, 7, 9], [1, 6, 3], [5, 2, 0], [4, 5, 4], [9, 3, 6]]
    assert [step[0].bucket[2] for step in first[:5]] == [8, 8, 16, 8, 8]
    assert first[0][0].seed == 1037399811701645076


def test_loader_yields_batches_with_workers_off():
    config = DataConfig(kind=DataKind.SQUARES, num_samples=6, buckets=((2, 8, 8),))
    loader = build_loader(build_dataset(config), config, batch_size=2, seed=0, start_step=0)
    batch = next(iter(loader))
    assert batch.pixels.shape == (2, 3, 2, 8, 8) and len(batch.captions) == 2
