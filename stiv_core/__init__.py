"""stiv_core: a self-contained PyTorch implementation of STIV (arXiv 2412.07730).

Never imports ComfyUI. Imports inside the package are relative, so it works both as the top-level
package `stiv_core` and as a subpackage of the ComfyUI node pack. Exports load lazily, so
`python -m stiv_core.<module>` runs each module exactly once.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["PRESETS", "STIVConfig", "preset"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'stiv_core' has no attribute {name!r}")
