"""The js/ extension's rules run under node.js: what each mode hides, that every name it hides is a real
input of the node, and that the plan query it sends is answered by the server's plan."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.test_nodes_common import ROOT, pack_module, write_small_bundle

nodes = pack_module("nodes")
plan = pack_module("nodes.plan")
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node.js is not installed")

SCRIPT = """
const rules = await import(process.argv[1]);
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
};
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


def test_every_hidden_name_is_an_input_of_its_node(js):
    for kind, names in js["rules"].items():
        spec = nodes.NODE_CLASS_MAPPINGS[kind].INPUT_TYPES()
        assert set(names) <= {*spec["required"], *spec.get("optional", {})}, kind


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
