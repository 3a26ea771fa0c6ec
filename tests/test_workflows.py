"""Every shared workflow validates against the nodes' own INPUT_TYPES (node types exist, links connect
matching types, widget values in range, core nodes from a pinned list) and runs in a small graph runner
with stand-ins for ComfyUI's core nodes, on a small random bundle in place of the built-in model."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stiv_core.video_io import write_video
from tests.pack import ROOT, pack_module, write_small_bundle

nodes = pack_module("nodes")
bundle = pack_module("stiv_core.bundle")
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL = {"fixed", "increment", "decrement", "randomize"}
# ComfyUI's core nodes the workflows may use, pinned from Comfy-Org/ComfyUI a125cd8 (nodes.py,
# comfy_extras/nodes_images.py, nodes_video.py). "example.png" ships in ComfyUI's input/ folder.
CORE = {
    "LoadImage": ({"required": {"image": (["example.png"], {"image_upload": True})}}, ("IMAGE", "MASK")),
    "ImageFromBatch": ({"required": {"image": ("IMAGE",), "batch_index": ("INT", {"min": 0, "max": 4095}),
                                     "length": ("INT", {"min": 1, "max": 4096})}}, ("IMAGE",)),
    "CreateVideo": ({"required": {"images": ("IMAGE",), "fps": ("FLOAT", {"min": 1.0, "max": 120.0})},
                     "optional": {"audio": ("AUDIO",)}}, ("VIDEO",)),
    "SaveVideo": ({"required": {"filename_prefix": ("STRING", {}), "format": (["auto", "mp4"], {}),
                                "codec": (["auto", "h264"], {}), "video": ("VIDEO",)}}, ()),
}


def spec(kind: str) -> tuple[dict, tuple]:
    if kind in nodes.NODE_CLASS_MAPPINGS:
        cls = nodes.NODE_CLASS_MAPPINGS[kind]
        return cls.INPUT_TYPES(), cls.RETURN_TYPES
    return CORE[kind]


def inputs_of(kind: str) -> dict[str, tuple]:
    s = spec(kind)[0]
    return {**s.get("required", {}), **s.get("optional", {})}


def is_widget(entry: tuple) -> bool:
    return isinstance(entry[0], list) or entry[0] in WIDGETS


def sockets_of(kind: str) -> list[tuple[str, str]]:
    """(name, type) of the inputs that are sockets, not widgets, in the order the frontend creates them
    (required, then optional)."""
    return [(name, entry[0]) for name, entry in inputs_of(kind).items() if not is_widget(entry)]


def widget_values(kind: str, values: list) -> dict:
    """widgets_values (in INPUT_TYPES order, plus the frontend's extra control values) -> name: value."""
    named, values = {}, list(values)
    for name, entry in inputs_of(kind).items():
        if not is_widget(entry):
            continue
        if not values:
            raise ValueError(f"{kind}: no widget value for {name!r}")
        named[name] = values.pop(0)
        opts = entry[1] if len(entry) > 1 else {}
        if opts.get("control_after_generate"):
            if values.pop(0) not in CONTROL:
                raise ValueError(f"{kind}.{name}: control_after_generate value not one of {sorted(CONTROL)}")
        if opts.get("image_upload"):
            values.pop(0)
    if values:
        raise ValueError(f"{kind}: {len(values)} widget values left over: {values}")
    return named


def check_value(kind: str, name: str, entry: tuple, value) -> list[str]:
    kind_name, opts = entry[0], (entry[1] if len(entry) > 1 else {})
    where = f"{kind}.{name}={value!r}"
    if isinstance(kind_name, list):
        return [] if value in kind_name else [f"{where}: not one of {kind_name}"]
    ok = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "STRING": lambda v: isinstance(v, str), "BOOLEAN": lambda v: isinstance(v, bool)}[kind_name](value)
    if not ok:
        return [f"{where}: not a {kind_name}"]
    if kind_name in ("INT", "FLOAT") and not opts.get("min", value) <= value <= opts.get("max", value):
        return [f"{where}: outside {opts.get('min')}..{opts.get('max')}"]
    return []


def validate(workflow: dict) -> list[str]:
    """Everything wrong with a UI-format workflow, as messages (empty = valid)."""
    errors, by_id = [], {n["id"]: n for n in workflow["nodes"]}
    for n in workflow["nodes"]:
        if n["type"] not in nodes.NODE_CLASS_MAPPINGS and n["type"] not in CORE:
            errors.append(f"node {n['id']}: unknown type {n['type']!r}")
            continue
        try:
            named = widget_values(n["type"], n.get("widgets_values", []))
        except ValueError as err:
            errors.append(str(err))
            continue
        declared = inputs_of(n["type"])
        errors += [e for name, v in named.items() for e in check_value(n["type"], name, declared[name], v)]
        # the frontend's LGraphNode.configure copies the saved inputs over the node's sockets BY INDEX: a
        # socket left out (or out of order) shifts those after it, and the one it lands on is lost
        saved = [(i["name"], i["type"]) for i in n.get("inputs", []) if "widget" not in i]
        if saved != sockets_of(n["type"]):
            errors.append(f"node {n['id']} ({n['type']}): saved inputs {saved} are not its sockets in order "
                          f"{sockets_of(n['type'])}")
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        required = spec(n["type"])[0].get("required", {})
        errors += [f"{n['type']}.{name}: required input not connected" for name, e in required.items()
                   if not is_widget(e) and name not in linked]
    for link_id, a, a_slot, b, b_slot, kind in workflow["links"]:
        if a not in by_id or b not in by_id:
            errors.append(f"link {link_id}: node {a if a not in by_id else b} does not exist")
            continue
        src, dst = by_id[a], by_id[b]
        if src["type"] not in nodes.NODE_CLASS_MAPPINGS and src["type"] not in CORE or \
                dst["type"] not in nodes.NODE_CLASS_MAPPINGS and dst["type"] not in CORE:
            continue
        out_types, socket = spec(src["type"])[1], dst["inputs"][b_slot]
        declared = inputs_of(dst["type"]).get(socket["name"], (None,))[0]
        if not (a_slot < len(out_types) and out_types[a_slot] == kind == declared == socket["type"]):
            errors.append(f"link {link_id}: {src['type']}[{a_slot}] -> {dst['type']}.{socket['name']} "
                          f"connects {out_types[a_slot] if a_slot < len(out_types) else '?'} to {declared}")
        if socket.get("link") != link_id or link_id not in src["outputs"][a_slot].get("links", []):
            errors.append(f"link {link_id}: not recorded on both of its nodes")
    return errors


# LiteGraph.NODE_TITLE_HEIGHT: the frontend draws a node's title bar above its pos, its body (size) below
TITLE_HEIGHT = 30


def node_rect(n: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node as drawn: the title bar above pos, then size."""
    (x, y), (w, h) = n["pos"], n["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def overlapping_nodes(workflow: dict) -> list[tuple[int, int]]:
    """The pairs of node ids whose drawn rectangles overlap (touching edges do not)."""
    rects = [(n["id"], node_rect(n)) for n in workflow["nodes"]]
    return [(a, b) for i, (a, ra) in enumerate(rects) for b, rb in rects[i + 1:]
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]]


def ends_in_save_video(workflow: dict) -> bool:
    by_id = {n["id"]: n for n in workflow["nodes"]}
    feeds = {(by_id[a]["type"], by_id[b]["type"]) for _, a, _, b, _, _ in workflow["links"]}
    return {("STIVDecode", "CreateVideo"), ("CreateVideo", "SaveVideo")} <= feeds


# -- the runner ---------------------------------------------------------------------------------
def core_stubs(saved: list, out_dir: Path) -> dict:
    def load_image(image):
        picture = torch.linspace(0, 1, 48 * 64 * 3).view(48, 64, 3)   # another size: the node fits it
        return picture[None], torch.zeros(1, 48, 64)

    def save_video(video, filename_prefix, format, codec):
        frames = video["images"].permute(3, 0, 1, 2) * 2 - 1
        saved.append(write_video(out_dir / f"{filename_prefix.replace('/', '_')}_{len(saved)}.gif", frames,
                                 fps=video["fps"]))
        return ()

    return {"LoadImage": load_image,
            "ImageFromBatch": lambda image, batch_index, length: (image[batch_index : batch_index + length],),
            "CreateVideo": lambda images, fps, audio=None: ({"images": images, "fps": fps},),
            "SaveVideo": save_video}


def run_workflow(workflow: dict, stubs: dict) -> dict:
    """Executes every node once, sources first, as ComfyUI's executor does; returns outputs by node id."""
    by_id, results = {n["id"]: n for n in workflow["nodes"]}, {}
    sources = {(b, b_slot): (a, a_slot) for _, a, a_slot, b, b_slot, _ in workflow["links"]}

    def run(node_id):
        if node_id not in results:
            n = by_id[node_id]
            kwargs = widget_values(n["type"], n.get("widgets_values", []))
            for slot, socket in enumerate(n.get("inputs", [])):
                if (node_id, slot) in sources:
                    a, a_slot = sources[(node_id, slot)]
                    kwargs[socket["name"]] = run(a)[a_slot]
            if n["type"] in stubs:
                results[node_id] = stubs[n["type"]](**kwargs)
            else:
                cls = nodes.NODE_CLASS_MAPPINGS[n["type"]]
                results[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return results[node_id]

    for node_id in by_id:
        run(node_id)
    return results


@pytest.fixture(scope="module")
def builtin_stand_in(tmp_path_factory):
    """The built-in 'tiny' entry pointed at a small random bundle (32x32 px fits its patch 4)."""
    path = write_small_bundle(tmp_path_factory.mktemp("builtin"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bundle.BUILTIN_MODELS, "tiny", path)
        yield path


def test_there_is_a_workflow_per_task_each_with_a_thumbnail():
    names = {p.stem for p in WORKFLOWS}
    assert names == {"stiv_text_to_video", "stiv_image_to_video", "stiv_interpolation", "stiv_video_prediction",
                     "stiv_long_video"}
    for path in WORKFLOWS:
        with Image.open(path.with_suffix(".jpg")) as thumb:
            assert thumb.format == "JPEG" and min(thumb.size) >= 128


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_and_runs_to_a_saved_video(path, builtin_stand_in, tmp_path):
    workflow = json.loads(path.read_text())
    assert validate(workflow) == [] and ends_in_save_video(workflow)
    saved = []
    results = run_workflow(workflow, core_stubs(saved, tmp_path))
    assert len(saved) == 1 and saved[0].is_file()
    video = next(r[0] for i, r in results.items() if r and isinstance(r[0], dict) and "fps" in r[0])
    assert video["images"].shape == (16, 32, 32, 3) and torch.isfinite(video["images"]).all()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_two_nodes_of_a_workflow_overlap(path):
    workflow = json.loads(path.read_text())
    assert overlapping_nodes(workflow) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_given_frames_come_from_the_model_own_t2v_pass(path):
    """A first run shows the model's domain: no image is loaded from ComfyUI's input/ (its example.png is a
    768x768 cartoon); every STIV Image Condition's images are frames the workflow's own STIV Decode made."""
    workflow = json.loads(path.read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    source = {(b, b_slot): a for _, a, _, b, b_slot, _ in workflow["links"]}
    assert not any(n["type"] == "LoadImage" for n in workflow["nodes"])
    for n in (n for n in workflow["nodes"] if n["type"] == "STIVImageCondition"):
        for slot, socket in enumerate(n["inputs"]):
            if socket["type"] == "IMAGE" and socket["link"] is not None:
                origin = by_id[source[(n["id"], slot)]]
                assert origin["type"] == "ImageFromBatch", origin
                assert by_id[source[(origin["id"], 0)]]["type"] == "STIVDecode"


def test_the_overlap_check_counts_the_title_bar():
    node = lambda i, x, y: {"id": i, "pos": [x, y], "size": [300, 200]}
    assert overlapping_nodes({"nodes": [node(1, 0, 0), node(2, 300, 0), node(3, 0, 230)]}) == []
    # 10 px below the first node's body: its title bar (30 px above pos) is drawn over that body
    assert overlapping_nodes({"nodes": [node(1, 0, 0), node(2, 0, 210)]}) == [(1, 2)]
    assert overlapping_nodes({"nodes": [node(1, 0, 0), node(2, 299, 100)]}) == [(1, 2)]


def test_the_validator_catches_broken_workflows():
    good = json.loads((ROOT / "workflows" / "stiv_image_to_video.json").read_text())
    broken = []
    for change in (lambda w: w["nodes"][0].update(type="STIVLoaderV2"),
                   lambda w: w["nodes"][0].update(type="KSampler"),
                   lambda w: w["links"][0].__setitem__(5, "LATENT"),
                   lambda w: next(n for n in w["nodes"] if n["type"] == "STIVSampler")["widgets_values"].__setitem__(0, 0),
                   lambda w: next(n for n in w["nodes"] if n["type"] == "STIVSampler")["widgets_values"].__setitem__(8, "pag"),
                   lambda w: next(n for n in w["nodes"] if n["type"] == "STIVSampler")["widgets_values"].pop(),
                   lambda w: w["nodes"][0]["widgets_values"].__setitem__(0, "missing.safetensors"),
                   lambda w: next(n for n in w["nodes"] if n["type"] == "STIVImageCondition")["inputs"].pop(2)):
        w = copy.deepcopy(good)
        change(w)
        broken.append(validate(w))
    assert all(broken), broken
    assert "unknown type 'KSampler'" in broken[1][0] and "not one of" in broken[4][0]
    assert "are not its sockets in order" in broken[7][0]   # the vae socket left out
