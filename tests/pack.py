"""Shared by the node and workflow tests (no tests here; no test module imports another): the pack imported
the way ComfyUI imports it (a folder with a dash in its name), a small random STIV bundle in a model folder
the nodes list, the nodes called as ComfyUI calls them, and stand-ins for ComfyUI's own modules."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types as pytypes
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


# -- the nodes, called as ComfyUI calls them --------------------------------------------------------
SIZE = dict(width=16, height=16)
SETTINGS = dict(seed=3, steps=2, shift=1.0, stepper="euler", guidance="jit", scale=4.0, image_scale=1.5,
                renormalize=False, **SIZE)


def load(name=MODEL_FILE, **options):
    args = {**dict(model_name=name, weight_dtype="float32", quantization="none", attention="sdpa", block_swap=0,
                   compile=False), **options}
    return pack_module("nodes").STIVLoader().load(**args)[0]


def node(name):
    cls = pack_module("nodes").NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)


def text(prompt="a red circle moving left", negative=""):
    return node("STIVTextEncode")(prompt, negative)[0]


def images(n, seed=0, h=16, w=16):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def sample(model, cond, frames=4, **changes):
    return node("STIVSampler")(model, cond, frames=frames, frame_stride=1, **{**SETTINGS, **changes})[0]


def decode(model, latent):
    return node("STIVDecode")(model, latent, chunk_frames=3)[0]


# -- ComfyUI's own modules, stand-ins (patched into sys.modules as ComfyUI's tests-unit do) ----------
class InterruptProcessingException(Exception):
    pass


class RouteTable:
    """`PromptServer.instance.routes` as aiohttp's RouteTableDef: `.get(path)` decorates a handler into a
    list of route definitions (method, path, handler) that iterates; `served()` is ComfyUI's `add_routes`
    at start-up, where aiohttp's router refuses a second GET on one path, and ComfyUI dies."""

    def __init__(self):
        self.defs: list = []

    def get(self, path):
        def decorate(handler):
            self.defs.append(pytypes.SimpleNamespace(method="GET", path=path, handler=handler))
            return handler
        return decorate

    def __iter__(self):
        return iter(self.defs)

    def served(self) -> dict:
        handlers = {}
        for d in self.defs:
            if d.path in handlers:
                raise RuntimeError("Added route will never be executed, method HEAD is already registered")
            handlers[d.path] = d.handler
        return handlers


def install_fake_comfy(tmp_path: Path, monkeypatch) -> tuple[list, "RouteTable"]:
    """The stand-in ComfyUI patched into sys.modules for one test, the pack's model folder registered and a
    small bundle in it; returns the calls ComfyUI's stand-ins record and the server's route table."""
    calls: list = []
    modules, routes = fake_comfy(tmp_path, calls)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    pack_module("nodes._comfy").register_model_folder()
    write_small_bundle(tmp_path / "stiv")
    return calls, routes


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
    fp.get_filename_list = lambda name: sorted(p.name for d in folders[name] for p in Path(d).glob("*"))
    fp.get_full_path = lambda name, file: next((f"{d}/{file}" for d in folders[name]
                                                if os.path.isfile(f"{d}/{file}")), None)

    routes = RouteTable()
    server = pytypes.ModuleType("server")
    # send_sync as PromptServer's: event, data, the client id of the browser that queued the prompt
    send_sync = lambda event, data, sid=None: calls.append(("send_sync", event, data, sid))
    server.PromptServer = pytypes.SimpleNamespace(instance=pytypes.SimpleNamespace(
        routes=routes, send_sync=send_sync, client_id="browser-1", last_node_id="7"))
    aiohttp = pytypes.ModuleType("aiohttp")
    aiohttp.web = pytypes.SimpleNamespace(json_response=lambda data, status=200: (status, data))
    comfy = pytypes.ModuleType("comfy")
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils, "folder_paths": fp,
            "server": server, "aiohttp": aiohttp}, routes
