"""Pre-encoded latents and text embeddings in safetensors shards, so training decodes no video.

    python -m stiv_core.data.cache --config FILE [key=value ...]

encodes every entry of the config's dataset once (first bucket, centre crop, the first frame stride)
with the trainer's VAE and text encoder, and writes `shard_00000.safetensors`, ... to
`data.cache_dir`. Training reads them instead of the dataset whenever that folder holds shards (or
with `data.kind = "cache"` and `data.path` = the folder). Skipped files are listed in the log.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
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


def has_shards(folder: str | Path) -> bool:
    return bool(folder) and Path(folder).is_dir() and any(Path(folder).glob(SHARD_GLOB))


class CachedDataset(Dataset):
    """Every sample of every shard, loaded into memory once (shards are small, latents compact)."""

    def __init__(self, folder: str | Path):
        shards = sorted(Path(folder).glob(SHARD_GLOB))
        if not shards:
            raise FileNotFoundError(f"no {SHARD_GLOB} in {folder}: run python -m stiv_core.data.cache first")
        self.samples: list[CachedSample] = []
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                captions = json.loads(f.metadata()["captions"])
                data = {key: f.get_tensor(key) for key in f.keys()}
            for i, caption in enumerate(captions):
                self.samples.append(CachedSample(data["latents"][i], data["tokens"][i], data["mask"][i],
                                                 data["pooled"][i], data["micro"][i], caption))
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

    data_config = dataclasses.replace(config.data, random_crop=False, cache_dir="")
    dataset = build_dataset(data_config)
    text_encoder, vae = build_encoders(config)
    bucket = data_config.buckets[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
            paths.append(_write_shard(out_dir, len(paths), rows))
            rows = []
    if rows:
        paths.append(_write_shard(out_dir, len(paths), rows))
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


def _write_shard(out_dir: Path, number: int, rows) -> Path:
    path = out_dir / f"shard_{number:05d}.safetensors"
    tensors = {"latents": torch.stack([r[0] for r in rows]),
               "tokens": torch.cat([r[1].tokens for r in rows]), "mask": torch.cat([r[1].mask for r in rows]),
               "pooled": torch.cat([r[1].pooled for r in rows]), "micro": torch.stack([r[2] for r in rows])}
    save_state_dict(path, tensors, {"captions": json.dumps([r[3] for r in rows])})
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
