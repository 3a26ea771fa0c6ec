"""stiv_core: a self-contained PyTorch implementation of STIV (arXiv 2412.07730).

Never imports ComfyUI. Imports inside the package are relative, so it works both as the top-level
package `stiv_core` and as a subpackage of the ComfyUI node pack.
"""
from .config import PRESETS, STIVConfig, preset

__all__ = ["PRESETS", "STIVConfig", "preset"]
__version__ = "0.1.0"
