"""ComfyUI's own text encoders (`CLIP`) and VAEs (`VAE`) behind STIV's `TextEncoder` / `VideoVAE`, so a
user reuses what ComfyUI has loaded (a T5 from CLIPLoader, a VAE from VAELoader).

Duck-typed: nothing here imports comfy. The ComfyUI API used (comfy/sd.py, Comfy-Org/ComfyUI a125cd8):
- CLIP: `tokenize(text)` -> tokens; `encode_from_tokens(tokens, return_pooled=..., return_dict=True)` ->
  {"cond": (1, L, D), "pooled_output": (1, Dp) or None, "attention_mask": (1, L) (some encoders only)}.
- VAE: `encode(images)`: IMAGE `(N, H, W, C)` in 0..1 -> RAW latents `(N, C, h, w)`; `decode(latents)`:
  raw latents -> `(N, H, W, C)` in 0..1; `latent_channels`, `latent_dim` (2 = an image VAE),
  `spacial_compression_encode()` (pixels per latent).

Text: the tokens are ComfyUI's `cond`; the mask its `attention_mask` when the encoder reports one, else
every token that is not exactly zero (encoders that pad without reporting a mask zero their padding,
e.g. T5-base as "stable_audio"; CLIP pads to 77 with real end tokens, which count, as in SD; T5-XXL as
"pixart" is not padded). Pooled: the encoder's pooled output as ComfyUI gives it by default (CLIP's end
token: through the text projection for CLIP-G, as the trainer's `hf` encoder pools a
CLIPTextModelWithProjection; ComfyUI's CLIP-L gives it unprojected, as the trainer pools a CLIPTextModel
folder, so a model trained on a full CLIPModel's projected CLIP-L pooled gets a vector of the same
width but another kind); encoders without one (T5) give the masked mean of the tokens, as the trainer's
`hf` encoder pools T5. A second encoder's pooled output can replace it (`pooled_clip`: T5 tokens + a CLIP
pooled embedding, the paper's pairing, the trainer's `pooled_text_encoder_path`). The widths must be the
model's (`text_dim`, `pooled_text_dim`).

Latents: ComfyUI keeps a latent space's scale and shift in the diffusion model's `latent_format`, not on
the VAE, so a VAE cannot say them. STIV latents are `(raw - shift) * scale` with the scale and shift of
the model's OWN VAE (the one in its bundle: a diffusers VAE's `scaling_factor` / `shift_factor`; the
built-in pixel space has none: 1 and 0), i.e. the latent space the model was trained in; the ComfyUI
VAE must also match it in latent channels and pixels per latent (checked).

A bare model (trained with a Hugging Face text encoder / a diffusers VAE, exported without them) has
`MissingTextEncoder` and `RecordedVAE` in place of its own: they carry what its metadata records (widths,
latent channels, scale and shift) and say which ComfyUI encoder to connect when one is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

import torch

from ..stiv_core.bundle import TrainedWith
from ..stiv_core.config import STIVConfig
from ..stiv_core.encoders import VAEKind
from ..stiv_core.encoders.pixel import PixelVAE
from ..stiv_core.interfaces import TextEmbedding, VideoVAE, masked_mean
from ..stiv_core.pipeline import STIVPipeline

CHANNEL_HINTS = {3: "pixel space, e.g. VAELoader's 'pixel_space'", 4: "e.g. an SD 1.x / SDXL VAE",
                 16: "e.g. an SD3 / Flux VAE"}
TEXT_WIDTHS = "T5-XXL gives 4096, CLIP-L 768, CLIP-G 1280"


# -- text ---------------------------------------------------------------------------------------
def clip_text_embedding(clip: Any, prompt: str, *, pooled_clip: Any = None) -> TextEmbedding:
    """One prompt through a ComfyUI CLIP -> tokens `(1, L, D)`, mask `(1, L)`, pooled `(1, Dp)` (float32, CPU);
    with `pooled_clip`, the pooled embedding is that encoder's."""
    text = _encode(clip, prompt)
    if pooled_clip is None:
        return text
    return TextEmbedding(text.tokens, text.mask, _encode(pooled_clip, prompt).pooled)


def _encode(clip: Any, prompt: str) -> TextEmbedding:
    out = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, return_dict=True)
    tokens = out["cond"].float().cpu()
    if tokens.dim() != 3 or tokens.shape[0] != 1:
        raise ValueError(f"the CLIP returned text embeddings of shape {tuple(tokens.shape)}; expected "
                         f"(1, tokens, width)")
    mask = out.get("attention_mask")
    mask = tokens.abs().amax(-1) > 0 if mask is None else mask.cpu().bool().reshape(1, -1)
    pooled = out.get("pooled_output")
    if pooled is None:
        pooled = masked_mean(tokens, mask)
    return TextEmbedding(tokens, mask, pooled.float().cpu().reshape(1, -1))


class EncodedPrompts:
    """A `TextEncoder` over prompts already encoded (by a ComfyUI CLIP, in STIV Text Encode)."""

    def __init__(self, texts: Mapping[str, TextEmbedding]):
        if not texts:
            raise ValueError("no encoded prompts")
        self.texts = dict(texts)
        first = next(iter(self.texts.values()))
        self.dim, self.pooled_dim = first.tokens.shape[-1], first.pooled.shape[-1]

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        missing = [p for p in prompts if p not in self.texts]
        if missing:
            raise ValueError(f"prompt(s) {missing} were not encoded by the CLIP on STIV Text Encode")
        rows = [self.texts[p] for p in prompts]
        length = max(r.tokens.shape[1] for r in rows)
        rows = [r.fit(length) for r in rows]  # padded to the longest (never cut)
        return TextEmbedding(*(torch.cat([getattr(r, k) for r in rows]) for k in ("tokens", "mask", "pooled")))

    def check_widths(self, config: STIVConfig) -> None:
        """A clear error when these embeddings are not as wide as the model's text input."""
        if self.dim != config.text_dim:
            raise ValueError(f"the CLIP connected to STIV Text Encode gives {self.dim}-wide text embeddings, but "
                             f"this model was trained on {config.text_dim}-wide ones ({TEXT_WIDTHS}): connect "
                             f"the text encoder it was trained with, or leave clip unconnected to use the model's own")
        if self.pooled_dim != config.pooled_text_dim:
            raise ValueError(f"the text encoders connected to STIV Text Encode give a {self.pooled_dim}-wide pooled "
                             f"embedding, but this model takes {config.pooled_text_dim}-wide pooled text: connect "
                             f"the encoders it was trained with (pooled_clip: the one of its pooled text), or leave "
                             f"clip unconnected to use the model's own")


class MissingTextEncoder:
    """The text encoder of a bare model: none; its widths are the model's, `encode` says what to connect."""

    def __init__(self, trained: TrainedWith):
        self.trained, self.dim, self.pooled_dim = trained, trained.text_dim, trained.pooled_text_dim

    @property
    def message(self) -> str:
        t = self.trained
        name = f" {t.text_encoder_name!r}" if t.text_encoder_name else ""
        pooled = (f"; its {t.pooled_text_dim}-wide pooled text came from a CLIP: connect that one to pooled_clip"
                  if t.pooled_from_clip else "")
        return (f"this model has no bundled text encoder: connect a CLIP to STIV Text Encode (it was trained with "
                f"{t.text_encoder.value}{name}, {t.text_dim}-wide; {TEXT_WIDTHS}){pooled}")

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        raise ValueError(self.message)

    def to(self, *args, **kwargs) -> MissingTextEncoder:
        return self


# -- VAE ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatentScaling:
    """Model latents = `(raw - shift) * scale`, raw = what the VAE's encoder gives."""

    scale: float = 1.0
    shift: float = 0.0

    @classmethod
    def of(cls, vae: VideoVAE) -> LatentScaling:
        """The scaling a STIV-side VAE applies (DiffusersVAE records it; pixel space has none)."""
        return cls(float(vae.scaling_factor), float(vae.shift_factor))

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift) * self.scale

    def to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.shift


class RecordedVAE:
    """The VAE of a bare model: none, only its recorded latent space (channels, pixels per latent, scale
    and shift, which `LatentScaling.of` reads); `encode` / `decode` say what to connect."""

    def __init__(self, trained: TrainedWith):
        self.trained = trained
        self.latent_channels, self.spatial_factor = trained.latent_channels, trained.spatial_factor
        self.scaling_factor, self.shift_factor = trained.scaling_factor, trained.shift_factor
        self.latent_range: Optional[float] = None

    @property
    def message(self) -> str:
        t = self.trained
        kind = f"a {t.vae_family.upper()} VAE" if t.vae_family else f"a {t.vae_kind.value} VAE"
        return (f"this model has no bundled VAE: connect a ComfyUI VAE to vae (it was trained with {kind}, "
                f"{t.latent_channels} latent channels, {t.spatial_factor} pixels per latent)")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ValueError(self.message)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise ValueError(self.message)


def bare_pipeline(model: Any, trained: TrainedWith) -> STIVPipeline:
    """A bare model's pipeline: the text comes from ComfyUI's CLIP, pixels from ComfyUI's VAE (pixel space
    needs none: its VAE has no weights)."""
    vae = PixelVAE() if trained.vae_kind == VAEKind.PIXEL else RecordedVAE(trained)
    return STIVPipeline(model, MissingTextEncoder(trained), vae)


class ComfyVideoVAE:
    """A ComfyUI image VAE applied to each frame of `(B, 3, T, H, W)` pixels in [-1, 1] (the `VideoVAE`
    contract), `chunk_frames` frames per call; latents are scaled by `scaling`. `latent_range`: the bound
    of the model's latent space (its own VAE's, e.g. pixel space's 1.0) that the sampler may clamp to."""

    def __init__(self, vae: Any, *, scaling: LatentScaling, chunk_frames: int = 16,
                 latent_range: Optional[float] = None):
        if getattr(vae, "latent_dim", 2) != 2:
            raise ValueError(f"the connected VAE has {vae.latent_dim}-D latents (a video or audio VAE); STIV "
                             f"encodes each frame with an image VAE (2-D latents)")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.vae, self.scaling, self.chunk_frames, self.latent_range = vae, scaling, chunk_frames, latent_range
        self.latent_channels = int(vae.latent_channels)
        self.spatial_factor = int(vae.spacial_compression_encode())
        self.scaling_factor, self.shift_factor = scaling.scale, scaling.shift

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, 3, T, H, W)` in [-1, 1] -> model latents `(B, C, T, H / f, W / f)` (float32)."""
        f = self.spatial_factor
        if pixels.dim() != 5 or pixels.shape[1] != 3 or pixels.shape[-2] % f or pixels.shape[-1] % f:
            raise ValueError(f"the VAE encodes (B, 3, T, H, W) pixels with H and W multiples of {f}, got "
                             f"{tuple(pixels.shape)}")
        images = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1)  # (B*T, H, W, 3)
        raw = torch.cat([self.vae.encode(chunk.contiguous()).float().cpu()
                         for chunk in images.split(self.chunk_frames)])
        expected = (images.shape[0], self.latent_channels, pixels.shape[-2] // f, pixels.shape[-1] // f)
        if tuple(raw.shape) != expected:
            raise ValueError(f"the VAE encoded {images.shape[0]} frames to {tuple(raw.shape)}, expected {expected}")
        latents = self.scaling.to_model(raw).unflatten(0, pixels.shape[:1] + pixels.shape[2:3])
        return latents.transpose(1, 2).to(pixels.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents `(B, C, T, h, w)` -> pixels `(B, 3, T, h * f, w * f)` in [-1, 1] (float32)."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"the VAE decodes (B, {self.latent_channels}, T, h, w) latents, got "
                             f"{tuple(latents.shape)}")
        raw = self.scaling.to_raw(latents.float().transpose(1, 2).flatten(0, 1))  # (B*T, C, h, w)
        images = torch.cat([self.vae.decode(chunk.contiguous())[..., :3].float().cpu()
                            for chunk in raw.split(self.chunk_frames)])     # (B*T, H, W, 3) in 0..1
        pixels = (images * 2 - 1).clamp(-1, 1).permute(0, 3, 1, 2)
        return pixels.unflatten(0, latents.shape[:1] + latents.shape[2:3]).transpose(1, 2).to(latents.device)


def comfy_vae_for(pipeline: STIVPipeline, vae: Any, *, chunk_frames: int = 16) -> ComfyVideoVAE:
    """A ComfyUI VAE in the latent space of `pipeline`'s model, or a clear error when it is another one."""
    own = pipeline.vae
    adapter = ComfyVideoVAE(vae, scaling=LatentScaling.of(own), chunk_frames=chunk_frames,
                            latent_range=own.latent_range)
    channels = pipeline.model.config.latent_channels
    if adapter.latent_channels != channels:
        raise ValueError(f"the connected VAE gives {adapter.latent_channels}-channel latents, but this STIV model "
                         f"works on {channels}-channel latents ({CHANNEL_HINTS.get(channels, 'its own VAE')}): "
                         f"connect the VAE it was trained with, or leave vae unconnected to use the model's own")
    if adapter.spatial_factor != own.spatial_factor:
        raise ValueError(f"the connected VAE has {adapter.spatial_factor} pixels per latent, but this STIV model's "
                         f"latents have {own.spatial_factor}: connect the VAE it was trained with, or leave vae "
                         f"unconnected to use the model's own")
    return adapter


def with_comfy_vae(pipeline: STIVPipeline, vae: Any, *, chunk_frames: int = 16) -> STIVPipeline:
    """The same model and text encoder, pixels <-> latents through a ComfyUI VAE (None: unchanged)."""
    return pipeline if vae is None else replace(pipeline, vae=comfy_vae_for(pipeline, vae, chunk_frames=chunk_frames))
