"""Real text encoders (T5, CLIP, any Hugging Face encoder) from a LOCAL folder, offline.

transformers is imported only here and only when such an encoder is built; nothing is downloaded
(`local_files_only=True`), and only safetensors weights are read (`model.safetensors`, never a pickle
`pytorch_model.bin`). Tokens are the encoder's last hidden states (what cross-attention reads);
the pooled embedding (what adaLN-single reads) follows the paper:
- CLIP-like encoders: the hidden state of the last real token, the EOS token that carries the sentence
  (CLIP's own `pooler_output`), through the text projection when the folder has one
  (`CLIPTextModelWithProjection`, e.g. SDXL's CLIP-G, or a full `CLIPModel`: `text_embeds`);
- T5 and other encoders without a pooled output: the mean of the real tokens. The paper's setup, T5
  tokens with a CLIP pooled embedding, is `CombinedTextEncoder` (encoders/combined.py).
"""
from __future__ import annotations

import enum
import importlib.util
from pathlib import Path
from typing import Optional

import torch

from ..interfaces import TextEmbedding, masked_mean
from .weight_folders import require_safetensors

T5_TYPES = ("t5", "mt5", "umt5")
SAFETENSORS_WEIGHTS = "model.safetensors"  # transformers' name (SAFE_WEIGHTS_NAME)


class Pooling(str, enum.Enum):
    AUTO = "auto"       # last token for CLIP, mean otherwise
    MEAN = "mean"
    LAST = "last"       # the last real token (CLIP's EOS)
    FIRST = "first"     # [CLS] (BERT-like)


class HFTextEncoder:
    """`encode(prompts)` -> tokens `(B, L, dim)` (L <= max_tokens), mask, pooled `(B, pooled_dim)`.

    Padding is on the right. CLIP-like models read at most their `max_position_embeddings` (77) tokens,
    whatever `max_tokens` asks for; truncation keeps the EOS token, so the pooled embedding is CLIP's.
    """

    def __init__(self, folder: str | Path, *, max_tokens: int = 120, pooling: Pooling = Pooling.AUTO,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model in {str(folder)!r}: expected a folder with "
                                    f"config.json, the tokenizer files and the weights")
        require_safetensors(folder, SAFETENSORS_WEIGHTS)  # before transformers reads anything
        if importlib.util.find_spec("transformers") is None:
            raise ImportError("real text encoders need the transformers package: pip install transformers")
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        self.model = _load_text_model(transformers, folder, config, dtype).to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "right"  # LAST pooling finds the last real token from the mask
        self.is_clip = config.model_type.startswith("clip")
        self.projection: Optional[torch.nn.Module] = getattr(self.model, "text_projection", None)
        text_config = self.model.config
        self.pooling = Pooling(pooling)
        positions = getattr(text_config, "max_position_embeddings", None)  # T5: relative, no limit
        self.max_tokens = min(max_tokens, positions) if positions else max_tokens
        self.dim = int(getattr(text_config, "hidden_size", None) or text_config.d_model)
        self.pooled_dim = self.projection.out_features if self.projection is not None else self.dim

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.model.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        pooled = self._pool(hidden, mask)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return TextEmbedding(hidden.float(), mask, pooled.float())

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooling = self.pooling
        if pooling is Pooling.AUTO:
            pooling = Pooling.LAST if self.is_clip else Pooling.MEAN
        if pooling is Pooling.FIRST:
            return hidden[:, 0]
        if pooling is Pooling.LAST:
            last = mask.long().sum(1).clamp_min(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return masked_mean(hidden, mask)


def _load_text_model(transformers, folder: Path, config, dtype: torch.dtype):
    """The text tower of the folder's model: T5's encoder, CLIP's text model (with its projection when
    the folder has one), or `AutoModel`."""
    kind, architectures = config.model_type, set(getattr(config, "architectures", None) or ())
    load = dict(local_files_only=True, use_safetensors=True, dtype=dtype)
    if kind in T5_TYPES:
        return transformers.T5EncoderModel.from_pretrained(folder, **load)
    if kind == "clip":  # a full CLIPModel: its text tower and text projection, not the vision tower
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim
        return transformers.CLIPTextModelWithProjection.from_pretrained(folder, config=text_config, **load)
    if kind == "clip_text_model":
        with_projection = "CLIPTextModelWithProjection" in architectures
        cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
        return cls.from_pretrained(folder, **load)
    return transformers.AutoModel.from_pretrained(folder, **load)
