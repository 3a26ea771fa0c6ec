"""Aspect-matched buckets: folders of portrait and landscape clips, each read only into buckets of its
own aspect, in an order that is a pure function of (seed, step, rank, world)."""
from __future__ import annotations

import json
from collections import Counter

import av
import numpy as np
import pytest
from PIL import Image

from stiv_core.data import folders
from stiv_core.data.folders import ImageFolder, VideoFolder
from stiv_core.data.loader import (CHOICE_BLOCK, BucketGroup, PositionSampler, build_loader, group_by_aspect,
                                   plan_groups)
from stiv_core.data.sample import SampleKey
from stiv_core.data.config import DataConfig, DataKind

LANDSCAPE, PORTRAIT = (24, 40), (40, 24)  # (H, W) of the clips
WIDE = ((2, 16, 32), (4, 16, 32))         # two frame counts of one aspect
TALL = ((2, 32, 16),)
BUCKETS = WIDE + TALL


def write_clip(path, height, width, frames=4):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 30 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """8 landscape and 4 portrait clips, interleaved in name order, then one unreadable file."""
    folder = tmp_path_factory.mktemp("mixed")
    for i in range(12):
        write_clip(folder / f"clip{i:02d}.mp4", *(PORTRAIT if i % 3 == 1 else LANDSCAPE))
        (folder / f"clip{i:02d}.txt").write_text(f"clip {i}")
    (folder / "clip12.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 4)
    (folder / "clip12.txt").write_text("broken")
    return folder


def orientation(height, width):
    return "tall" if height > width else "wide"


def sampler_for(data, **kwargs):
    return PositionSampler(plan_groups(data, BUCKETS), 2, seed=3, **kwargs)


def test_each_entry_joins_the_nearest_aspect_in_log_ratio():
    sizes = [(24, 40), (40, 24), None, (20, 24), (24, 20), (32, 32)]
    groups, unsized = group_by_aspect(sizes, ((2, 16, 32), (2, 32, 16), (2, 16, 16), (4, 32, 64)))
    # W/H 1.2 is nearer 2 than 0.5 in log ratio (linearly it is nearer 0.5); (4, 32, 64) joins the 2:1 group.
    assert [(g.buckets, tuple(g.entries)) for g in groups] == [
        (((2, 16, 32), (4, 32, 64)), (0,)), (((2, 32, 16),), (1,)), (((2, 16, 16),), (3, 4, 5))]
    assert unsized == [2]
    groups, _ = group_by_aspect([(24, 40)] * 3, BUCKETS)
    assert [g.buckets for g in groups] == [WIDE]  # a group with no entries is dropped


def test_every_batch_is_one_bucket_of_each_clips_own_aspect(mixed):
    data = VideoFolder(str(mixed), random_crop=False)
    config = DataConfig(kind=DataKind.VIDEO_FOLDER, path=str(mixed), buckets=BUCKETS)
    loader = iter(build_loader(data, config, batch_size=2, seed=3, start_step=0))
    seen, skipped = Counter(), set()
    for _ in range(12):
        batch = next(loader)
        _, _, frames, height, width = batch.pixels.shape
        assert (frames, height, width) in BUCKETS
        for source_height, source_width in batch.micro[:, :2].tolist():  # the clip's own size
            assert orientation(source_height, source_width) == orientation(height, width)
        seen[(frames, height, width)] += 1
        skipped.update(batch.skipped)
    assert set(seen) == set(BUCKETS)  # both frame counts of the wide aspect are drawn
    assert skipped == {str(mixed / "clip12.mp4")}  # the file of unreadable size is counted, once


def test_keys_match_the_entries_aspect_and_skip_the_unreadable(mixed):
    data = VideoFolder(str(mixed))
    sampler = sampler_for(data)
    sizes = data.entry_sizes()
    assert sizes == [LANDSCAPE, PORTRAIT, LANDSCAPE] * 4 + [None]
    for step in range(60):
        for key in sampler.keys(step):
            assert key.index != 12
            assert orientation(*sizes[key.index]) == orientation(*key.bucket[1:])


def test_resume_at_step_k_gives_the_same_order(mixed):
    data = VideoFolder(str(mixed))
    iterated = iter(sampler_for(data))
    order = [next(iterated) for _ in range(CHOICE_BLOCK + 40)]
    for k in (0, 7, CHOICE_BLOCK - 1, CHOICE_BLOCK + 33):  # past a block of group draws too
        fresh = iter(sampler_for(VideoFolder(str(mixed)), start_step=k))
        assert [next(fresh) for _ in range(5)] == order[k:k + 5]
    sampler = sampler_for(data)
    later, earlier = sampler.keys(CHOICE_BLOCK + 3), sampler.keys(5)  # asking about the past replays
    assert (later, earlier) == (order[CHOICE_BLOCK + 3], order[5])


def test_ranks_agree_on_the_bucket_and_read_disjoint_entries(mixed):
    data = VideoFolder(str(mixed))
    ranks = [sampler_for(data, rank=r, world=2) for r in range(2)]
    buckets = set()
    for step in range(40):
        a, b = (r.keys(step) for r in ranks)
        assert len({k.bucket for k in a + b}) == 1
        # A step's 2 + 2 entries lie in one epoch of the group (of 8 or 4 entries): all distinct.
        assert {k.index for k in a}.isdisjoint({k.index for k in b})
        buckets.add(a[0].bucket)
    assert buckets == set(BUCKETS)


def test_every_entry_is_read_once_per_epoch_of_its_group(mixed):
    data = VideoFolder(str(mixed))
    groups = plan_groups(data, BUCKETS)
    for world in (1, 2):
        samplers = [PositionSampler(groups, 2, seed=3, rank=r, world=world) for r in range(world)]
        stream = {g.buckets: [] for g in groups}  # each group's entries, in group-position order
        seeds = set()
        for step in range(CHOICE_BLOCK + 60):  # across a block of group draws
            keys = [k for s in samplers for k in s.keys(step)]
            stream[next(g.buckets for g in groups if keys[0].bucket in g.buckets)] += [k.index for k in keys]
            seeds.update(k.seed for k in keys)
        for group in groups:
            seen, n = stream[group.buckets], len(group.entries)
            epochs = [sorted(seen[i:i + n]) for i in range(0, len(seen) - n + 1, n)]
            assert len(epochs) >= 100 and all(e == sorted(group.entries) for e in epochs)
        assert len(seeds) == sum(map(len, stream.values()))  # no two samples share their crop/start seed
    # Groups are drawn in proportion to their entry counts (8 : 4), not uniformly.
    steps = Counter(k[0].bucket in WIDE for k in (samplers[0].keys(s) for s in range(2000)))
    assert 0.62 < steps[True] / 2000 < 0.72


def test_a_bad_file_falls_through_only_within_its_aspect(tmp_path):
    rows = []
    for name, (height, width) in [("tall.mp4", PORTRAIT), ("bad.mp4", LANDSCAPE), ("wide.mp4", LANDSCAPE)]:
        if name != "bad.mp4":
            write_clip(tmp_path / name, height, width)
        rows.append({"path": name, "caption": name, "height": height, "width": width})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = VideoFolder(str(tmp_path))
    groups = plan_groups(data, BUCKETS)
    assert [tuple(g.entries) for g in groups] == [(1, 2), (0,)]
    sample = data[SampleKey(1, (2, 16, 32), 0)]  # bad -> wide (never back round to tall)
    assert sample.caption == "wide.mp4" and sample.skipped == (str(tmp_path / "bad.mp4"),)
    data = VideoFolder(str(tmp_path))
    data.set_groups([(1,), (0, 2)])  # had bad.mp4 been alone in its group: no other aspect is tried
    with pytest.raises(RuntimeError, match="every one of the 1 files"):
        data[SampleKey(1, (2, 16, 32), 0)]


def test_metadata_sizes_and_single_aspect_configs_need_no_probing(mixed, tmp_path, monkeypatch):
    def fail(path):
        raise AssertionError(f"probed {path}")
    monkeypatch.setattr(folders, "probe_video_size", fail)
    # One aspect (16 vs 8 frames): no sizes read; the order is the one of a plain sampler.
    same = ((8, 16, 32), (16, 16, 32))
    groups = plan_groups(VideoFolder(str(mixed)), same)
    assert len(groups) == 1 and list(groups[0].entries) == list(range(13))
    plain = PositionSampler.uniform(13, 2, same, seed=3)
    assert [PositionSampler(groups, 2, seed=3).keys(s) for s in range(20)] == [plain.keys(s) for s in range(20)]
    # Sizes in metadata.jsonl: nothing is opened either.
    rows = [{"path": "a.mp4", "caption": "a", "height": 40, "width": 24},
            {"path": "b.mp4", "caption": "b", "height": "24", "width": 40.0}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert VideoFolder(str(tmp_path)).entry_sizes() == [PORTRAIT, LANDSCAPE]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({**rows[0], "width": -3}) + "\n")
    with pytest.raises(ValueError, match="line 1.*positive integers"):
        VideoFolder(str(tmp_path))
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("path,caption,height,width\na.mp4,a,40,24\nb.mp4,b,,\n")
    with pytest.raises(AssertionError, match="probed .*b.mp4"):  # an empty cell is read from the file
        VideoFolder(str(tmp_path)).entry_sizes()


def test_image_folder_groups_portrait_and_landscape_images(tmp_path):
    for i, (height, width) in enumerate([(30, 20), (20, 30), (20, 30), (31, 19)]):
        Image.new("RGB", (width, height), (40 * i, 0, 0)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"image {i}")
    data = ImageFolder(str(tmp_path))
    groups = plan_groups(data, ((1, 8, 16), (1, 16, 8)))
    assert [tuple(g.entries) for g in groups] == [(1, 2), (0, 3)]
    config = DataConfig(kind=DataKind.IMAGE_FOLDER, path=str(tmp_path), buckets=((1, 8, 16), (1, 16, 8)))
    for batch, _ in zip(build_loader(data, config, batch_size=2, seed=0, start_step=0), range(6)):
        for height, width in batch.micro[:, :2].tolist():
            assert orientation(height, width) == orientation(*batch.pixels.shape[-2:])


def test_a_sampler_refuses_an_empty_group():
    with pytest.raises(ValueError, match="entries and buckets"):
        PositionSampler([BucketGroup(WIDE, ())], 2, seed=0)
