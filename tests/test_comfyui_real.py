"""Opt-in: the pack inside a real ComfyUI (COMFYUI_DIR=/path/to/ComfyUI python -m pytest -m comfyui ...).

ComfyUI runs headless on the CPU, on loopback only, with a temporary base directory whose custom_nodes/
holds a link to this checkout (the ComfyUI checkout itself is not touched). The pack must load with no
import error, every shared workflow (converted from UI to API format here) must run to a saved video
through the HTTP API, ComfyUI's own VAE (VAELoader) and text encoder (CLIPLoader, a random-weight T5-base
written here) must work on the STIV nodes' optional vae / clip inputs, and the page must load js/stiv.js
in headless Chromium with no console error about it. Without the built-in weights the workflows are
pointed at a small random bundle in models/stiv.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.pack import MODEL_FILE, ROOT, write_small_bundle


COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
                                 reason="set COMFYUI_DIR to a ComfyUI checkout to run the real-ComfyUI tests")]
PACK_DIR = "ComfyUI-STIV"
STIV_NODES = {"STIVLoader", "STIVTextEncode", "STIVImageCondition", "STIVSampler", "STIVKeyframeInterpolate",
              "STIVInterpolateKeyframes", "STIVDecode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
START_TIMEOUT_S, RUN_TIMEOUT_S, PAGE_TIMEOUT_S = 240, 600, 120
BUILTIN = ROOT / "stiv_core" / "weights" / "stiv_tiny.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, base: Path, log: Path, model_name: str | None):
        self.url, self.base, self.log, self.model_name = url, base, log, model_name

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            raise AssertionError(f"POST {path}: {err.code} {err.read()[:2000]!r}") from None

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def prepare_base(base: Path, pack_dirs: tuple[str, ...]) -> str | None:
    """custom_nodes/ with a link to this checkout under each of `pack_dirs`, an input image, and (without
    the built-in weights) a small random bundle in models/stiv; returns the model file the workflows
    should load, or None."""
    (base / "custom_nodes").mkdir(parents=True)
    for name in pack_dirs:
        (base / "custom_nodes" / name).symlink_to(ROOT, target_is_directory=True)
    (base / "input").mkdir()
    example = Path(COMFYUI_DIR) / "input" / "example.png"
    if example.is_file():
        shutil.copy(example, base / "input" / "example.png")
    else:
        from PIL import Image
        Image.new("RGB", (64, 48), (200, 40, 120)).save(base / "input" / "example.png")
    if BUILTIN.is_file():
        return None
    write_small_bundle(base / "models" / "stiv")
    return MODEL_FILE


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server or browser we started; kill it if it does not go within 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


@contextlib.contextmanager
def running_server(pack_dirs: tuple[str, ...] = (PACK_DIR,)):
    """A ComfyUI server on a fresh base directory (see prepare_base), answering; stopped and removed after."""
    base = Path(tempfile.mkdtemp(prefix="stiv-comfy-"))
    model_name = prepare_base(base, pack_dirs)
    port, log = free_port(), base / "comfyui.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--disable-auto-launch"],
                                cwd=COMFYUI_DIR, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", base, log, model_name)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                srv.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in {START_TIMEOUT_S} s:\n{srv.log_tail()}")
                time.sleep(1)
        yield srv
    finally:
        stop(proc)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    with running_server() as srv:
        yield srv


# -- UI format -> API format ----------------------------------------------------------------------
def is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def to_api(workflow: dict, object_info: dict) -> dict:
    """The frontend's "Save (API)": nodes by id with class_type and inputs; links as [node_id, slot];
    widget values mapped to input names in INPUT_TYPES order, skipping the extra values the frontend
    keeps after a seed (control_after_generate) and after an image upload combo."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        info = object_info[n["type"]]
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        inputs, values = {}, list(n.get("widgets_values") or [])
        for name, spec in declared.items():
            if not is_widget(spec):
                continue
            opts = spec[1] if len(spec) > 1 else {}
            inputs[name] = values.pop(0)
            if opts.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
                values.pop(0)
            if opts.get("image_upload"):
                values.pop(0)
        assert not values, f"{n['type']}: widget values left over {values}"
        for socket_ in n.get("inputs", []):
            if socket_.get("link") is not None:
                _, origin, origin_slot, *_ = links[socket_["link"]]
                inputs[socket_["name"]] = [str(origin), origin_slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def shipped_workflows() -> list[Path]:
    return sorted((ROOT / "workflows").glob("*.json"))


def test_the_pack_loads_with_every_node_and_the_extension(server):
    info = server.get("/object_info", timeout=60)
    assert STIV_NODES <= set(info), f"missing: {STIV_NODES - set(info)}\n{server.log_tail()}"
    assert {"CreateVideo", "SaveVideo", "LoadImage", "ImageFromBatch"} <= set(info)
    log = server.log.read_text(errors="replace")
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if PACK_DIR in l), log
    assert f"/extensions/{PACK_DIR}/stiv.js" in server.get("/extensions")
    with urllib.request.urlopen(f"{server.url}/extensions/{PACK_DIR}/stiv.js", timeout=30) as r:
        assert b'registerExtension' in r.read()


def run_prompt(server: Server, prompt: dict, what: str) -> tuple[dict, list]:
    """Queue an API-format prompt, wait for it; its status and the frames (RGB arrays) of the mp4s it saved."""
    import av

    before = set((server.base / "output").rglob("*.mp4"))
    prompt_id = server.post("/prompt", {"prompt": prompt, "client_id": "stiv-test"})["prompt_id"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (history := server.get(f"/history/{prompt_id}")):
        assert time.monotonic() < deadline, f"{what} did not finish in {RUN_TIMEOUT_S} s:\n{server.log_tail()}"
        time.sleep(1)
    videos = []
    for path in sorted(set((server.base / "output").rglob("*.mp4")) - before):
        with av.open(str(path)) as video:
            videos.append([f.to_ndarray(format="rgb24") for f in video.decode(video=0)])
    return history[prompt_id]["status"], videos


def shipped_prompt(server: Server, name: str, model_name: str | None = None) -> dict:
    """A shared workflow in API format, its STIV Loader on `model_name` (else the test's model)."""
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    for n in workflow["nodes"]:
        if n["type"] == "STIVLoader" and (model_name or server.model_name):
            n["widgets_values"][0] = model_name or server.model_name
    return to_api(workflow, server.get("/object_info", timeout=60))


@pytest.mark.parametrize("path", shipped_workflows(), ids=lambda p: p.stem)
def test_every_shared_workflow_runs_to_a_saved_video(server, path):
    status, videos = run_prompt(server, shipped_prompt(server, path.stem), path.stem)
    assert status["status_str"] == "success", json.dumps(status["messages"])[:3000] + "\n" + server.log_tail()
    assert len(videos) == 1 and len(videos[0]) == 16 and videos[0][0].shape == (32, 32, 3)


def test_two_copies_of_the_pack_start_with_every_node_once_and_run_a_workflow():
    """A git clone beside a manager's install under another folder name: ComfyUI used to die at start-up
    (aiohttp refused the pack's route twice). Now one copy serves nodes, route and js/; the other warns."""
    copies = (PACK_DIR, PACK_DIR.lower())
    with running_server(copies) as srv:
        info = srv.get("/object_info", timeout=60)
        assert STIV_NODES <= set(info), f"missing: {STIV_NODES - set(info)}\n{srv.log_tail()}"
        modules = {n: info[n]["python_module"] for n in STIV_NODES}
        assert len(set(modules.values())) == 1, modules   # all from the same copy
        assert len([e for e in srv.get("/extensions") if e.endswith("/stiv.js")]) == 1, srv.get("/extensions")
        log = srv.log.read_text(errors="replace")
        assert "installed twice" in log and all(str(srv.base / "custom_nodes" / c) in log for c in copies), log
        status, videos = run_prompt(srv, shipped_prompt(srv, "stiv_text_to_video"), "text to video, two copies")
        assert status["status_str"] == "success", json.dumps(status["messages"])[:3000] + "\n" + srv.log_tail()
        assert len(videos) == 1 and len(videos[0]) == 16


# -- ComfyUI's own CLIP and VAE on the STIV nodes ---------------------------------------------------
T5_FILE, T5_MODEL_FILE = "t5_base_random.safetensors", "small_t5_base.safetensors"


def random_t5_encoder(config: dict) -> dict:
    """A T5 encoder's weights under Hugging Face's names (what ComfyUI's T5 loads), random, float16."""
    import torch

    d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).half()
    state = {"shared.weight": rand(config["vocab_size"], d), "encoder.final_layer_norm.weight": torch.ones(d).half(),
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                 rand(config["relative_attention_num_buckets"], config["num_heads"])}
    for i in range(config["num_layers"]):
        attention, dense = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        state.update({attention + f"SelfAttention.{n}.weight": rand(inner, d) for n in "qkv"})
        state.update({attention + "SelfAttention.o.weight": rand(d, inner), dense + "DenseReluDense.wi.weight": rand(ff, d),
                      dense + "DenseReluDense.wo.weight": rand(d, ff)})
        state.update({part + "layer_norm.weight": torch.ones(d).half() for part in (attention, dense)})
    return state


@pytest.fixture(scope="module")
def t5_base(server):
    """A random-weight T5-base text encoder (ComfyUI's own config; CLIPLoader type "stable_audio") in
    models/text_encoders, and a small bundle whose text width is T5-base's 768 in models/stiv."""
    from safetensors.torch import save_file

    config = json.loads((Path(COMFYUI_DIR) / "comfy" / "text_encoders" / "t5_config_base.json").read_text())
    folder = server.base / "models" / "text_encoders"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(random_t5_encoder(config), str(folder / T5_FILE))
    write_small_bundle(server.base / "models" / "stiv", text_dim=config["d_model"], name=T5_MODEL_FILE)
    return T5_FILE


def with_comfy_encoders(prompt: dict, clip_name: str | None) -> dict:
    """VAELoader's pixel_space on every STIV Image Condition and STIV Decode; CLIPLoader (`clip_name`, type
    stable_audio) on every STIV Text Encode."""
    prompt = {**prompt, "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}}
    if clip_name is not None:
        prompt["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": "stable_audio"}}
    for n in prompt.values():
        if n["class_type"] in ("STIVImageCondition", "STIVDecode"):
            n["inputs"]["vae"] = ["vae", 0]
        if n["class_type"] == "STIVTextEncode" and clip_name is not None:
            n["inputs"]["clip"] = ["clip", 0]
    return prompt


def with_png_frames(prompt: dict, prefix: str) -> dict:
    """Also every decoded frame through SaveImage (lossless PNGs named `prefix`): H.264 turns a difference
    of a fraction of a level into several levels on later frames, so exact comparisons use these."""
    decode = next(key for key, n in prompt.items() if n["class_type"] == "STIVDecode")
    return {**prompt, "png": {"class_type": "SaveImage", "inputs": {"images": [decode, 0], "filename_prefix": prefix}}}


def png_frames(server: Server, prefix: str) -> list:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted((server.base / "output").glob(f"{prefix}_*.png"))]


def test_comfyui_vae_loader_on_the_stiv_nodes_gives_the_same_video(server):
    """The built-in kind of model works in pixel space, so VAELoader's pixel_space is its own VAE."""
    runs = [run_prompt(server, prompt, "image to video") for prompt in
            (with_png_frames(shipped_prompt(server, "stiv_image_to_video"), "own"),
             with_png_frames(with_comfy_encoders(shipped_prompt(server, "stiv_image_to_video"), None), "comfy"))]
    for status, _ in runs:
        assert status["status_str"] == "success", json.dumps(status["messages"])[:3000] + "\n" + server.log_tail()
    (own_mp4,), (comfy_mp4,) = (videos for _, videos in runs)
    assert len(own_mp4) == len(comfy_mp4) == 16 and comfy_mp4[0].shape == (32, 32, 3)
    # both runs use the seed value the workflow holds (the API runs no control_after_generate). The float
    # paths differ by rounding only (the ComfyUI VAE sees [0, 1], the model's own [-1, 1]): on 8-bit PNG
    # frames at most one level here and there
    own, comfy = png_frames(server, "own"), png_frames(server, "comfy")
    assert len(own) == len(comfy) == 16
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(own, comfy)) <= 1
    assert max(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(own, comfy)) < 0.05


def test_comfyui_t5_on_stiv_text_encode_runs_and_a_wrong_width_is_reported(server, t5_base):
    status, videos = run_prompt(server, with_comfy_encoders(shipped_prompt(server, "stiv_image_to_video",
                                                                           T5_MODEL_FILE), t5_base), "T5 run")
    assert status["status_str"] == "success", json.dumps(status["messages"])[:3000] + "\n" + server.log_tail()
    assert len(videos) == 1 and len(videos[0]) == 16
    # T5-base (768 wide) into a model of another text width: the node's message reaches ComfyUI's error
    status, videos = run_prompt(server, with_comfy_encoders(shipped_prompt(server, "stiv_text_to_video"), t5_base),
                                "T5 into another width")
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert status["status_str"] == "error" and not videos and errors, status
    assert errors[0]["node_type"] == "STIVSampler", errors[0]
    assert "gives 768-wide text embeddings, but this model was trained on" in errors[0]["exception_message"], errors


# -- the frontend in headless Chromium --------------------------------------------------------------
def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


class Page:
    """A tiny Chrome DevTools Protocol client over one page's websocket: commands and the events seen."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self.next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]
            self.events.append(message)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return

    def evaluate(self, expression: str, timeout: float = 60):
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")


@pytest.fixture(scope="module")
def page(server):
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium)")
    port, profile = free_port(), Path(tempfile.mkdtemp(prefix="stiv-chromium-"))
    proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             "--disable-dev-shm-usage", "--window-size=1400,900", f"--user-data-dir={profile}",
                             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={port}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    target = next(t for t in json.loads(r.read()) if t["type"] == "page")
                break
            except (urllib.error.URLError, ConnectionError, StopIteration):
                assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.5)
        from websockets.sync.client import connect
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            p = Page(ws)
            for domain in ("Network", "Runtime", "Log", "Page"):
                p.call(f"{domain}.enable")
            p.call("Page.navigate", url=server.url + "/")
            deadline = time.monotonic() + PAGE_TIMEOUT_S
            while not p.evaluate("Boolean(window.app?.graph && window.app?.extensions?.length)"):
                assert time.monotonic() < deadline, "the ComfyUI page did not start its app"
                p.pump(1)
            p.pump(3)
            yield p
    finally:
        stop(proc)
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(events: list) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            out.append(json.dumps(p["exceptionDetails"])[:1000])
        elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
            out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
    return out


def test_the_frontend_loads_the_extension_in_headless_chromium(page):
    requested = {e["params"]["response"]["url"]: e["params"]["response"]["status"] for e in page.events
                 if e.get("method") == "Network.responseReceived"}
    ours = {u: s for u, s in requested.items() if f"/extensions/{PACK_DIR}/" in u}
    assert any(u.endswith("/stiv.js") for u in ours) and set(ours.values()) == {200}, ours
    assert "STIV.Nodes" in page.evaluate("window.app.extensions.map(e => e.name)")
    errors = [e for e in console_errors(page.events) if "stiv" in e.lower()]
    assert not errors, errors


SCREENSHOT_MAX_BYTES = 200_000


@pytest.mark.parametrize("path", shipped_workflows(), ids=lambda p: p.stem)
def test_the_frontend_opens_every_shared_workflow(page, server, path):
    """Every node of each shared workflow is known to the real frontend (registered, none shown as
    missing), the extension's rules ran on it (image_scale hidden outside SIT, a plan line on the samplers
    that have frames and size widgets, none on STIV Interpolate Keyframes); with STIV_SCREENSHOT_DIR set, a
    screenshot of it is saved there as <workflow>.png (the README's pictures)."""
    workflow = json.loads(path.read_text())
    if server.model_name is not None:  # as in the run test: the small random bundle, so the plan is real
        for n in workflow["nodes"]:
            if n["type"] == "STIVLoader":
                n["widgets_values"][0] = server.model_name
    page.evaluate(f"window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(path.stem)})"
                  ".then(() => true)")
    expected = sorted(n["type"] for n in workflow["nodes"])
    state = "window.app.graph._nodes.map(n => ({type: n.type, missing: Boolean(n.has_errors), " \
            "registered: n.type in LiteGraph.registered_node_types, plan: n.stivPlan ?? null, " \
            "hidden: (n.widgets || []).filter(w => w.hidden).map(w => w.name), " \
            "widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}))"
    deadline = time.monotonic() + 30
    while True:  # the extension asks for the plan 300 ms after a node is set up
        page.pump(1)
        nodes_ = page.evaluate(state)
        samplers = [n for n in nodes_ if n["type"] in ("STIVSampler", "STIVKeyframeInterpolate")]
        if all(n["plan"] for n in samplers) or time.monotonic() > deadline:
            break
    assert sorted(n["type"] for n in nodes_) == expected
    assert all(n["registered"] and not n["missing"] for n in nodes_), nodes_
    for n in nodes_:
        if "guidance" in n["widgets"]:
            assert ("image_scale" in n["hidden"]) == (n["widgets"]["guidance"] != "sit"), n
        if n["type"] in ("STIVSampler", "STIVKeyframeInterpolate"):
            assert n["plan"], n
            if server.model_name is not None:
                assert "tokens x" in n["plan"][0], n["plan"]
        if n["type"] == "STIVInterpolateKeyframes":
            assert n["plan"] is None, n
    assert overlapping(page.evaluate(BOUNDS)) == [], "nodes drawn over each other once the plans are shown"
    for layout in page.evaluate(PLAN_LAYOUT):
        check_plan_layout(layout)
    assert overlapping(page.evaluate(BOUNDS)) == [], "nodes drawn over each other once a preview is shown"
    errors = [e for e in console_errors(page.events) if "stiv" in e.lower()]
    assert not errors, errors
    folder = os.environ.get("STIV_SCREENSHOT_DIR")
    if folder:
        save_screenshot(page, Path(folder) / f"{path.stem}.png")


# every node's rectangle as drawn (boundingRect includes the title bar above pos)
BOUNDS = "window.app.graph._nodes.map(n => [n.id, ...n.boundingRect])"

# each sampler's plan rows measured as drawn (font from stiv_rules.js), at the node's width and narrowed to
# 200 px, and where ComfyUI's image preview widget lands once the node has an image (a 512 x 512 one, set
# on node.imgs as the latent preview does; left there, so the screenshot shows it)
PLAN_LAYOUT = """(async () => {
  const rules = await import("/extensions/ComfyUI-STIV/stiv_rules.js");
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = rules.PLAN_FONT;
  const picture = document.createElement("canvas");
  picture.width = picture.height = 512;   // the size ComfyUI's latent previews come at
  picture.getContext("2d").fillStyle = "#468";
  picture.getContext("2d").fillRect(0, 0, 512, 512);
  const image = new Image();
  image.src = picture.toDataURL();
  await image.decode();
  const draw = () => { window.app.canvas.draw(true, true); window.app.canvas.draw(true, true); };
  const measure = (n) => {
    const plan = n.widgets.find((w) => w.name === "stiv_plan");
    const preview = n.widgets.find((w) => w.name === "$$canvas-image-preview");
    return {width: n.size[0], height: n.size[1], rows: plan.rows(),
            widest: Math.max(...plan.rows().map((r) => ctx.measureText(r).width)),
            planTop: plan.y, planBottom: plan.y + plan.computedHeight, previewTop: preview ? preview.y : null};
  };
  const out = [];
  for (const n of window.app.graph._nodes.filter((n) => n.stivPlan)) {
    const shown = measure(n);
    n.imgs = [image];
    n.imageIndex = 0;
    draw();
    const previewed = measure(n);
    n.setSize([200, n.size[1]]);
    draw();
    out.push({id: n.id, margin: rules.PLAN_MARGIN_PX, plan: n.stivPlan, shown, previewed, narrow: measure(n)});
    n.setSize([shown.width, n.size[1]]);   // the preview stays for the screenshot
    draw();
  }
  return out;
})()"""


def overlapping(bounds: list) -> list:
    return [(a[0], b[0]) for i, a in enumerate(bounds) for b in bounds[i + 1:]
            if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]


def check_plan_layout(layout: dict) -> None:
    """The plan's rows fit the node's width and body, at its width and narrowed (the node grows to hold
    them); ComfyUI's image preview goes below the plan, not over it."""
    for state in ("shown", "previewed", "narrow"):
        s = layout[state]
        assert s["rows"] and s["widest"] + 2 * layout["margin"] <= s["width"] + 0.5, (state, layout)
        assert s["planBottom"] <= s["height"] + 0.5, (state, layout)
    assert len(layout["narrow"]["rows"]) >= len(layout["shown"]["rows"]) >= len(layout["plan"]), layout
    previewed = layout["previewed"]
    assert previewed["previewTop"] is not None and previewed["previewTop"] >= previewed["planBottom"], layout


def save_screenshot(page: Page, target: Path) -> None:
    """The canvas fitted to the graph, without dialogs, toasts, minimap and canvas info; a PNG under
    SCREENSHOT_MAX_BYTES (downscaled with Pillow if needed)."""
    import base64
    import io

    from PIL import Image

    page.evaluate("(async () => { const s = window.app.extensionManager.setting;"
                  " await s.set('Comfy.Minimap.Visible', false); await s.set('Comfy.Graph.CanvasInfo', false);"
                  " document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button')"
                  ".forEach(b => b.click());"
                  " await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); return true; })()")
    page.pump(2)
    image = Image.open(io.BytesIO(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])))
    image = image.convert("RGB")
    while True:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        if buffer.tell() < SCREENSHOT_MAX_BYTES:
            break
        image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
