"""nodes/_comfy.py inside ComfyUI: with stand-in `comfy.*`, `folder_paths`, `server` modules patched into
sys.modules (as ComfyUI's own tests-unit do), the nodes use ComfyUI's interrupt, progress bar, model
folders and server; and the plan the js/ extension shows."""
from __future__ import annotations

import asyncio
import logging
import sys
import types as pytypes

import pytest

from tests.pack import (MODEL_FILE, ROOT, InterruptProcessingException, fake_comfy, import_copy, import_pack,
                        install_fake_comfy, load, pack_module, sample, text, write_small_bundle)


_comfy = pack_module("nodes._comfy")
plan = pack_module("nodes.plan")


@pytest.fixture
def comfyui(tmp_path, monkeypatch):
    return install_fake_comfy(tmp_path, monkeypatch)


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


def test_models_stiv_is_created_and_only_stiv_checkpoints_are_listed(tmp_path, monkeypatch):
    """ComfyUI's folders hold a user's other models: the Loader lists the files whose header records a STIV
    config; models/stiv exists after the pack loads, so a user sees where STIV models go."""
    from safetensors.torch import save_file
    import torch

    modules, _ = fake_comfy(tmp_path, [])
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    other = tmp_path / "diffusion_models"
    other.mkdir()
    modules["folder_paths"].add_model_folder_path("diffusion_models", str(other))
    save_file({"weight": torch.zeros(2)}, str(other / "flux_dev.safetensors"), metadata={"format": "pt"})
    _comfy.register_model_folder()
    assert (tmp_path / "stiv").is_dir()
    write_small_bundle(other)
    choices = pack_module("nodes").STIVLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert "flux_dev.safetensors" in _comfy.model_files() and choices == ["tiny (built-in)", "tiny-mv (built-in)", MODEL_FILE]


def test_unknown_prompt_words_reach_the_page(comfyui, caplog):
    """Sent with ComfyUI's send_sync to the browser that queued the prompt (js/stiv.js shows a toast), and
    still in the server log; nothing is sent once the node has run."""
    calls, _ = comfyui
    model = load()
    with caplog.at_level(logging.WARNING):
        sample(model, text("a red zigzag circle moving sideways"), steps=1)
    sent = [c for c in calls if c[0] == "send_sync"]
    assert sent and all(c[1] == _comfy.WARNING_EVENT and c[3] == "browser-1" for c in sent)
    unknown = [c[2] for c in sent if "unknown words" in c[2]["message"]]
    assert unknown and "sideways, zigzag" in unknown[0]["message"]
    assert unknown[0]["node"] == "STIV Sampler" and unknown[0]["node_id"] == "7"
    assert any("zigzag" in r.getMessage() for r in caplog.records)
    calls.clear()
    logging.getLogger(_comfy.WARNING_LOGGERS[0] + ".encoders.words").warning("after the run")
    assert not [c for c in calls if c[0] == "send_sync"]


def test_the_plan_route_counts_tokens_and_passes(comfyui):
    _, table = comfyui
    assert plan.register_routes() and plan.register_routes()   # a second import adds nothing
    routes = table.served()
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


@pytest.fixture
def two_copies(comfyui, tmp_path):
    """Two copies of the pack in one custom_nodes/ (links to this checkout, folders "ComfyUI-STIV" and
    "comfyui-stiv"), imported one after the other as ComfyUI does: under their paths as package names."""
    folders = [tmp_path / "custom_nodes" / name for name in ("ComfyUI-STIV", "comfyui-stiv")]
    folders[0].parent.mkdir()
    names = [str(f).replace(".", "_x_") for f in folders]
    try:
        yield folders, names
    finally:
        for key in [k for k in sys.modules if any(k == n or k.startswith(n + ".") for n in names)]:
            del sys.modules[key]


def test_a_second_copy_of_the_pack_adds_no_route_and_no_node_and_says_so(comfyui, two_copies, caplog):
    _, table = comfyui
    folders, names = two_copies
    with caplog.at_level(logging.WARNING):
        for folder, name in zip(folders, names):
            folder.symlink_to(ROOT, target_is_directory=True)
            import_copy(folder, name)
    first, second = (sys.modules[n] for n in names)
    handlers = table.served()   # ComfyUI's start-up: raised (and ComfyUI died) with the route twice
    assert list(handlers) == [plan.ROUTE] and handlers[plan.ROUTE].__module__ == f"{names[0]}.nodes._comfy"
    assert set(first.NODE_CLASS_MAPPINGS) == set(import_pack().NODE_CLASS_MAPPINGS) and first.WEB_DIRECTORY
    # ComfyUI merges every copy's mappings, the later over the earlier, and serves every WEB_DIRECTORY
    assert second.NODE_CLASS_MAPPINGS == second.NODE_DISPLAY_NAME_MAPPINGS == {} and second.WEB_DIRECTORY is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(folders[0]) in w and str(folders[1]) in w for w in warnings), warnings


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
