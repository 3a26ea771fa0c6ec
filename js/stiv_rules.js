// Which inputs each STIV node uses for its current settings, the plan query for the sampler, and the
// graph look-ups between samplers and their Loader. Pure functions (no ComfyUI imports), so tests run
// them under node.js; stiv.js applies them.

const GUIDED = (v) => v.guidance !== "none";
const SAMPLER_RULES = {
  scale: GUIDED,
  image_scale: (v) => v.guidance === "sit", // SIT-CFG's image scale only
  renormalize: GUIDED,
};

export const RULES = {
  STIVSampler: SAMPLER_RULES,
  STIVKeyframeInterpolate: SAMPLER_RULES,
  STIVInterpolateKeyframes: SAMPLER_RULES, // frames and size come from its keyframe LATENT
  STIVImageCondition: {
    keyframe_stride: (v) => v.frames === "keyframes",
    last_image: (v) => v.frames === "first+last", // an optional IMAGE socket
  },
};

/** Names of the inputs of `nodeType` that the settings `values` ({name: value}) leave unused. */
export function hiddenInputs(nodeType, values) {
  const rules = RULES[nodeType] || {};
  return Object.keys(rules).filter((name) => !rules[name](values));
}

/** The frames of the largest sampling pass: STIV Keyframe Interpolate samples its `keyframes` frames, then
 * windows of `keyframe_stride + 1` frames between them. */
function largestPass(nodeType, sampler) {
  if (nodeType !== "STIVKeyframeInterpolate") return sampler.frames;
  return Math.max(sampler.keyframes, sampler.keyframe_stride + 1);
}

/** The query string of GET /stiv/plan, from the sampler's and the loader's widget values; null for a
 * node whose widgets do not say the frames and size (STIV Interpolate Keyframes takes them from its
 * keyframe LATENT), so no plan is asked for rather than one for the wrong shape. */
export function planQuery(nodeType, sampler, loader) {
  if (nodeType === "STIVInterpolateKeyframes") return null;
  const frames = largestPass(nodeType, sampler);
  if (![frames, sampler.width, sampler.height].every(Number.isInteger)) return null;
  const q = {
    model_name: loader.model_name, frames, width: sampler.width, height: sampler.height,
    guidance: sampler.guidance, stepper: sampler.stepper, quantization: loader.quantization,
    block_swap: loader.block_swap, weight_dtype: loader.weight_dtype,
  };
  return new URLSearchParams(Object.entries(q).map(([k, v]) => [k, String(v)])).toString();
}

/** The lines shown on the sampler for a /stiv/plan answer. */
export function planLines(answer) {
  if (answer.error) return [`plan: ${answer.error}`];
  return answer.text.split("\n");
}

/** The link `id` of `graph`: a Map in current frontends, an object indexed by id in older ones. */
export function linkIn(graph, id) {
  const links = graph?.links;
  if (id == null || !links) return null;
  return (typeof links.get === "function" ? links.get(id) : links[id]) ?? null;
}

/** The STIV Loader feeding `node`'s model input, looked up in the node's own graph (a subgraph's nodes
 * are not in the root graph); null when the model comes from anything else. */
export function loaderOf(node) {
  const graph = node.graph;
  const input = (node.inputs || []).find((i) => i.name === "model");
  const link = input ? linkIn(graph, input.link) : null;
  const origin = link ? graph.getNodeById(link.origin_id) : null;
  return origin && origin.comfyClass === "STIVLoader" ? origin : null;
}

/** The nodes `loader`'s outputs connect to, in its own graph. */
export function targetsOf(loader) {
  const graph = loader.graph;
  const ids = (loader.outputs || []).flatMap((output) => output.links || []);
  return ids.map((id) => linkIn(graph, id)).filter(Boolean)
    .map((link) => graph.getNodeById(link.target_id)).filter(Boolean);
}

// the plan is drawn in 11 px monospace; a character's advance is 0.6 em in the usual monospace fonts
// (DejaVu Sans Mono, Liberation Mono, Menlo, Consolas), rounded up
export const PLAN_FONT = "11px monospace";
export const PLAN_LINE_PX = 14;
export const PLAN_CHAR_PX = 6.7;
export const PLAN_MARGIN_PX = 10;

/** `lines` broken at spaces (a word longer than a row, mid-word) so that no row has over `maxChars`; a
 * line's indentation is kept on each of its rows. */
export function wrapLines(lines, maxChars) {
  const rows = [];
  for (const line of lines) {
    const indent = line.match(/^ */)[0].slice(0, Math.max(0, Math.floor(maxChars) - 8));
    const width = Math.max(1, Math.floor(maxChars) - indent.length);
    let row = "";
    for (const word of line.slice(indent.length).split(" ")) {
      const next = row ? `${row} ${word}` : word;
      if (next.length <= width) {
        row = next;
        continue;
      }
      if (row) rows.push(indent + row);
      row = word;
      while (row.length > width) {
        rows.push(indent + row.slice(0, width));
        row = row.slice(width);
      }
    }
    rows.push(indent + row);
  }
  return rows;
}

/** The rows of the plan `lines` on a node `nodeWidth` px wide (a margin each side). */
export function planRows(lines, nodeWidth) {
  return wrapLines(lines, (nodeWidth - 2 * PLAN_MARGIN_PX) / PLAN_CHAR_PX);
}
