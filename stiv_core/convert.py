"""Convert other models' checkpoints into STIV initialisations.

    python -m stiv_core.convert pixart PixArt-Sigma-XL-2-512-MS.safetensors --preset XL \
        --out stiv_xl_init.safetensors

reads a PixArt-alpha / PixArt-Sigma checkpoint (original or diffusers key names, safetensors only) and
writes a STIV checkpoint (config in its metadata) that the trainer's T2I -> T2V stage starts from
(`[init] kind = "full"`, or `"t2i"` after converting with `--temporal-patch 1`); the trainer takes the
recorded shape (heads, text tokens and widths, MaskDiT blocks, ...) from it. On a static clip the
converted model computes PixArt's spatial path with STIV's extra pieces at their converted values;
what cannot carry over is printed and stored in the file's metadata (`stiv_conversion`).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import cli
from .checkpoint import check_keys, check_safetensors, model_metadata, save_state_dict
from .config import STIVConfig, preset
from .dtypes import WEIGHT_DTYPES
from .flow import TIMESTEP_SCALE
from .model.transformer import STIVTransformer
from .pixart import (ConversionError, KeyStyle, PixArtShape, carried_tensors, key_style, pixart_shape,
                     to_original_names)

CONVERSION_KEY = "stiv_conversion"
PIXART_HEADS = 16  # PixArt-alpha/Sigma XL/2: 16 heads of 72 (the paper's STIV-XL uses 18 of 64)

# What cannot carry over from PixArt to STIV, whatever the checkpoint (the converted model must be
# fine-tuned with the flow-matching loss before it samples well).
DIFFERENCES = (
    "prediction: PixArt predicts noise (epsilon) under a DDPM schedule (timestep 0 = data, 999 = noise); "
    "STIV predicts velocity under flow matching (t = 0 noise, t = 1 data). The time direction is mapped "
    f"exactly (the timestep embedder's first layer is composed with s = {TIMESTEP_SCALE:g} * (1 - t)), the noise levels "
    "(DDPM alpha-bar vs linear interpolation) and the output quantity are not: fine-tune before sampling.",
    "positions: PixArt's absolute 2D sin-cos position embedding (pos_embed, added to the tokens) is "
    "dropped; STIV uses 2D RoPE in spatial attention and 1D RoPE in temporal attention, which no PixArt "
    "weight encodes.",
    "QK-norm: new RMSNorm on q and k in every attention, weight 1 (PixArt has none); it normalises q and "
    "k per head, so attention logits change scale until fine-tuned.",
    "sandwich norm: STIV normalises (stateless LayerNorm) the spatial-attention and FFN outputs before "
    "their gates, and the tokens before cross-attention; PixArt does not. Nothing to initialise.",
    "adaLN-single: same form (t_block -> adaln_single, per-block scale_shift_table kept, final table "
    "kept), but STIV's timestep embedder ends in a stateless LayerNorm PixArt lacks, and STIV adds pooled "
    "text and six micro-conditions to the condition: those new branches' output layers start at zero.",
    "learned sigma: PixArt's variance output rows are dropped; only the epsilon rows are kept.",
    "time: the patch embedding is inflated along time (repeated / temporal_patch, so a static clip "
    "embeds as the image); temporal attention is new (output projection zero: adds nothing at first), "
    "and so is the given-frame embedding (zero).",
)


@dataclass(frozen=True)
class ConversionReport:
    source: str
    key_style: KeyStyle
    shape: PixArtShape
    source_heads: int
    target_heads: int
    differences: tuple[str, ...] = DIFFERENCES
    notes: tuple[str, ...] = ()
    dropped_keys: tuple[str, ...] = ()
    new_keys: tuple[str, ...] = field(default=(), repr=False)

    def to_json(self) -> str:
        data = asdict(self)
        data["key_style"] = self.key_style.value
        data["shape"]["learned_sigma"] = self.shape.learned_sigma
        return json.dumps(data)

    def text(self) -> str:
        lines = [f"converted {self.source} ({self.key_style.value} key names) to STIV:",
                 *(f"  - {line}" for line in self.differences + self.notes)]
        if self.dropped_keys:
            lines.append(f"  dropped source tensors ({len(self.dropped_keys)}): {', '.join(self.dropped_keys[:8])}"
                         + (" ..." if len(self.dropped_keys) > 8 else ""))
        lines.append(f"  new STIV tensors not from the source: {len(self.new_keys)}")
        return "\n".join(lines)


def convert_pixart(state: dict[str, torch.Tensor], config: STIVConfig, *, source: str = "source",
                   source_heads: int = PIXART_HEADS, seed: int = 0) -> tuple[STIVTransformer, ConversionReport]:
    """A STIV model of `config` initialised from a PixArt state dict (either key style)."""
    style = key_style(state, source)
    original, unknown = to_original_names(state) if style is KeyStyle.DIFFUSERS else (dict(state), [])
    shape = pixart_shape(original, source)
    check_fits(shape, config, source)
    torch.manual_seed(seed)  # the new pieces' random init (temporal attention's q/k/v) is reproducible
    model = STIVTransformer(config)
    target = model.state_dict()
    carried = carried_tensors(original, shape, config.temporal_patch)
    for key in _zeroed_new_outputs(config):
        carried[key] = torch.zeros_like(target[key])
    check_keys(model, {k: tuple(v.shape) for k, v in {**target, **carried}.items()}, source)
    model.load_state_dict({**target, **carried})
    used = _used_source_keys(shape)
    dropped = sorted(set(unknown) | {k for k in original if k not in used})
    report = ConversionReport(source=source, key_style=style, shape=shape, source_heads=source_heads,
                              target_heads=config.num_heads, notes=_notes(shape, config, source_heads),
                              dropped_keys=tuple(dropped), new_keys=tuple(sorted(set(target) - set(carried))))
    return model, report


def check_fits(shape: PixArtShape, config: STIVConfig, source: str) -> None:
    pairs = {"hidden_size": shape.hidden_size, "depth": shape.depth, "latent_channels": shape.latent_channels,
             "patch_size": shape.patch_size, "mlp_hidden": shape.mlp_hidden, "text_dim": shape.text_dim}
    wrong = [f"{k}: source {v} vs config {getattr(config, k)}" for k, v in pairs.items() if getattr(config, k) != v]
    if shape.out_channels not in (shape.latent_channels, 2 * shape.latent_channels):
        wrong.append(f"output channels {shape.out_channels}: expected {shape.latent_channels} or twice that")
    if shape.null_text_tokens is not None and shape.null_text_tokens != config.max_text_tokens:
        wrong.append(f"max_text_tokens: source y_embedding has {shape.null_text_tokens} rows vs config "
                     f"{config.max_text_tokens} (pass --max-text-tokens {shape.null_text_tokens})")
    if wrong:
        raise ConversionError(f"{source} does not fit STIV config {config.name!r}: " + "; ".join(wrong))


def _zeroed_new_outputs(config: STIVConfig) -> list[str]:
    """New branches whose output layer starts at zero, so they add nothing to PixArt's computation."""
    keys = ["pooled_proj.2.weight", "pooled_proj.2.bias", "given_frame_embed.weight"]
    keys += [f"micro_embedders.{i}.mlp.2.{s}" for i in range(6) for s in ("weight", "bias")]
    keys += [f"blocks.{i}.temporal_attn.proj.{s}" for i in range(config.depth) for s in ("weight", "bias")]
    return keys


def _used_source_keys(shape: PixArtShape) -> set[str]:
    top = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1",
           "y_embedder.y_proj.fc2", "final_layer.linear"]
    block = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
             "mlp.fc1", "mlp.fc2"]
    used = {f"{name}.{s}" for name in top for s in ("weight", "bias")}
    used |= {f"blocks.{i}.{name}.{s}" for i in range(shape.depth) for name in block for s in ("weight", "bias")}
    used |= {f"blocks.{i}.scale_shift_table" for i in range(shape.depth)}
    return used | {"final_layer.scale_shift_table", "y_embedder.y_embedding"}


def _notes(shape: PixArtShape, config: STIVConfig, source_heads: int) -> tuple[str, ...]:
    notes = []
    if source_heads != config.num_heads:
        notes.append(f"heads: the source attends with {source_heads} heads, this config with "
                     f"{config.num_heads}; the weights fit but are regrouped into other heads, so attention "
                     f"changes (use num_heads = {source_heads} to keep PixArt's grouping)")
    else:
        notes.append(f"heads: {config.num_heads} as in the source (the paper's STIV-XL has 18; the weights "
                     f"do not fix the head count, so train with num_heads = {config.num_heads})")
    if shape.null_text_tokens is None:
        notes.append("null text: the source has no y_embedding (diffusers files drop it); STIV's learned "
                     "null text starts random, so CFG needs fine-tuning (or encode '' as the negative)")
    notes.append("micro-conditions: PixArt-alpha's resolution / aspect-ratio embedders (if any) are dropped; "
                 "STIV's micro-conditions are other quantities and start at zero")
    if config.maskdit_extra_blocks:
        notes.append(f"MaskDiT: the {config.maskdit_extra_blocks} extra blocks are new (random init) and change "
                     f"the output until trained")
    return tuple(notes)


def convert_pixart_file(src: str | os.PathLike, out: str | os.PathLike, config: STIVConfig, *,
                        source_heads: int = PIXART_HEADS, dtype: torch.dtype = torch.float32) -> ConversionReport:
    """Read `src`, convert, and write `out` with the config and the report in its metadata."""
    path = check_safetensors(src)
    model, report = convert_pixart(load_file(str(path)), config, source=path.name, source_heads=source_heads)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    # The recorded config is what the trainer's [init] and load_model build the model from.
    save_state_dict(out, state, model_metadata(config, {CONVERSION_KEY: report.to_json()}))
    return report


@cli.entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Convert; a user error exits with status 2 and one line (see cli.py)."""
    parser = cli.ArgumentParser(prog="python -m stiv_core.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    pixart = sub.add_parser("pixart", help="PixArt-alpha / PixArt-Sigma (original or diffusers key names)")
    pixart.add_argument("src", help="the PixArt .safetensors file")
    pixart.add_argument("--out", required=True, help="the STIV .safetensors file to write")
    pixart.add_argument("--preset", default="XL", help="STIV preset whose sizes the source must match")
    pixart.add_argument("--heads", type=cli.positive_int, default=PIXART_HEADS, help="the source's attention heads")
    pixart.add_argument("--temporal-patch", type=cli.positive_int, default=None,
                        help="default: the preset's (1 for [init] t2i)")
    pixart.add_argument("--max-text-tokens", type=cli.positive_int, default=None,
                        help="default: the source's null-text rows (120 alpha, 300 Sigma), else the preset's")
    pixart.add_argument("--pooled-text-dim", type=cli.positive_int, default=None,
                        help="width of the pooled text embedding (a new branch): e.g. 768 for a CLIP-L's, "
                             "1280 for a CLIP-G's; default: the preset's")
    pixart.add_argument("--maskdit-extra-blocks", type=cli.nonnegative_int, default=None,
                        help="MaskDiT's blocks after unmasking (new, random; 2 for a MaskDiT stage); "
                             "default: the preset's")
    pixart.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        config = _config_for(args)
        cli.writable_output(args.out)
        report = convert_pixart_file(args.src, args.out, config, source_heads=args.heads, dtype=WEIGHT_DTYPES[args.dtype])
    except SafetensorError as err:   # a truncated or corrupt file past its header check
        raise ValueError(f"{args.src} is not a readable safetensors file ({err})") from None
    print(report.text())
    kind = "'t2i' (inflated along time) or 'full'" if config.temporal_patch == 1 else "'full'"
    print(f"wrote {args.out} with its STIV config ({config.num_heads} heads, {config.max_text_tokens} text tokens "
          f"of width {config.text_dim}, pooled width {config.pooled_text_dim}, temporal patch "
          f"{config.temporal_patch}, {config.maskdit_extra_blocks} MaskDiT blocks). Train from it with "
          f"[init] kind = {kind}, path = {str(args.out)!r}: the trainer takes these fields from the file")


def _config_for(args: argparse.Namespace) -> STIVConfig:
    changes = {"num_heads": args.heads}
    options = {"temporal_patch": args.temporal_patch, "pooled_text_dim": args.pooled_text_dim,
               "maskdit_extra_blocks": args.maskdit_extra_blocks}
    changes.update({k: v for k, v in options.items() if v is not None})
    tokens = args.max_text_tokens or _null_text_rows(args.src)
    if tokens:
        changes["max_text_tokens"] = tokens
    return preset(args.preset, **changes)


def _null_text_rows(src: str) -> Optional[int]:
    from safetensors import safe_open

    with safe_open(str(check_safetensors(src)), framework="pt") as f:
        for key in ("y_embedder.y_embedding", "caption_projection.y_embedding"):
            if key in f.keys():
                return int(f.get_slice(key).get_shape()[0])
    return None


if __name__ == "__main__":
    main()
