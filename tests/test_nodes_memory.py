"""Interrupting a run leaks nothing: 50 interrupted runs, resident memory flat within a bound."""
from __future__ import annotations

import gc

import psutil
import pytest

from tests.pack import load, pack_module, sample, text, write_small_bundle


_comfy = pack_module("nodes._comfy")
RUNS, BOUND_MB = 50, 8.0


class InterruptingBar:
    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        _comfy.request_interrupt()


def test_fifty_interrupted_runs_keep_rss_flat(tmp_path, monkeypatch):
    write_small_bundle(tmp_path)
    monkeypatch.setenv("STIV_MODEL_DIRS", str(tmp_path))
    model = load()
    monkeypatch.setattr(_comfy, "progress_bar", InterruptingBar)
    # 32x32 px, 8 frames: each run's latents, text and activations are several MB if kept
    run = lambda: sample(model, text(), frames=8, width=32, height=32, steps=4)
    for _ in range(5):   # warm-up: allocator pools, lazily built tables
        with pytest.raises(_comfy.Interrupted):
            run()
    gc.collect()
    process = psutil.Process()
    start = process.memory_info().rss
    for _ in range(RUNS):
        with pytest.raises(_comfy.Interrupted):
            run()
    gc.collect()
    grown = (process.memory_info().rss - start) / 2 ** 20
    print(f"RSS after {RUNS} interrupted runs: {grown:+.2f} MiB")
    assert grown < BOUND_MB
    monkeypatch.undo()
    assert sample(model, text())["samples"].shape == (1, 3, 4, 16, 16)
