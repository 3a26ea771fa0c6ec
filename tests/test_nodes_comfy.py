"""nodes/_comfy.py inside ComfyUI: with stand-in `comfy.*`, `folder_paths`, `server` modules patched into
sys.modules (as ComfyUI's own tests-unit do), the nodes use ComfyUI's interrupt, progress bar, model
folders and server; and the plan the js/ extension shows."""
from __future__ import annotations

import asyncio
import sys
import types as pytypes

import pytest
import torch

from tests.test_nodes import load, sample, text
from tests.test_nodes_common import MODEL_FILE, pack_module, write_small_bundle

_comfy = pack_module("nodes._comfy")
plan = pack_module("nodes.plan")


class InterruptProcessingException(Exception):
    pass


def fake_comfy(models_dir, calls):
    mm = pytypes.ModuleType("comfy.model_management")
    state = {"interrupt": False}
    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda force=False: calls.append("soft_empty_cache")
    mm.interrupt_current_processing = lambda value=True: state.update(interrupt=value)
    mm.processing_interrupted = lambda: state["interrupt"]

    def throw():
        if state["interrupt"]:
            state["interrupt"] = False
            raise InterruptProcessingException()
    mm.throw_exception_if_processing_interrupted = throw

    utils = pytypes.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls.append(("progress", value, total, preview[0]))
            if value == 1 and "interrupt at 1" in calls:
                mm.interrupt_current_processing(True)
    utils.ProgressBar = ProgressBar

    folders = {"diffusion_models": [], "stiv": []}
    fp = pytypes.ModuleType("folder_paths")
    fp.models_dir = str(models_dir)
    fp.add_model_folder_path = lambda name, path, is_default=False: folders.setdefault(name, []).append(path)
    fp.get_filename_list = lambda name: sorted(p.name for d in folders[name] for p in __import__("pathlib").Path(d).glob("*"))
    fp.get_full_path = lambda name, file: next((f"{d}/{file}" for d in folders[name]
                                                if __import__("os").path.isfile(f"{d}/{file}")), None)

    routes = {}
    server = pytypes.ModuleType("server")
    server.PromptServer = pytypes.SimpleNamespace(instance=pytypes.SimpleNamespace(routes=pytypes.SimpleNamespace(
        get=lambda path: (lambda fn: routes.setdefault(path, fn)))))
    aiohttp = pytypes.ModuleType("aiohttp")
    aiohttp.web = pytypes.SimpleNamespace(json_response=lambda data, status=200: (status, data))
    comfy = pytypes.ModuleType("comfy")
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils, "folder_paths": fp,
            "server": server, "aiohttp": aiohttp}, routes


@pytest.fixture
def comfyui(tmp_path, monkeypatch):
    calls = []
    modules, routes = fake_comfy(tmp_path, calls)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    _comfy.register_model_folder()
    write_small_bundle(tmp_path / "stiv")
    return calls, routes


def test_inside_comfyui_models_come_from_its_folders_and_progress_goes_to_its_bar(comfyui):
    calls, _ = comfyui
    assert _comfy.in_comfyui() and _comfy.model_files() == [MODEL_FILE]
    model = load()
    sample(model, text(), steps=2)
    assert [c for c in calls if c[0] == "progress"] == [("progress", 1, 2, "JPEG"), ("progress", 2, 2, "JPEG")]


def test_inside_comfyui_an_interrupt_raises_its_exception_and_empties_its_cache(comfyui):
    calls, _ = comfyui
    model = load()
    calls.append("interrupt at 1")
    with pytest.raises(InterruptProcessingException):
        sample(model, text(), steps=3)
    assert "soft_empty_cache" in calls and not _comfy.interrupt_requested()
    calls.remove("interrupt at 1")
    assert sample(model, text(), steps=3)["samples"].shape == (1, 3, 4, 16, 16)


def test_the_plan_route_counts_tokens_and_passes(comfyui):
    _, routes = comfyui
    assert plan.register_routes() and plan.ROUTE in routes
    query = {"model_name": MODEL_FILE, "frames": "4", "width": "16", "height": "16", "guidance": "sit"}
    request = pytypes.SimpleNamespace(rel_url=pytypes.SimpleNamespace(query=query))
    status, body = asyncio.run(routes[plan.ROUTE](request))
    assert status == 200 and body["tokens"] == (4 // 2) * (16 // 4) ** 2 and body["passes_per_step"] == 3
    assert body["fits"] and "memory plan: fits" in body["text"]
    heun = plan.describe_plan(plan.PlanQuery(MODEL_FILE, 4, 16, 16, guidance="jit", stepper="heun"))
    assert heun["passes_per_step"] == 2 and heun["forwards_per_step"] == 4
    assert heun["peak_bytes"] < body["peak_bytes"]   # 2 batched passes need fewer activations than 3
    assert "multiple of 2" in plan.describe_plan(plan.PlanQuery(MODEL_FILE, 5, 16, 16))["error"]
    assert "no model file" in plan.describe_plan(plan.PlanQuery("gone.safetensors", 4, 16, 16))["error"]


def test_outside_comfyui_the_fallbacks_need_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("STIV_MODEL_DIRS", str(tmp_path))
    assert not _comfy.in_comfyui() and _comfy.model_files() == []
    assert _comfy.add_get_route("/x", dict) is False and _comfy.torch_device().type in ("cpu", "cuda")
    _comfy.register_model_folder()   # a no-op without ComfyUI
    _comfy.request_interrupt()
    assert _comfy.interrupt_requested()
    with pytest.raises(_comfy.Interrupted):
        _comfy.raise_interrupted()
    assert not _comfy.interrupt_requested()
