// Which inputs each STIV node uses for its current settings, and the plan query for the sampler.
// Pure functions (no ComfyUI imports), so tests run them under node.js; stiv.js applies them.

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
