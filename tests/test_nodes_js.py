"""The js/ extension's rules run under node.js: what each mode hides, that every name it hides is a real
input of the node, and that the plan query it sends is answered by the server's plan."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.pack import ROOT, pack_module, write_small_bundle


nodes = pack_module("nodes")
plan = pack_module("nodes.plan")
NODE = shutil.which("node")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NODE is None, reason="node.js is not installed")]

SCRIPT = """
const rules = await import(process.argv[1]);
const loader = {model_name: "small.safetensors", quantization: "none", block_swap: 0, weight_dtype: "auto"};
const out = {
  rules: Object.fromEntries(Object.entries(rules.RULES).map(([k, v]) => [k, Object.keys(v)])),
  jit: rules.hiddenInputs("STIVSampler", {guidance: "jit"}),
  sit: rules.hiddenInputs("STIVSampler", {guidance: "sit"}),
  none: rules.hiddenInputs("STIVKeyframeInterpolate", {guidance: "none"}),
  first: rules.hiddenInputs("STIVImageCondition", {frames: "first"}),
  firstLast: rules.hiddenInputs("STIVImageCondition", {frames: "first+last"}),
  keyframes: rules.hiddenInputs("STIVImageCondition", {frames: "keyframes"}),
  query: rules.planQuery("STIVSampler", {frames: 4, width: 16, height: 16, guidance: "sit", stepper: "euler"},
                         {model_name: "small.safetensors", quantization: "none", block_swap: 0, weight_dtype: "auto"}),
  lines: rules.planLines({error: "no model"}),
  interpJit: rules.hiddenInputs("STIVInterpolateKeyframes", {guidance: "jit"}),
  interpSit: rules.hiddenInputs("STIVInterpolateKeyframes", {guidance: "sit"}),
  interpNone: rules.hiddenInputs("STIVInterpolateKeyframes", {guidance: "none"}),
  interpQuery: rules.planQuery("STIVInterpolateKeyframes",
                               {keyframe_stride: 5, seed: 0, steps: 8, shift: 3.0, stepper: "euler", guidance: "jit",
                                scale: 5.0, image_scale: 2.0, renormalize: true}, loader),
  keyframeQuery: rules.planQuery("STIVKeyframeInterpolate",
                                 {keyframes: 4, keyframe_stride: 5, width: 16, height: 16, guidance: "jit",
                                  stepper: "euler"}, loader),
  manyKeyframesQuery: rules.planQuery("STIVKeyframeInterpolate",
                                      {keyframes: 8, keyframe_stride: 3, width: 16, height: 16, guidance: "jit",
                                       stepper: "euler"}, loader),
};

// a Loader -> sampler pair inside a subgraph (links a Map, as current frontends keep them) whose ids
// collide with other nodes of the root graph, and the same pair in an older frontend's graph (links an
// object indexed by id); `node.graph` is each node's own graph
function graphOf(nodes, links) {
  const graph = {links, getNodeById: (id) => nodes.find((n) => n.id === id) ?? null};
  for (const n of nodes) n.graph = graph;
  return graph;
}
const pair = () => [{id: 3, comfyClass: "STIVLoader", outputs: [{name: "model", links: [7]}]},
                    {id: 5, comfyClass: "STIVSampler", inputs: [{name: "model", link: 7}, {name: "conditioning", link: null}]}];
const link = {id: 7, origin_id: 3, origin_slot: 0, target_id: 5, target_slot: 0};
const [subLoader, subSampler] = pair();
graphOf([subLoader, subSampler], new Map([[7, link]]));
graphOf([{id: 3, comfyClass: "STIVTextEncode"}, {id: 5, comfyClass: "STIVSampler"}], new Map());   // the root
const [oldLoader, oldSampler] = pair();
graphOf([oldLoader, oldSampler], {7: link});
const unlinked = {id: 9, comfyClass: "STIVSampler", inputs: [{name: "model", link: null}]};
graphOf([unlinked], new Map());
out.graph = {
  subgraphLoader: rules.loaderOf(subSampler) === subLoader,
  subgraphTargets: rules.targetsOf(subLoader).map((n) => n === subSampler),
  oldLoader: rules.loaderOf(oldSampler) === oldLoader,
  oldTargets: rules.targetsOf(oldLoader).map((n) => n === oldSampler),
  unlinked: rules.loaderOf(unlinked),
  missingLink: rules.linkIn(subSampler.graph, 8),
};
// the plan's rows on a 300 px sampler and a narrowed one, for a plan with the long lines the real one has
const plan = ["64 tokens x 2 passes per step (jit)",
              "budget: all 139.72 GiB of cuda:0 (ComfyUI's other models are freed before sampling) and 120.00 GiB of host RAM available",
              "  weights 0.01 GiB + activations 0.02 GiB + ring 0.00 GiB = peak 0.03 GiB", "x".repeat(80), ""];
out.wrap = {lines: plan, wide: rules.planRows(plan, 300), narrow: rules.planRows(plan, 200),
            maxChars300: Math.floor((300 - 2 * rules.PLAN_MARGIN_PX) / rules.PLAN_CHAR_PX),
            maxChars200: Math.floor((200 - 2 * rules.PLAN_MARGIN_PX) / rules.PLAN_CHAR_PX)};
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def js():
    done = subprocess.run([NODE, "--input-type=module", "-e", SCRIPT, (ROOT / "js" / "stiv_rules.js").as_uri()],
                          capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout)


def test_modes_hide_what_they_do_not_use(js):
    assert js["jit"] == ["image_scale"] and js["sit"] == []
    assert set(js["none"]) == {"scale", "image_scale", "renormalize"}
    assert set(js["first"]) == {"keyframe_stride", "last_image"}
    assert js["firstLast"] == ["keyframe_stride"] and js["keyframes"] == ["last_image"]
    assert js["lines"] == ["plan: no model"]


def test_interpolate_keyframes_hides_like_the_samplers_and_asks_no_plan(js):
    """STIV Interpolate Keyframes has the samplers' guidance inputs, so the same ones hide; its frames and
    size come from the keyframe LATENT (no widgets), so no plan is asked for rather than a wrong one."""
    assert js["interpJit"] == ["image_scale"] and js["interpSit"] == []
    assert set(js["interpNone"]) == {"scale", "image_scale", "renormalize"}
    assert js["interpQuery"] is None


def test_keyframe_interpolate_plans_its_largest_pass(js):
    """The keyframe pass samples `keyframes` frames, each window `keyframe_stride + 1`: the larger is planned."""
    from urllib.parse import parse_qs
    assert parse_qs(js["keyframeQuery"])["frames"] == ["6"]        # 4 keyframes, windows of 5 + 1
    assert parse_qs(js["manyKeyframesQuery"])["frames"] == ["8"]   # 8 keyframes, windows of 3 + 1


def test_the_loader_is_found_in_the_node_own_graph(js):
    """A sampler inside a subgraph finds its Loader there (not a root-graph node with the same id), on current
    frontends (links in a Map) and older ones (links indexed by id); a Loader finds the samplers it feeds,
    whose plans its quantization / block_swap / weight_dtype / model_name changes refresh."""
    assert js["graph"] == {"subgraphLoader": True, "subgraphTargets": [True], "oldLoader": True,
                           "oldTargets": [True], "unlinked": None, "missingLink": None}


def test_every_node_with_guidance_has_the_sampler_rules(js):
    for kind, cls in nodes.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        if "guidance" in {*spec["required"], *spec.get("optional", {})}:
            assert set(js["rules"].get(kind, ())) >= {"scale", "image_scale", "renormalize"}, kind


def test_every_hidden_name_is_an_input_of_its_node(js):
    for kind, names in js["rules"].items():
        spec = nodes.NODE_CLASS_MAPPINGS[kind].INPUT_TYPES()
        assert set(names) <= {*spec["required"], *spec.get("optional", {})}, kind


def test_plan_rows_fit_the_node_width_and_keep_every_word(js):
    """The rows drawn on the sampler fit its width (js/stiv.js draws them in monospace at PLAN_CHAR_PX per
    character, a margin each side); narrowed, more rows; no text lost, indentation kept."""
    wrap = js["wrap"]
    for rows, limit in ((wrap["wide"], wrap["maxChars300"]), (wrap["narrow"], wrap["maxChars200"])):
        assert max(len(r) for r in rows) <= limit and len(rows) > len(wrap["lines"])
        assert "".join(rows).replace(" ", "") == "".join(wrap["lines"]).replace(" ", "")
    assert len(wrap["narrow"]) > len(wrap["wide"])
    assert any(r.startswith("  weights") for r in wrap["wide"]) and all(
        r.startswith("  ") for r in wrap["wide"] if "activations" in r or "peak" in r)


def test_the_plan_query_is_answered(js, tmp_path, monkeypatch):
    write_small_bundle(tmp_path)
    monkeypatch.setenv("STIV_MODEL_DIRS", str(tmp_path))
    from urllib.parse import parse_qsl
    answer = plan.describe_plan(plan.PlanQuery.from_query(dict(parse_qsl(js["query"]))))
    assert answer["tokens"] == 32 and answer["passes_per_step"] == 3 and "memory plan" in answer["text"]


def test_the_pack_serves_only_through_web_directory():
    pyproject = ROOT / "pyproject.toml"
    assert not pyproject.is_file() or "[tool.comfy]" not in pyproject.read_text() or \
        "web" not in pyproject.read_text().split("[tool.comfy]")[1].split("\n[")[0]
    assert sorted(p.name for p in (ROOT / "js").glob("*.js")) == ["stiv.js", "stiv_rules.js"]
