"""The trainer's configuration: a TOML file mapped onto frozen, validated dataclasses.

A file has top-level run keys (`output_dir`, `max_steps`, `batch_size`, `seed`, `checkpoint_every`,
`resume`, ...) and the sections `[model]` (a preset name plus any `STIVConfig` field), `[optim]`,
`[recipe]`, `[data]` and `[init]`. When `[init]` names a checkpoint that records its STIV config (every
STIV checkpoint and converted file does), `[model]` takes the fields that file fixes from it (see
`model_config`). Command-line overrides are `key=value` or `section.key=value`,
with the value written as in TOML (`lr=1e-4`, `resume=true`, `data.kind="video_folder"`; a bare word
is read as a string). Every key is checked against the fields, so a typo fails before any training
with the valid names listed.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..checkpoint import CheckpointError, recorded_config
from ..conditioning import Task
from ..config import STIVConfig, preset
from ..data.config import ConfigError, DataConfig, coerce_enum as _coerce_enum, need as _need
from ..dtypes import WEIGHT_DTYPES
from ..encoders import TextEncoderKind, VAEKind


class OptimizerKind(str, enum.Enum):
    ADAFACTOR = "adafactor"   # the paper's: beta1 0.9, fixed beta2 0.999 (training/optim.py)
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"  # bitsandbytes, imported only when chosen


class MixedPrecision(str, enum.Enum):
    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


class InitKind(str, enum.Enum):
    NONE = "none"    # random initialisation
    FULL = "full"    # same architecture (e.g. lower resolution / fewer frames: RoPE scale in [model])
    T2I = "t2i"      # from a text-to-image model: spatial weights, time inflated, temporal attn zeroed
    SPLIT = "split"  # spatial weights from `path`, temporal attention from `temporal_path`


@dataclass(frozen=True)
class OptimConfig:
    name: OptimizerKind = OptimizerKind.ADAFACTOR
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8           # AdamW's epsilon; AdaFactor adds 1e-30 to squared gradients
    weight_decay: float = 0.0
    warmup_steps: int = 1000    # linear warm-up, then constant
    decay_steps: int = 0        # > 0: then linear decay to min_lr_ratio * lr over this many steps ...
    decay_start: int = 0        # ... from this step (set it when resuming a constant-LR run to anneal it)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0      # max global grad norm; 0 disables
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        _coerce_enum(self, "name", OptimizerKind)
        _need(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        for key in ("beta1", "beta2", "ema_decay"):
            _need(0 <= getattr(self, key) < 1, f"optim.{key}", "must be in [0, 1)", getattr(self, key))
        _need(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _need(self.decay_steps >= 0, "optim.decay_steps", "must be >= 0 (0: no decay)", self.decay_steps)
        _need(self.decay_start >= 0, "optim.decay_start", "must be >= 0", self.decay_start)
        _need(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _need(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)", self.grad_clip)
        _need(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)


@dataclass(frozen=True)
class RecipeConfig:
    """Condition dropout, the task mixture (relative weights) and MaskDiT."""

    text_dropout: float = 0.1
    image_dropout: float = 0.08
    task_t2v: float = 1.0
    task_ti2v: float = 0.0
    task_prediction: float = 0.0
    task_interpolation: float = 0.0
    task_keyframes: float = 0.0
    prediction_frames: int = 2      # k: frames given in the prediction task
    keyframe_stride: int = 2        # S: every S-th latent frame given in the keyframe task (TUP uses 2)
    maskdit_ratio: float = 0.0      # fraction of spatial tokens dropped (paper: 0.5); 0 = off
    maskdit_until_step: int = -1    # the unmasked fine-tune starts here; -1 = mask throughout
    time_mean: float = 0.0          # logit-normal time sampling (flow.sample_time)
    time_std: float = 1.0
    time_shift: float = 1.0
    freeze_temporal: bool = False   # T2I stage: temporal attention is meaningless for one frame

    def __post_init__(self) -> None:
        for key in ("text_dropout", "image_dropout"):
            _need(0 <= getattr(self, key) <= 1, f"recipe.{key}", "must be in [0, 1]", getattr(self, key))
        weights = self.task_weights
        _need(all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0, "recipe.task_*",
              "task weights must be >= 0 with a positive sum", weights)
        _need(self.prediction_frames >= 1, "recipe.prediction_frames", "must be >= 1", self.prediction_frames)
        _need(self.keyframe_stride >= 1, "recipe.keyframe_stride", "must be >= 1", self.keyframe_stride)
        _need(0 <= self.maskdit_ratio < 1, "recipe.maskdit_ratio", "must be in [0, 1)", self.maskdit_ratio)
        _need(self.time_std > 0, "recipe.time_std", "must be > 0", self.time_std)
        _need(self.time_shift > 0, "recipe.time_shift", "must be > 0", self.time_shift)

    @property
    def task_weights(self) -> dict[Task, float]:
        """The mixture's relative weights by task (the `task_<name>` fields, `<name>` a `Task` value)."""
        return {Task(f.name[5:]): getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("task_")}


@dataclass(frozen=True)
class InitConfig:
    kind: InitKind = InitKind.NONE
    path: str = ""
    temporal_path: str = ""

    def __post_init__(self) -> None:
        _coerce_enum(self, "kind", InitKind)
        if self.kind != InitKind.NONE:
            _need(bool(self.path), "init.path", f"is required for init.kind={self.kind.value!r}", self.path)
        if self.kind == InitKind.SPLIT:
            _need(bool(self.temporal_path), "init.temporal_path", "is required for init.kind='split'", "")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    model: STIVConfig
    max_steps: int = 1000
    batch_size: int = 4                 # per process
    seed: int = 0
    checkpoint_every: int = 500
    keep_last: int = 3                  # checkpoints kept (older ones are deleted)
    resume: bool = True                 # continue from the newest complete checkpoint in output_dir
    log_every: int = 10
    sample_every: int = 0               # 0 = no sample videos
    sample_prompts: tuple[str, ...] = ("a red square moving right",)
    sample_steps: int = 20
    sample_scale: float = 7.5           # JIT-CFG scale of the sample videos, recorded as the exported model's default
    export_dtype: str = "float32"       # dtype of the exported EMA model (float16 for shipping)
    mixed_precision: MixedPrecision = MixedPrecision.NO
    gradient_checkpointing: bool = False
    text_encoder: TextEncoderKind = TextEncoderKind.HASHED
    text_encoder_path: str = ""         # the local folder for text_encoder = "hf"
    pooled_text_encoder_path: str = ""  # a CLIP-like folder whose pooled (EOS) embedding replaces the
                                        # text encoder's (T5 tokens + CLIP pooled, as the paper); "hf" only
    vae: VAEKind = VAEKind.PIXEL
    vae_path: str = ""                  # the local folder or file for vae = "diffusers"
    vae_config: str = ""                # a single-file VAE's family (sd, sdxl, sd3, flux) or its config.json
    optim: OptimConfig = field(default_factory=OptimConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self) -> None:
        _coerce_enum(self, "mixed_precision", MixedPrecision)
        _coerce_enum(self, "text_encoder", TextEncoderKind)
        _coerce_enum(self, "vae", VAEKind)
        if self.text_encoder == TextEncoderKind.HF:
            _need(bool(self.text_encoder_path), "text_encoder_path", "is required for text_encoder='hf'", "")
        _need(not self.pooled_text_encoder_path or self.text_encoder == TextEncoderKind.HF,
              "pooled_text_encoder_path", "needs text_encoder='hf'", self.pooled_text_encoder_path)
        if self.vae == VAEKind.DIFFUSERS:
            _need(bool(self.vae_path), "vae_path", "is required for vae='diffusers'", "")
        _need(not self.vae_config or self.vae == VAEKind.DIFFUSERS, "vae_config", "needs vae='diffusers'",
              self.vae_config)
        _need(bool(self.output_dir), "output_dir", "must be a folder path", self.output_dir)
        for key in ("max_steps", "batch_size", "checkpoint_every", "keep_last", "log_every", "sample_steps"):
            _need(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        _need(self.sample_every >= 0, "sample_every", "must be >= 0 (0 = off)", self.sample_every)
        _need(math.isfinite(self.sample_scale) and self.sample_scale > 0, "sample_scale", "must be a positive number",
              self.sample_scale)
        _need(self.export_dtype in WEIGHT_DTYPES, "export_dtype", f"must be one of {sorted(WEIGHT_DTYPES)}",
              self.export_dtype)
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        self._check_model_fit()

    def _check_model_fit(self) -> None:
        pt, masked = self.model.temporal_patch, self.recipe.maskdit_ratio > 0
        _need(not masked or self.model.maskdit_extra_blocks > 0, "recipe.maskdit_ratio",
              "needs model.maskdit_extra_blocks > 0 (the blocks run after unmasking; an [init] checkpoint "
              "fixes their number)", self.recipe.maskdit_ratio)
        for frames, _, _ in self.data.buckets:
            _need(frames % pt == 0, "data.buckets", f"frame counts must be multiples of the model's "
                  f"temporal_patch {pt}", self.data.buckets)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


SECTIONS: dict[str, type] = {"optim": OptimConfig, "recipe": RecipeConfig, "data": DataConfig, "init": InitConfig}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The TrainConfig of the TOML file at `path` (None: defaults only) with `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{path}: not valid TOML ({err})") from err
    for item in overrides:
        _apply_override(raw, item)
    return build_config(raw)


def build_config(raw: Mapping[str, Any]) -> TrainConfig:
    raw = dict(raw)
    model_raw = dict(raw.pop("model", {}) or {})
    kwargs: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        kwargs[name] = _build(cls, raw.pop(name, {}) or {}, prefix=f"{name}.")
    kwargs["model"] = model_config(model_raw, kwargs["init"])
    if "output_dir" not in raw:
        raise ConfigError("output_dir is required (the folder for checkpoints and logs)")
    return _build(TrainConfig, {**raw, **kwargs}, prefix="", skip=("model", *SECTIONS))


# What an [init] checkpoint's recorded config fixes in [model]. Weight shapes, and what gives the
# weights their meaning (the head grouping, the predicted quantity): a different explicit value is an
# error. temporal_patch is free for "t2i" and "split", whose spatial source is inflated along time.
FIXED_BY_INIT = ("depth", "hidden_size", "num_heads", "latent_channels", "patch_size", "temporal_patch",
                 "mlp_ratio", "text_dim", "pooled_text_dim", "max_text_tokens", "maskdit_extra_blocks",
                 "prediction")
# Not weights: taken from the checkpoint unless [model] sets them (a new stage's RoPE interpolation).
INHERITED_FROM_INIT = ("rope_theta", "rope_position_scale", "norm_eps")
SIZE_FIELDS = ("depth", "hidden_size")  # what a preset name stands for


def model_config(model_raw: Mapping[str, Any], init: InitConfig) -> STIVConfig:
    """[model] resolved against the [init] checkpoint's recorded config, if any: the fields it fixes and
    inherits come from the file unless [model] sets them; a conflicting value is a ConfigError naming
    the field. Without an init config, [model] is the preset (default "tiny") with its fields changed."""
    explicit = dict(model_raw)
    preset_name = explicit.pop("preset", None)
    recorded = _recorded_init_config(init)
    fixed = [k for k in FIXED_BY_INIT if not (k == "temporal_patch" and init.kind != InitKind.FULL)]
    taken = {} if recorded is None else {k: getattr(recorded, k) for k in (*fixed, *INHERITED_FROM_INIT)
                                         if k not in explicit}
    try:
        base = preset(preset_name or "tiny")
        name = explicit.pop("name", None) or preset_name or getattr(recorded, "name", base.name)
        config = base.replace(**taken, **explicit, name=name)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"[model]: {err}") from err
    if recorded is None:
        return config
    conflicts = [f"model.{k} = {getattr(config, k)!r} vs {getattr(recorded, k)!r}" for k in fixed
                 if k in explicit and getattr(config, k) != getattr(recorded, k)]
    if preset_name:
        conflicts += [f"model.preset {preset_name!r} has {k} {getattr(base, k)} vs {getattr(recorded, k)}"
                      for k in SIZE_FIELDS if k not in explicit and getattr(base, k) != getattr(recorded, k)]
    if conflicts:
        raise ConfigError(f"[model] does not fit init.path {init.path!r}, whose recorded config fixes these "
                          f"fields (leave them out of [model] to take the file's): " + "; ".join(conflicts))
    return config


def _recorded_init_config(init: InitConfig) -> STIVConfig | None:
    if init.kind == InitKind.NONE:
        return None
    if not Path(init.path).is_file():
        raise ConfigError(f"init.path {init.path!r} does not exist (init.kind = {init.kind.value!r}; "
                          f"\"none\" starts from random weights)")
    try:
        return recorded_config(init.path)
    except CheckpointError as err:
        raise ConfigError(f"init.path: {err}") from err


def valid_keys() -> list[str]:
    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model", *SECTIONS)]
    nested = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    model = ["model.preset"] + [f"model.{f.name}" for f in dataclasses.fields(STIVConfig) if f.name != "name"]
    return top + nested + model


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value")
    if key not in valid_keys():
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string
    *sections, leaf = key.split(".")
    target = raw
    for section in sections:
        target = target.setdefault(section, {})
    target[leaf] = value


def _build(cls: type, values: Mapping[str, Any], *, prefix: str, skip: Sequence[str] = ()) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys: "
                          f"{[prefix + k for k in fields if k not in skip]}")
    hints = typing.get_type_hints(cls)
    checked = {k: v if k in skip else _check_type(prefix + k, hints[k], v) for k, v in values.items()}
    try:
        return cls(**checked)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def _check_type(name: str, hint: Any, value: Any) -> Any:
    """`value` as the field's type (ints widen to floats, strings name enums); else a ConfigError."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        return hint(value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        ok = isinstance(value, (list, tuple))
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return value
