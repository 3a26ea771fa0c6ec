"""The cache job: a trainer config's dataset pre-encoded with the trainer's encoders, so training
decodes no video.

    python -m stiv_core.training.cache --config FILE [key=value ...]   (or python -m stiv_core.data.cache)

encodes every entry of the config's dataset once (first bucket, centre crop, the first frame stride)
with the trainer's VAE and text encoder, and writes `shard_00000.safetensors`, ... to `data.cache_dir`
(see `data/cache.py`, which also reads them). Training reads them instead of the dataset whenever that
folder holds shards (or with `data.kind = "cache"` and `data.path` = the folder), and refuses a cache
written for other encoders or another bucket (each shard records them). Skipped files are listed in the log.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from ..data.cache import write_shards
from ..data.config import DataKind
from ..data.loader import build_dataset
from .config import TextEncoderKind, TrainConfig, load_config
from .encoders import build_encoders, word_encoder_origin

log = logging.getLogger(__name__)


def cache_source(config: TrainConfig) -> dict:
    """What a cache's latents and text depend on, from `config`: recorded in every shard and checked by
    the trainer, so a cache is never read by a run with other encoders or another shape."""
    words = config.text_encoder == TextEncoderKind.WORDS
    return {"text_encoder": config.text_encoder.value, "text_encoder_path": config.text_encoder_path,
            "pooled_text_encoder_path": config.pooled_text_encoder_path,
            "word_encoder": word_encoder_origin(config) if words else "",
            "vae": config.vae.value, "vae_path": config.vae_path, "vae_config": config.vae_config,
            "bucket": list(config.data.buckets[0]), "frame_stride": config.data.frame_strides[0],
            "max_text_tokens": config.model.max_text_tokens}


def check_cache_source(dataset: Dataset, config: TrainConfig) -> None:
    """A clear error when `dataset` is a cache written for other encoders or another shape than `config`."""
    recorded = getattr(dataset, "source", None)
    if recorded is None:
        return
    expected = cache_source(config)
    if config.data.kind == DataKind.CACHE:   # pointed at the cache itself: its own shape is the run's
        expected.update({k: recorded.get(k) for k in ("bucket", "frame_stride")})
    differ = sorted(k for k in expected.keys() | recorded.keys() if recorded.get(k) != expected.get(k))
    if differ:
        details = "; ".join(f"{k}: cache {recorded.get(k)!r}, this run {expected.get(k)!r}" for k in differ)
        raise ValueError(f"the latent cache in {dataset.folder} was written for other settings ({details}): "
                         f"rewrite it (python -m stiv_core.training.cache) or point data.cache_dir elsewhere")


def write_cache(config: TrainConfig, out_dir: str | Path, *, shard_size: int = 256) -> list[Path]:
    """Encode the dataset of `config` into shards in `out_dir`; returns the shard paths."""
    data_config = dataclasses.replace(config.data, random_crop=False, cache_dir="",
                                      frame_strides=config.data.frame_strides[:1])   # the stride it records
    dataset = build_dataset(data_config)
    text_encoder, vae = build_encoders(config)
    return write_shards(dataset, data_config.buckets[0], out_dir, text_encoder=text_encoder, vae=vae,
                        max_tokens=config.model.max_text_tokens, source=cache_source(config),
                        shard_size=shard_size)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Pre-encode a STIV training set to safetensors shards.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = load_config(args.config, args.overrides)
    if not config.data.cache_dir:
        parser.error("set data.cache_dir (the folder the shards go to)")
    paths = write_cache(config, config.data.cache_dir, shard_size=args.shard_size)
    log.info("wrote %d shards to %s", len(paths), config.data.cache_dir)
    return paths


if __name__ == "__main__":
    main()
