"""Latent/text caches: written once, read by training instead of decoding."""
from pathlib import Path

import pytest
import torch

from stiv_core.data.cache import CachedDataset
from stiv_core.data.loader import build_dataset
from stiv_core.data.sample import SampleKey
from stiv_core.data.squares import MovingSquares
from stiv_core.encoders.hashed import HashedTextEncoder
from stiv_core.train import train
from stiv_core.training.cache import main as cache_main
from stiv_core.training.config import load_config

CONFIG = str(Path(__file__).resolve().parents[1] / "stiv_core" / "configs" / "tiny.toml")
TINY = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.text_dim=16",
        "model.pooled_text_dim=16", "model.max_text_tokens=8", "data.buckets=[[4, 16, 16]]", "batch_size=2",
        "data.num_samples=5", 'data.kind="squares"', 'text_encoder="hashed"', "data.frame_strides=[1]"]


def test_cache_round_trip_and_training_uses_it(tmp_path):
    cache = tmp_path / "cache"
    paths = cache_main(["--config", CONFIG, "--shard-size", "2", *TINY,
                        f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}"])
    assert [p.name for p in paths] == ["shard_00000.safetensors", "shard_00001.safetensors",
                                       "shard_00002.safetensors"]
    data = CachedDataset(cache)
    assert len(data) == 5 and data.buckets == ((4, 16, 16),)
    # The identity VAE's latents are the centre-cropped pixels; the text is the encoder's output.
    original = MovingSquares(5, frame_strides=(1,))[SampleKey(3, (4, 16, 16), seed=3)]
    cached = data[SampleKey(3, (4, 16, 16), 0)]
    assert torch.equal(cached.latents, original.pixels) and cached.caption == original.caption
    text = HashedTextEncoder(16, 16, 8).encode([original.caption])
    assert torch.equal(cached.tokens, text.tokens[0]) and torch.equal(cached.pooled, text.pooled[0])

    config = load_config(None, TINY + [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                                       "max_steps=2", "data.kind=video_folder", "data.path=/nonexistent"])
    assert isinstance(build_dataset(config.data), CachedDataset)  # no folder is read at all
    result = train(config)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_a_rewrite_leaves_no_stale_shard_and_another_setup_is_refused(tmp_path):
    cache = tmp_path / "cache"
    args = ["--config", CONFIG, "--shard-size", "2", *TINY, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}"]
    cache_main(args)
    assert len(list(cache.glob("shard_*"))) == 3
    cache_main(args + ["data.num_samples=2"])          # a smaller set: one shard, none left over
    assert [p.name for p in cache.glob("shard_*")] == ["shard_00000.safetensors"] and len(CachedDataset(cache)) == 2
    assert not (cache / ".writing").exists()
    base = TINY + [f"output_dir={tmp_path / 'run2'}", f"data.cache_dir={cache}", "max_steps=1", "data.num_samples=2"]
    with pytest.raises(ValueError, match="written for other settings.*text_encoder: cache 'hashed', this run 'words'.*"
                                         "word_encoder: cache '', this run 'seed:7'"):
        train(load_config(CONFIG, base + ['text_encoder="words"', "model.text_dim=16", "model.pooled_text_dim=16",
                                          "seed=7"]))
    with pytest.raises(ValueError, match="bucket: cache \\[4, 16, 16\\], this run \\[4, 8, 8\\]"):
        train(load_config(None, base + ["data.buckets=[[4, 8, 8]]"]))
    assert train(load_config(None, base)).step == 1     # the setup it was written for
    # pointed at the cache itself (data.kind = "cache"): the cache's own bucket is the run's
    direct = TINY + [f"output_dir={tmp_path / 'run3'}", 'data.kind="cache"', f"data.path={cache}",
                     "data.buckets=[[8, 32, 32]]", "max_steps=1"]
    assert train(load_config(None, direct)).step == 1


def test_the_cache_records_the_one_stride_it_was_written_with(tmp_path):
    cache = tmp_path / "cache"
    cache_main(["--config", CONFIG, *TINY, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                "data.frame_strides=[1, 2]", "data.num_samples=6"])
    data = CachedDataset(cache)
    assert data.source["frame_stride"] == 1
    assert {int(data[SampleKey(i, (4, 16, 16), 0)].micro[4]) for i in range(6)} == {1}   # every clip at it
