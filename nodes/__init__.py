"""The ComfyUI nodes (thin: convert ComfyUI types at the edge, call one stiv_core function).

The node classes arrive with the node-pack issue; until then the pack registers none.
"""
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
