"""The STIV model configuration: one frozen, validated dataclass, the named presets and the names of
the micro-conditions. A leaf: it imports nothing else of stiv_core (the parameter counts of the presets
are in `model/sizes.py`: `python -m stiv_core.model.sizes`, or `python -m stiv_core.config`).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any


class Prediction(str, enum.Enum):
    """What the network outputs; the loss is always on velocity (see flow.py)."""

    VELOCITY = "velocity"
    DATA = "data"        # the clean sample x1


ALLOWED_TEMPORAL_PATCHES = (1, 2, 4)
# The paper's micro-conditions, in the order of the `(B, 6)` vector the model embeds (one embedder each)
# and `conditioning.MicroConditions.tensor` writes; pixels and frames of the original (pre-crop) video.
MICRO_CONDITIONS = ("height", "width", "crop_top", "crop_left", "frame_stride", "num_frames")

# The micro-conditions, in the order of the model's embedders (one per column of the `(B, 6)` tensor): part
# of every trained checkpoint, so never reordered.
MICRO_CONDITIONS = ("height", "width", "crop_top", "crop_left", "frame_stride", "num_frames")


@dataclass(frozen=True)
class STIVConfig:
    """Architecture of one STIV diffusion transformer (see DESIGN.md, "The model").

    Latents are `(B, latent_channels, T, H, W)`; tokens are `T / temporal_patch` frames of
    `(H / patch_size) * (W / patch_size)` spatial tokens each.
    """

    depth: int
    hidden_size: int
    num_heads: int
    latent_channels: int = 4
    patch_size: int = 2
    temporal_patch: int = 2
    mlp_ratio: float = 4.0
    text_dim: int = 4096          # width of the text encoder's token embeddings (T5-XXL: 4096)
    pooled_text_dim: int = 4096   # width of the pooled text embedding fed to adaLN-single
    max_text_tokens: int = 120
    # Blocks run after unmasking (MaskDiT trains with 2); 0 = no MaskDiT. Table 1's counts exclude them.
    maskdit_extra_blocks: int = 0
    rope_theta: float = 10000.0
    # Multiplies RoPE positions per axis (t, h, w); < 1 interpolates positions when a model trained
    # on a smaller grid is moved to a larger resolution or more frames (e.g. 256 -> 512 px: 0.5).
    rope_position_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    prediction: Prediction = Prediction.VELOCITY  # what the network outputs; the loss is always on velocity
    norm_eps: float = 1e-6
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"STIVConfig({self.name}): {message}")

        for key in ("depth", "hidden_size", "num_heads", "latent_channels", "patch_size",
                    "text_dim", "pooled_text_dim", "max_text_tokens"):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, f"{key} must be a positive int, got {value!r}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        need(self.head_dim % 4 == 0,
             f"head_dim {self.head_dim} must be divisible by 4 (2D RoPE splits it in two rotated halves)")
        need(self.temporal_patch in ALLOWED_TEMPORAL_PATCHES,
             f"temporal_patch must be one of {ALLOWED_TEMPORAL_PATCHES}, got {self.temporal_patch!r}")
        need(isinstance(self.maskdit_extra_blocks, int) and self.maskdit_extra_blocks >= 0,
             f"maskdit_extra_blocks must be an int >= 0, got {self.maskdit_extra_blocks!r}")
        need(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        need(self.prediction in tuple(Prediction),
             f"prediction must be 'velocity' or 'data', got {self.prediction!r}")
        object.__setattr__(self, "prediction", Prediction(self.prediction))
        scale = tuple(self.rope_position_scale)
        need(len(scale) == 3 and all(math.isfinite(s) and s > 0 for s in scale),
             f"rope_position_scale must be three positive numbers (t, h, w), got {scale!r}")
        object.__setattr__(self, "rope_position_scale", tuple(float(s) for s in scale))

    @property
    def num_blocks(self) -> int:
        """Transformer blocks a forward runs (`STIVTransformer.all_blocks()`): the main ones + MaskDiT's extra."""
        return self.depth + self.maskdit_extra_blocks

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def replace(self, **changes: Any) -> STIVConfig:
        """A copy with `changes` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown STIVConfig fields {sorted(unknown)}; valid: {field_names()}")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> STIVConfig:
        unknown = set(data) - set(field_names())
        if unknown:
            raise ValueError(f"unknown STIVConfig fields {sorted(unknown)}; valid: {field_names()}")
        data = dict(data)
        if "rope_position_scale" in data:
            data["rope_position_scale"] = tuple(data["rope_position_scale"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> STIVConfig:
        return cls.from_dict(json.loads(text))


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(STIVConfig)]


# Table 1 of the paper; text width 4096 and 120 tokens are PixArt-alpha's T5-XXL setting.
PRESETS: dict[str, STIVConfig] = {
    "tiny": STIVConfig(name="tiny", depth=4, hidden_size=128, num_heads=4, latent_channels=3,
                       patch_size=4, temporal_patch=2, text_dim=128, pooled_text_dim=128,
                       max_text_tokens=16),
    "XL": STIVConfig(name="XL", depth=28, hidden_size=1152, num_heads=18),
    "XXL": STIVConfig(name="XXL", depth=38, hidden_size=1536, num_heads=24),
    "M": STIVConfig(name="M", depth=46, hidden_size=3072, num_heads=48),
}
PAPER_PARAMETERS = {"XL": 600e6, "XXL": 1.5e9, "M": 8.7e9}


def preset(name: str, **changes: Any) -> STIVConfig:
    """The named preset, optionally with fields changed. Unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown STIV preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]


if __name__ == "__main__":  # the command predates model/sizes.py; run as a program, not imported
    from .model.sizes import main

    main()
