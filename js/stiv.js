// The STIV frontend extension: hides inputs the chosen guidance / frames do not use, shows on the samplers
// the plan for the current settings (tokens, passes per step, the memory planner's verdict), asked again
// when the sampler's widgets, its connections or its Loader's settings change, and shows the warnings the
// server sends while a STIV node runs (unknown prompt words, ...) as toasts.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  PLAN_FONT, PLAN_LINE_PX, PLAN_MARGIN_PX, RULES, hiddenInputs, loaderOf, planLines, planQuery, planRows, targetsOf,
} from "./stiv_rules.js";

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
  node.setSize([node.size[0], node.computeSize()[1]]);
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
  if (node.comfyClass !== "STIVImageCondition") addPlanWidget(node);
  setTimeout(changed, 0); // after the workflow's widget values are set
}

// The plan as a widget after the node's own: the frontend lays it out with them (the node grows to hold
// it, also when it is narrowed), and ComfyUI's image / latent preview, a widget added later, goes below it.
// Its rows are wrapped to the node's width. Never saved in the workflow nor sent with the prompt.
function addPlanWidget(node) {
  node.addCustomWidget({
    name: "stiv_plan", type: "stiv-plan", value: "", serialize: false, options: { serialize: false },
    rows() {
      return node.stivPlan && !node.flags?.collapsed ? planRows(node.stivPlan, node.size[0]) : [];
    },
    computeSize() {
      const rows = this.rows().length;
      return [0, rows ? rows * PLAN_LINE_PX + 4 : -4];
    },
    draw(ctx, _node, _width, y) {
      ctx.save();
      ctx.font = PLAN_FONT;
      ctx.fillStyle = "#9ab";
      this.rows().forEach((row, i) => ctx.fillText(row, PLAN_MARGIN_PX, y + (i + 1) * PLAN_LINE_PX - 3));
      ctx.restore();
    },
  });
}

// a warning the server sent (nodes/_comfy.py: warnings_to_page) while a STIV node ran
api.addEventListener("stiv.warning", ({ detail }) => {
  const where = detail.node_id != null ? `${detail.node} (#${detail.node_id})` : detail.node;
  const toast = app.extensionManager?.toast;
  if (toast) toast.add({ severity: "warn", summary: where, detail: detail.message, life: 10000 });
  else console.warn(`${where}: ${detail.message}`);
});

app.registerExtension({
  name: "STIV.Nodes",
  nodeCreated(node) {
    if (node.comfyClass in RULES) watch(node);
    if (node.comfyClass === "STIVLoader") watchLoader(node);
  },
});
