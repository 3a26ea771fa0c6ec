"""Pre-encoded latents and text embeddings in safetensors shards, so training decodes no video.

    python -m stiv_core.data.cache --config FILE [key=value ...]

encodes every entry of the config's dataset once (first bucket, centre crop, the first frame stride)
with the trainer's VAE and text encoder, and writes `shard_00000.safetensors`, ... to
`data.cache_dir` (written aside and swapped in, so a rerun replaces the whole cache). Training reads them
instead of the dataset whenever that folder holds shards (or with `data.kind = "cache"` and `data.path` =
the folder), and refuses a cache written for other encoders or another bucket (each shard records them).
Skipped files are listed in the log.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..checkpoint import save_state_dict
from ..interfaces import TextEmbedding
from .sample import SampleKey

log = logging.getLogger(__name__)
SHARD_GLOB = "shard_*.safetensors"


@dataclass(frozen=True)
class CachedSample:
    latents: torch.Tensor   # (C, T, h, w)
    tokens: torch.Tensor    # (L, D)
    mask: torch.Tensor      # (L,)
    pooled: torch.Tensor    # (Dp,)
    micro: torch.Tensor     # (6,)
    caption: str


@dataclass(frozen=True)
class CachedBatch:
    latents: torch.Tensor
    text: TextEmbedding
    micro: torch.Tensor
    captions: tuple[str, ...]
    skipped: tuple[str, ...] = ()


def cache_source(config) -> dict:
    """What a cache's latents and text depend on, from TrainConfig `config`: recorded in every shard and
    checked by the trainer, so a cache is never read by a run with other encoders or another shape."""
    from ..training.encoders import word_encoder_origin

    words = config.text_encoder.value == "words"
    return {"text_encoder": config.text_encoder.value, "text_encoder_path": config.text_encoder_path,
            "pooled_text_encoder_path": config.pooled_text_encoder_path,
            "word_encoder": word_encoder_origin(config) if words else "",
            "vae": config.vae.value, "vae_path": config.vae_path, "vae_config": config.vae_config,
            "bucket": list(config.data.buckets[0]), "frame_stride": config.data.frame_strides[0],
            "max_text_tokens": config.model.max_text_tokens}


def check_cache_source(dataset: Dataset, config) -> None:
    """A clear error when `dataset` is a cache written for other encoders or another shape than `config`."""
    recorded = getattr(dataset, "source", None)
    if recorded is None:
        return
    expected = cache_source(config)
    if config.data.kind.value == "cache":   # pointed at the cache itself: its own shape is the run's
        expected.update({k: recorded.get(k) for k in ("bucket", "frame_stride")})
    differ = sorted(k for k in expected.keys() | recorded.keys() if recorded.get(k) != expected.get(k))
    if differ:
        details = "; ".join(f"{k}: cache {recorded.get(k)!r}, this run {expected.get(k)!r}" for k in differ)
        raise ValueError(f"the latent cache in {dataset.folder} was written for other settings ({details}): "
                         f"rewrite it (python -m stiv_core.data.cache) or point data.cache_dir elsewhere")


def has_shards(folder: str | Path) -> bool:
    return bool(folder) and Path(folder).is_dir() and any(Path(folder).glob(SHARD_GLOB))


class CachedDataset(Dataset):
    """Every sample of every shard, loaded into memory once (shards are small, latents compact)."""

    def __init__(self, folder: str | Path):
        shards = sorted(Path(folder).glob(SHARD_GLOB))
        if not shards:
            raise FileNotFoundError(f"no {SHARD_GLOB} in {folder}: run python -m stiv_core.data.cache first")
        self.folder = Path(folder)
        self.samples: list[CachedSample] = []
        sources = set()
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
                if "captions" not in meta:
                    raise ValueError(f"{shard} is not a STIV cache shard (no captions in its metadata)")
                captions = json.loads(meta["captions"])
                sources.add(meta.get("source"))
                data = {key: f.get_tensor(key) for key in f.keys()}
            for i, caption in enumerate(captions):
                self.samples.append(CachedSample(data["latents"][i], data["tokens"][i], data["mask"][i],
                                                 data["pooled"][i], data["micro"][i], caption))
        if len(sources) > 1:
            raise ValueError(f"the shards in {folder} were written by different cache runs; rewrite the cache")
        source = sources.pop()
        self.source = json.loads(source) if source else None   # None: written before sources were kept
        frames = self.samples[0].latents.shape[1]
        self.buckets = ((frames, *self.samples[0].latents.shape[2:]),)  # fixed by the cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey) -> CachedSample:
        return self.samples[key.index]

    @staticmethod
    def collate(samples: Sequence[CachedSample]) -> CachedBatch:
        stack = lambda name: torch.stack([getattr(s, name) for s in samples])
        text = TextEmbedding(stack("tokens"), stack("mask"), stack("pooled"))
        return CachedBatch(stack("latents"), text, stack("micro"), tuple(s.caption for s in samples))


def write_cache(config, out_dir: str | Path, *, shard_size: int = 256) -> list[Path]:
    """Encode the dataset of TrainConfig `config` into shards in `out_dir`; returns the shard paths."""
    from ..training.encoders import build_encoders
    from .loader import build_dataset

    data_config = dataclasses.replace(config.data, random_crop=False, cache_dir="",
                                      frame_strides=config.data.frame_strides[:1])   # the stride it records
    dataset = build_dataset(data_config)
    text_encoder, vae = build_encoders(config)
    bucket = data_config.buckets[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # written aside, then swapped in: a crash leaves the old cache whole, a rerun leaves no stale shard
    staging = out_dir / ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    source = json.dumps(cache_source(config))
    rows, paths, skipped = [], [], set()
    for index in range(len(dataset)):
        sample = _load_exactly(dataset, SampleKey(index, bucket, seed=index))
        if isinstance(sample, str):
            skipped.add(sample)
            continue
        with torch.no_grad():
            latents = vae.encode(sample.pixels[None]).float()[0]
            text = text_encoder.encode([sample.caption]).fit(config.model.max_text_tokens)
        rows.append((latents, text, sample.micro.tensor(1)[0], sample.caption))
        if len(rows) == shard_size:
            paths.append(_write_shard(staging, len(paths), rows, source))
            rows = []
    if rows:
        paths.append(_write_shard(staging, len(paths), rows, source))
    for old in out_dir.glob(SHARD_GLOB):
        old.unlink()
    paths = [path.replace(out_dir / path.name) for path in paths]
    staging.rmdir()
    if skipped:
        log.warning("skipped %d unreadable or too-short files: %s", len(skipped), sorted(skipped)[:5])
    return paths


def _load_exactly(dataset: Dataset, key: SampleKey):
    """The sample of entry `key.index` itself (no falling through to the next), or the path that failed."""
    from .folders import DECODE_ERRORS, SkippingDataset

    if not isinstance(dataset, SkippingDataset):
        return dataset[key]
    entry = dataset.entries[key.index]
    try:
        return dataset.load(entry, key)
    except DECODE_ERRORS as err:
        log.warning("skipping %s: %s", entry.path, err)
        return str(entry.path)


def _write_shard(out_dir: Path, number: int, rows, source: str) -> Path:
    path = out_dir / f"shard_{number:05d}.safetensors"
    tensors = {"latents": torch.stack([r[0] for r in rows]),
               "tokens": torch.cat([r[1].tokens for r in rows]), "mask": torch.cat([r[1].mask for r in rows]),
               "pooled": torch.cat([r[1].pooled for r in rows]), "micro": torch.stack([r[2] for r in rows])}
    save_state_dict(path, tensors, {"captions": json.dumps([r[3] for r in rows]), "source": source})
    return path


def main(argv: Sequence[str] | None = None) -> list[Path]:
    from ..training.config import load_config

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
