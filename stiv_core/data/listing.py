"""Finding (file, caption) pairs in a folder: a metadata file, or captions beside the files.

Accepted layouts, checked in this order:
- `metadata.jsonl`: one JSON object per line with `path` (relative to the folder) and `caption`;
- `metadata.csv`: a header with `path` and `caption` columns;
- media files with a caption file of the same stem: `clip.mp4` + `clip.txt`.
A listed file that does not exist is kept: the dataset skips and counts it like a corrupt one.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Entry:
    path: Path
    caption: str


def list_entries(folder: str | Path, suffixes: tuple[str, ...]) -> list[Entry]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {str(folder)!r} does not exist")
    if (folder / "metadata.jsonl").is_file():
        entries = _from_jsonl(folder)
    elif (folder / "metadata.csv").is_file():
        entries = _from_csv(folder)
    else:
        entries = [Entry(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip())
                   for p in sorted(folder.rglob("*")) if p.suffix.lower() in suffixes
                   and p.with_suffix(".txt").is_file()]
    if not entries:
        raise ValueError(f"no captioned media in {folder}: add metadata.jsonl / metadata.csv (path, caption) "
                         f"or files with a same-named .txt caption; media types: {', '.join(suffixes)}")
    return entries


def _from_jsonl(folder: Path) -> list[Entry]:
    entries = []
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            entries.append(Entry(folder / row["path"], str(row["caption"]).strip()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{folder / 'metadata.jsonl'} line {number}: needs a JSON object with "
                             f"'path' and 'caption' ({err})") from err
    return entries


def _from_csv(folder: Path) -> list[Entry]:
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{folder / 'metadata.csv'} needs a header with 'path' and 'caption' columns, "
                             f"got {reader.fieldnames}")
        return [Entry(folder / row["path"], row["caption"].strip()) for row in reader]
