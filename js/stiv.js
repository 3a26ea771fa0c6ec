// The STIV frontend extension: hides inputs the chosen guidance / frames do not use, and shows on the
// samplers the plan for the current settings (tokens, passes per step, the memory planner's verdict),
// asked again when the sampler's widgets, its connections or its Loader's settings change.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { RULES, hiddenInputs, loaderOf, planLines, planQuery, targetsOf } from "./stiv_rules.js";

const values = (node) => Object.fromEntries((node.widgets || []).map((w) => [w.name, w.value]));

function setWidgetHidden(widget, hidden) {
  if (!widget.stivOriginal) widget.stivOriginal = { type: widget.type, computeSize: widget.computeSize };
  widget.hidden = hidden; // the current frontend honours this flag; the two lines below serve older ones
  widget.type = hidden ? "stiv-hidden" : widget.stivOriginal.type;
  widget.computeSize = hidden ? () => [0, -4] : widget.stivOriginal.computeSize;
}

function setSocketShown(node, name, type, shown) {
  const index = (node.inputs || []).findIndex((i) => i.name === name);
  if (shown && index < 0) node.addInput(name, type);
  if (!shown && index >= 0 && node.inputs[index].link == null) node.removeInput(index);
}

function applyRules(node) {
  const hidden = new Set(hiddenInputs(node.comfyClass, values(node)));
  for (const widget of node.widgets || []) {
    if (widget.name in RULES[node.comfyClass]) setWidgetHidden(widget, hidden.has(widget.name));
  }
  if (node.comfyClass === "STIVImageCondition") setSocketShown(node, "last_image", "IMAGE", !hidden.has("last_image"));
  node.setSize([node.size[0], node.computeSize()[1] + (node.stivPlan ? node.stivPlan.length * 14 + 8 : 0)]);
  (node.graph ?? app.graph)?.setDirtyCanvas?.(true, true);
}

async function refreshPlan(node) {
  const loader = loaderOf(node);
  const query = loader && planQuery(node.comfyClass, values(node), values(loader));
  if (!query) return;
  try {
    const response = await api.fetchApi(`/stiv/plan?${query}`);
    node.stivPlan = planLines(await response.json());
  } catch (err) {
    node.stivPlan = [`plan unavailable: ${err}`];
  }
  applyRules(node);
}

function afterWidgetChange(node, names, fn) {
  for (const widget of node.widgets || []) {
    if (names && !names.includes(widget.name)) continue;
    const callback = widget.callback;
    widget.callback = function (...args) {
      const result = callback?.apply(this, args);
      fn();
      return result;
    };
  }
}

// the Loader's widgets that the plan query sends
const LOADER_PLAN_INPUTS = ["model_name", "weight_dtype", "quantization", "block_swap"];

function watchLoader(loader) {
  afterWidgetChange(loader, LOADER_PLAN_INPUTS, () => {
    for (const target of targetsOf(loader)) target.stivPlanSoon?.();
  });
}

function watch(node) {
  let timer = null;
  node.stivPlanSoon = () => {
    clearTimeout(timer);
    timer = setTimeout(() => refreshPlan(node), 300);
  };
  const changed = () => {
    applyRules(node);
    node.stivPlanSoon();
  };
  afterWidgetChange(node, null, changed);
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    onConnectionsChange?.apply(this, args);
    changed();
  };
  if (node.comfyClass !== "STIVImageCondition") {
    const onDrawForeground = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.stivPlan || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "11px monospace";
      ctx.fillStyle = "#9ab";
      this.stivPlan.forEach((line, i) => ctx.fillText(line, 10, this.size[1] - (this.stivPlan.length - i) * 14 + 4));
      ctx.restore();
    };
  }
  setTimeout(changed, 0); // after the workflow's widget values are set
}

app.registerExtension({
  name: "STIV.Nodes",
  nodeCreated(node) {
    if (node.comfyClass in RULES) watch(node);
    if (node.comfyClass === "STIVLoader") watchLoader(node);
  },
});
