"""The floating-point dtypes a user can name (config files, CLI flags, node widgets): one table."""
from __future__ import annotations

import torch

WEIGHT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                         "bfloat16": torch.bfloat16}
