"""ComfyUI-STIV: STIV video generation nodes for ComfyUI.

ComfyUI imports this folder as a package under whatever name it was cloned as, so every import here
is relative. The library itself lives in `stiv_core/` and never imports ComfyUI.
"""
from .nodes import DUPLICATE_OF, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# a second copy's js/ would register the extension twice, which the frontend refuses
WEB_DIRECTORY = "./js" if DUPLICATE_OF is None else None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
