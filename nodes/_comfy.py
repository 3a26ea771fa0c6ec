"""Every touch of ComfyUI (`comfy.*`, `folder_paths`, `server`) lives here, each with a fallback.

Inside ComfyUI these call its model management, progress bar, interrupt flag, model folders and
server routes; without it (tests, scripts) they fall back to plain torch, a logging progress bar, a
module-level interrupt flag and the folders in `$STIV_MODEL_DIRS`. Nothing runs at import time: each
ComfyUI module is imported on first use.
"""
from __future__ import annotations

import gc
import importlib
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

log = logging.getLogger("stiv.nodes")
MODEL_FOLDERS = ("stiv", "diffusion_models")   # "stiv" is registered by the pack, under models/stiv
MODEL_SUFFIXES = (".safetensors",)


def _comfy(name: str) -> Optional[Any]:
    """The ComfyUI module `name`, or None when ComfyUI is not what is running."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def in_comfyui() -> bool:
    return _comfy("comfy.model_management") is not None


# -- devices and memory -------------------------------------------------------------------------
def torch_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory() -> None:
    """Drop what Python no longer references and give cached device memory back."""
    gc.collect()
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_room(device: torch.device, needed_bytes: int) -> None:
    """Before STIV's weights go on `device`: ask ComfyUI to unload its models (CLIP, VAE, other diffusion
    models) until `needed_bytes` are free. Outside ComfyUI there is nothing else to unload."""
    mm = _comfy("comfy.model_management")
    if mm is not None and device.type != "cpu":
        mm.free_memory(needed_bytes + mm.extra_reserved_memory(), device)


def preferred_dtype(device: torch.device) -> torch.dtype:
    """The weight dtype for 'auto': ComfyUI's choice for the device (bfloat16 where it is fast, else
    float16, else float32); outside ComfyUI float32 on the CPU, bfloat16 on a GPU that has it, else float16."""
    mm = _comfy("comfy.model_management")
    if device.type == "cpu":
        return torch.float32
    if mm is not None:
        if mm.should_use_bf16(device):
            return torch.bfloat16
        return torch.float16 if mm.should_use_fp16(device) else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


# -- interrupt ----------------------------------------------------------------------------------
class Interrupted(Exception):
    """Raised outside ComfyUI when a run was interrupted (ComfyUI's own exception inside it)."""


_interrupt = threading.Event()


def request_interrupt() -> None:
    """What ComfyUI's Cancel button does (`interrupt_current_processing`); the fallback sets a flag."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.interrupt_current_processing(True)
    else:
        _interrupt.set()


def interrupt_requested() -> bool:
    mm = _comfy("comfy.model_management")
    return mm.processing_interrupted() if mm is not None else _interrupt.is_set()


def raise_interrupted() -> None:
    """Clear the interrupt flag and raise the exception ComfyUI treats as 'interrupted by the user'."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()
    _interrupt.clear()
    raise Interrupted("interrupted by the user")


# -- progress and previews ----------------------------------------------------------------------
class LogProgressBar:
    """The fallback ProgressBar: same `update_absolute(value, total, preview)` call, logged."""

    def __init__(self, total: int):
        self.total, self.current = total, 0

    def update_absolute(self, value: int, total: Optional[int] = None, preview: Any = None) -> None:
        self.total = total if total is not None else self.total
        self.current = min(value, self.total)
        log.debug("step %d/%d%s", self.current, self.total, " (preview)" if preview is not None else "")


def progress_bar(total: int) -> Any:
    utils = _comfy("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else LogProgressBar(total)


def preview_max_size() -> Optional[int]:
    """The largest preview side ComfyUI sends (--preview-size), or None when previews are off
    (--preview-method none, ComfyUI's default). Outside ComfyUI: 512."""
    cli = _comfy("comfy.cli_args")
    if cli is None:
        return 512
    args = cli.args
    method = getattr(args, "preview_method", None)
    if str(getattr(method, "value", method)).lower() == "none":
        return None
    return int(getattr(args, "preview_size", 512))


def preview_payload(image: Any, max_size: int = 512) -> tuple[str, Any, int]:
    """A PIL image as the preview ComfyUI's progress hook sends to the browser."""
    return ("JPEG", image, max_size)


# -- model folders ------------------------------------------------------------------------------
def register_model_folder() -> None:
    """Add `models/stiv` to ComfyUI's folders, created if absent so a user sees where STIV models go (no-op
    outside ComfyUI)."""
    fp = _comfy("folder_paths")
    if fp is not None:
        folder = os.path.join(fp.models_dir, "stiv")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:   # a read-only models folder: listed anyway, nothing else depends on it
            log.warning("could not create %s (%s)", folder, err)
        fp.add_model_folder_path("stiv", folder)


def _fallback_dirs() -> list[Path]:
    return [Path(p) for p in os.environ.get("STIV_MODEL_DIRS", "").split(os.pathsep) if p]


def model_files() -> list[str]:
    """Model file names from the `stiv` and `diffusion_models` folders (or `$STIV_MODEL_DIRS`)."""
    fp = _comfy("folder_paths")
    if fp is not None:
        names = [n for folder in MODEL_FOLDERS for n in fp.get_filename_list(folder)]
    else:
        names = [str(p.relative_to(d)) for d in _fallback_dirs() if d.is_dir() for p in sorted(d.rglob("*"))
                 if p.is_file()]
    return sorted({n for n in names if n.lower().endswith(MODEL_SUFFIXES)})


def model_path(name: str) -> Optional[Path]:
    """The full path of a name `model_files()` listed, or None."""
    fp = _comfy("folder_paths")
    if fp is not None:
        found = [fp.get_full_path(folder, name) for folder in MODEL_FOLDERS]
        return next((Path(p) for p in found if p), None)
    return next((d / name for d in _fallback_dirs() if (d / name).is_file()), None)


# -- server -------------------------------------------------------------------------------------
_FIRST_COPY = "stiv_pack_folder"   # on ComfyUI's PromptServer instance: one per process, seen by every copy


def _server() -> Optional[Any]:
    """ComfyUI's PromptServer instance (it exists before any custom node loads), or None."""
    return getattr(getattr(_comfy("server"), "PromptServer", None), "instance", None)


def first_copy(folder: str) -> Optional[str]:
    """Inside ComfyUI, when the copy of the pack in `folder` is not the first one its server loaded (a
    second clone in custom_nodes/ under another name): the first copy's folder, with a warning naming
    both. None for the first copy (the first call claims it for `folder`) and outside ComfyUI.

    The mark lives on the server, not in a module: each copy is its own package with its own globals."""
    instance = _server()
    if instance is None:
        return None
    first = getattr(instance, _FIRST_COPY, None)
    if first is None:
        setattr(instance, _FIRST_COPY, folder)
    elif first != folder:
        log.warning("ComfyUI-STIV is installed twice, in %s and in %s: the nodes, routes and js/ of the first "
                    "are used, the second adds nothing; remove one of them", first, folder)
        return first
    return None


def add_get_route(path: str, handler: Callable[[dict[str, str]], dict]) -> bool:
    """Serve `handler(query) -> json` at GET `path` on ComfyUI's server, unless something already does
    (the route of an earlier import stays); True when it is served, False outside ComfyUI."""
    instance = _server()
    if instance is None:
        return False
    served = next((r for r in instance.routes if getattr(r, "method", None) == "GET"
                   and getattr(r, "path", None) == path), None)
    if served is not None:
        # aiohttp refuses a path twice when ComfyUI adds its routes, and the whole server fails to start
        log.warning("GET %s is already served (by %s); not added again", path,
                    getattr(served.handler, "__module__", "?"))
        return True
    from aiohttp import web

    async def route(request):
        try:
            return web.json_response(handler(dict(request.rel_url.query)))
        except (ValueError, FileNotFoundError) as err:
            return web.json_response({"error": str(err)}, status=400)

    instance.routes.get(path)(route)
    return True


# -- warnings in the page -----------------------------------------------------------------------
WARNING_EVENT = "stiv.warning"   # js/stiv.js shows each as a toast
# the library's loggers are named after its modules, under the package ComfyUI imported the pack as
_PACK = __name__[: -len(".nodes._comfy")] if __name__.endswith(".nodes._comfy") else ""
WARNING_LOGGERS = (f"{_PACK}.stiv_core" if _PACK else "stiv_core", "stiv.nodes")


class _PageWarnings(logging.Handler):
    def __init__(self, node: str):
        super().__init__(logging.WARNING)
        self.node = node

    def emit(self, record: logging.LogRecord) -> None:
        send_to_page(WARNING_EVENT, {"node": self.node, "message": record.getMessage()})


def send_to_page(event: str, data: dict) -> bool:
    """`data` to the browser that queued the running prompt (ComfyUI's `send_sync`), with the id of the
    node running; False outside ComfyUI."""
    instance = _server()
    if instance is None or not hasattr(instance, "send_sync"):
        return False
    instance.send_sync(event, {**data, "node_id": getattr(instance, "last_node_id", None)},
                       getattr(instance, "client_id", None))
    return True


@contextmanager
def warnings_to_page(node: str) -> Iterator[None]:
    """While `node` runs, the warnings the pack logs (unknown prompt words, resized images, a fallback)
    also go to the page, not only to the server log."""
    handler = _PageWarnings(node)
    loggers = [logging.getLogger(name) for name in WARNING_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
