"""The ComfyUI nodes (thin: convert ComfyUI types at the edge, call one stiv_core function).

STIV Loader -> STIV_MODEL; STIV Text Encode / STIV Image Condition -> STIV_COND; STIV Sampler or STIV
Keyframe -> Interpolate (or, chained, STIV Sampler -> STIV Interpolate Keyframes) -> LATENT; STIV Decode
-> IMAGE, which ComfyUI's CreateVideo / SaveVideo save. ComfyUI's own CLIP (on STIV Text Encode) and VAE
(on STIV Image Condition and STIV Decode) can stand in for the model's encoders (nodes/comfy_adapters.py).
"""
import os

from . import _comfy
from .conditioning import STIVImageCondition, STIVTextEncode
from .decode import STIVDecode
from .loader import STIVLoader
from .plan import register_routes
from .sampler import STIVInterpolateKeyframes, STIVKeyframeInterpolate, STIVSampler

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "STIVLoader": STIVLoader,
    "STIVTextEncode": STIVTextEncode,
    "STIVImageCondition": STIVImageCondition,
    "STIVSampler": STIVSampler,
    "STIVKeyframeInterpolate": STIVKeyframeInterpolate,
    "STIVInterpolateKeyframes": STIVInterpolateKeyframes,
    "STIVDecode": STIVDecode,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "STIVLoader": "STIV Loader",
    "STIVTextEncode": "STIV Text Encode",
    "STIVImageCondition": "STIV Image Condition",
    "STIVSampler": "STIV Sampler",
    "STIVKeyframeInterpolate": "STIV Keyframe -> Interpolate",
    "STIVInterpolateKeyframes": "STIV Interpolate Keyframes",
    "STIVDecode": "STIV Decode",
}

PACK_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUPLICATE_OF = _comfy.first_copy(PACK_FOLDER)
"""None for the copy of the pack ComfyUI uses; for a second copy in custom_nodes/, the first one's folder:
ComfyUI would let the second copy's classes replace the first's, so it exports none (nor routes)."""
if DUPLICATE_OF is None:
    _comfy.register_model_folder()
    register_routes()
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
