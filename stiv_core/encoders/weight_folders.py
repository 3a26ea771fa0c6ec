"""Weight folders of other libraries (transformers, diffusers): safetensors only, as everywhere else.

A folder is checked here before the library reads it, and `from_pretrained` is then called with
`use_safetensors=True`, so a folder holding only a pickle (`pytorch_model.bin`,
`diffusion_pytorch_model.bin`: pickle can run code) is a clear error, never a fallback.
"""
from __future__ import annotations

from pathlib import Path

# Weight files by suffix that are listed in the error, so the user sees what the folder has instead.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def require_safetensors(folder: Path, weights: str) -> Path:
    """`folder / weights` (e.g. "model.safetensors"), or the index of its shards (`<weights>.index.json`);
    a FileNotFoundError naming the folder, the file it lacks and the weight files it has otherwise."""
    for name in (weights, f"{weights}.index.json"):
        if (folder / name).is_file():
            return folder / name
    others = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    has = f"it holds {', '.join(others)}" if others else "it holds no weight file"
    raise FileNotFoundError(
        f"{str(folder)!r} has no {weights} (nor {weights}.index.json for sharded weights); {has}. Only "
        f"safetensors weights are loaded, since pickle (.bin) files can run code: save the model again with "
        f"save_pretrained (safetensors by default) or convert its .bin to safetensors first.")
