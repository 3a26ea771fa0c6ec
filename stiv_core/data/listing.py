"""Finding (file, caption) pairs in a folder: a metadata file, or captions beside the files.

Accepted layouts, checked in this order:
- `metadata.jsonl`: one JSON object per line with `path` (relative to the folder) and `caption`;
- `metadata.csv`: a header with `path` and `caption` columns;
- media files with a caption file of the same stem: `clip.mp4` + `clip.txt`.
Metadata may also give each file's pixel `width` and `height` (as `python -m stiv_core.data.prepare`
writes them), so aspect-ratio buckets need not open the files; an empty or missing one is read from
the file's header instead. A listed file that does not exist is kept: the dataset skips and counts it
like a corrupt one.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Entry:
    path: Path
    caption: str
    size: Optional[tuple[int, int]] = None  # (height, width) in pixels, when the metadata gives it


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
            entries.append(Entry(folder / row["path"], str(row["caption"]).strip(), _size(row)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{folder / 'metadata.jsonl'} line {number}: needs a JSON object with "
                             f"'path' and 'caption', and optional positive integer 'width' and 'height' "
                             f"({err})") from err
    return entries


def _from_csv(folder: Path) -> list[Entry]:
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{folder / 'metadata.csv'} needs a header with 'path' and 'caption' columns, "
                             f"got {reader.fieldnames}")
        entries = []
        for row in reader:
            try:
                entries.append(Entry(folder / row["path"], row["caption"].strip(), _size(row)))
            except ValueError as err:
                raise ValueError(f"{folder / 'metadata.csv'} line {reader.line_num}: {err}") from err
        return entries


def _size(row: dict) -> Optional[tuple[int, int]]:
    """(height, width) from a metadata row; None when either is missing or empty."""
    values = [row.get("height"), row.get("width")]
    if any(v is None or str(v).strip() == "" for v in values):
        return None
    height, width = (float(str(v).strip()) for v in values)  # 24, "24" and 24.0 are all fine
    if not (height.is_integer() and width.is_integer() and height > 0 and width > 0):
        raise ValueError(f"'width' and 'height' must be positive integers, got {width:g} x {height:g}")
    return int(height), int(width)
