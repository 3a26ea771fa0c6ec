"""Pre-encoded latents and text embeddings in safetensors shards, so training decodes no video.

`write_shards` encodes every entry of a dataset once, at one bucket, with the text encoder and VAE it is
given, into `shard_00000.safetensors`, ... (written aside and swapped in, so a rerun replaces the whole
cache); each shard records `source`, what its latents and text depend on. `CachedDataset` reads them.
The job that writes a trainer config's cache with the trainer's encoders, and the check that a run reads
only a cache written for its settings, are the training layer's (`training/cache.py`):

    python -m stiv_core.training.cache --config FILE [key=value ...]   (or python -m stiv_core.data.cache)
"""
from __future__ import annotations

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
from ..interfaces import TextEmbedding, TextEncoder, VideoVAE
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
            raise FileNotFoundError(f"no {SHARD_GLOB} in {folder}: run python -m stiv_core.training.cache first")
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


def write_shards(dataset: Dataset, bucket: tuple[int, int, int], out_dir: str | Path, *, text_encoder: TextEncoder,
                 vae: VideoVAE, max_tokens: int, source: dict, shard_size: int = 256) -> list[Path]:
    """Encode every entry of `dataset` at `bucket` into shards in `out_dir` (text fitted to `max_tokens`
    tokens, `source` recorded in each shard); returns the shard paths. Unreadable files are skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # written aside, then swapped in: a crash leaves the old cache whole, a rerun leaves no stale shard
    staging = out_dir / ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    source_json = json.dumps(source)
    rows, paths, skipped = [], [], set()
    for index in range(len(dataset)):
        sample = _load_exactly(dataset, SampleKey(index, bucket, seed=index))
        if isinstance(sample, str):
            skipped.add(sample)
            continue
        with torch.no_grad():
            latents = vae.encode(sample.pixels[None]).float()[0]
            text = text_encoder.encode([sample.caption]).fit(max_tokens)
        rows.append((latents, text, sample.micro.tensor(1)[0], sample.caption))
        if len(rows) == shard_size:
            paths.append(_write_shard(staging, len(paths), rows, source_json))
            rows = []
    if rows:
        paths.append(_write_shard(staging, len(paths), rows, source_json))
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


if __name__ == "__main__":  # the command is the training layer's now (it needs the trainer's config)
    from ..training.cache import main

    main()
