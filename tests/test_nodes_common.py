"""Shared by the node and workflow tests: the pack imported the way ComfyUI imports it (a folder with a
dash in its name) and a small random STIV bundle in a model folder the nodes list. No tests here."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from stiv_core.bundle import SamplingDefaults, save_bundle
from stiv_core.config import preset
from stiv_core.encoders.words import WordTextEncoder
from stiv_core.model.transformer import STIVTransformer
from tests.fakes import randomize

ROOT = Path(__file__).resolve().parents[1]
PACK = "ComfyUI-STIV-nodes-test"
VOCAB = ["a", "red", "blue", "circle", "square", "moving", "left", "right", "on", "background"]
DEFAULTS = SamplingDefaults(num_frames=4, height=16, width=16, fps=4.0, steps=2)
MODEL_FILE = "small.safetensors"


def import_copy(folder: Path, name: str):
    """The pack in `folder` imported as ComfyUI imports a custom node: package `name`, registered in
    sys.modules before it runs (so its relative imports resolve), submodules `name.nodes...`."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_pack():
    """The pack as ComfyUI imports it; its submodules are importable as `PACK.nodes...`."""
    if PACK not in sys.modules:
        import_copy(ROOT, PACK)
    return sys.modules[PACK]


def pack_module(name: str):
    import_pack()
    return importlib.import_module(f"{PACK}.{name}")


def write_small_bundle(folder: Path, *, text_dim: int = 32, name: str = MODEL_FILE) -> Path:
    """A random 1-block bundle (pixel VAE, word encoder of `text_dim`), 16x16 px, temporal patch 2, patch 4."""
    config = preset("tiny", depth=1, hidden_size=32, num_heads=2, text_dim=text_dim, pooled_text_dim=text_dim,
                    max_text_tokens=8)
    torch.manual_seed(0)
    model = randomize(STIVTransformer(config))
    words = WordTextEncoder(VOCAB, dim=text_dim, max_tokens=8)
    folder.mkdir(parents=True, exist_ok=True)
    save_bundle(folder / name, model, words, defaults=DEFAULTS)
    return folder / name
