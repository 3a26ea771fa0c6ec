"""PixArt -> STIV conversion on a small random PixArt-shaped state dict (no download).

The reference below is PixArt's forward (T2I block: adaLN-single modulated self-attention, cross-
attention, FFN; T2I final layer; epsilon rows of a learned-sigma output) written from PixArt's own
key names. It is NOT plain PixArt: it contains STIV's extra pieces at their converted values, because
the architectures differ there and no weight mapping can remove them:
  - no absolute position embedding; 2D RoPE (STIV's own rope functions) in self-attention;
  - QK RMSNorm with weight 1 in both attentions;
  - sandwich norm (stateless LayerNorm on the attention / FFN outputs) and a LayerNorm before
    cross-attention;
  - a stateless LayerNorm at the end of the timestep embedder;
  - the timestep fed as PixArt's `s = 1000 * (1 - t)` for STIV's flow time t.
So the test proves that every PixArt tensor lands where it does the same job (layouts, head split,
sigma rows, unpatchify order, patch inflation, time reversal) and that the new STIV pieces (temporal
attention, pooled text, micro-conditions, given-frame embedding) add nothing to a static clip.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from stiv_core.checkpoint import load_model
from stiv_core.config import preset
from stiv_core.convert import CONVERSION_KEY, convert_pixart, main
from stiv_core.interfaces import TextEmbedding
from stiv_core.model.rope import apply_rope, grid_positions, rope_tables
from stiv_core.pixart import ConversionError
from stiv_core.model.transformer import STIVTransformer
from stiv_core.training.config import ConfigError, InitConfig, InitKind
from stiv_core.training.config import load_config as load_train_config
from stiv_core.training.init import initialize

HEADS = 4
CONFIG = preset("tiny")  # D 128, depth 4, 3 latent channels, patch 4, text 128, 16 tokens, pt 2


def pixart_state(seed: int = 0, *, depth: int = 4, d: int = 128, c: int = 3, p: int = 4, text: int = 128,
                 tokens: int = 16) -> dict[str, torch.Tensor]:
    """A random PixArt-alpha/Sigma state dict (original key names), learned sigma (2C outputs)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.1: torch.randn(*shape, generator=g) * std
    lin = lambda name, o, i, std=None: {f"{name}.weight": r(o, i, std=std or i ** -0.5), f"{name}.bias": r(o)}
    sd = {"x_embedder.proj.weight": r(d, c, p, p, std=0.3), "x_embedder.proj.bias": r(d),
          "pos_embed": r(1, 4, d), "y_embedder.y_embedding": r(tokens, text, std=1.0),
          "final_layer.scale_shift_table": r(2, d, std=0.3)}
    sd |= lin("t_embedder.mlp.0", d, 256) | lin("t_embedder.mlp.2", d, d) | lin("t_block.1", 6 * d, d)
    sd |= lin("y_embedder.y_proj.fc1", d, text) | lin("y_embedder.y_proj.fc2", d, d)
    sd |= lin("final_layer.linear", p * p * 2 * c, d)
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= lin(b + "attn.qkv", 3 * d, d) | lin(b + "attn.proj", d, d) | lin(b + "cross_attn.q_linear", d, d)
        sd |= lin(b + "cross_attn.kv_linear", 2 * d, d) | lin(b + "cross_attn.proj", d, d)
        sd |= lin(b + "mlp.fc1", 4 * d, d) | lin(b + "mlp.fc2", d, 4 * d)
        sd[b + "scale_shift_table"] = r(6, d, std=0.3)
    return sd


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under diffusers' PixArtTransformer2DModel names (no y_embedding, as diffusers)."""
    top = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2", "t_block.1": "adaln_single.linear",
           "y_embedder.y_proj.fc1": "caption_projection.linear_1",
           "y_embedder.y_proj.fc2": "caption_projection.linear_2", "final_layer.linear": "proj_out"}
    block = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q", "cross_attn.proj": "attn2.to_out.0",
             "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
    out = {"scale_shift_table": sd["final_layer.scale_shift_table"]}
    for key, value in sd.items():
        name, _, suffix = key.rpartition(".")
        if name in top:
            out[f"{top[name]}.{suffix}"] = value
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            pre = f"transformer_blocks.{i}."
            name, _, suffix = rest.rpartition(".")
            if rest == "scale_shift_table":
                out[pre + rest] = value
            elif name in block:
                out[f"{pre}{block[name]}.{suffix}"] = value
            elif name == "attn.qkv":
                for n, part in zip("qkv", value.chunk(3)):
                    out[f"{pre}attn1.to_{n}.{suffix}"] = part
            elif name == "cross_attn.kv_linear":
                for n, part in zip("kv", value.chunk(2)):
                    out[f"{pre}attn2.to_{n}.{suffix}"] = part
    return out


# ---- the reference: PixArt's forward with STIV's extra pieces (see the module docstring) ----

def _lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, D) -> (B, H, N, hd)


def _attend(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def pixart_reference(sd, image, s, text, mask, heads=HEADS):
    """image `(B, C, H, W)`, PixArt timestep s `(B,)`, text `(B, L, text)` -> epsilon `(B, C, H, W)`."""
    p = sd["x_embedder.proj.weight"].shape[-1]
    x = F.conv2d(image, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    b, d, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)                                    # (B, N, D); no pos_embed
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    sinus = torch.cat([torch.cos(s[:, None] * freqs), torch.sin(s[:, None] * freqs)], -1)
    t_emb = _ln(_lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", sinus))))  # STIV: + LN
    t0 = _lin(sd, "t_block.1", F.silu(t_emb)).view(b, 6, d)
    y = _lin(sd, "y_embedder.y_proj.fc2", F.gelu(_lin(sd, "y_embedder.y_proj.fc1", text), approximate="tanh"))
    hd = d // heads
    rope = rope_tables(grid_positions(h, w, scale=(1.0, 1.0)), (hd // 2, hd // 2), 10000.0)
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        pre = f"blocks.{i}."
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = (sd[pre + "scale_shift_table"][None] + t0)[:, :, None].unbind(1)
        q, k, v = _lin(sd, pre + "attn.qkv", _ln(x) * (1 + sc_a) + sh_a).chunk(3, -1)
        q, k = (apply_rope(_rms(_heads(z, heads)), rope) for z in (q, k))      # STIV: QK-norm, RoPE
        x = x + g_a * _ln(_lin(sd, pre + "attn.proj", _attend(q, k, _heads(v, heads))))  # STIV: sandwich LN
        q = _rms(_heads(_lin(sd, pre + "cross_attn.q_linear", _ln(x)), heads))  # STIV: LN before, QK-norm
        k, v = _lin(sd, pre + "cross_attn.kv_linear", y).chunk(2, -1)
        x = x + _lin(sd, pre + "cross_attn.proj", _attend(q, _rms(_heads(k, heads)), _heads(v, heads), mask))
        hidden = F.gelu(_lin(sd, pre + "mlp.fc1", _ln(x) * (1 + sc_f) + sh_f), approximate="tanh")
        x = x + g_f * _ln(_lin(sd, pre + "mlp.fc2", hidden))          # STIV: sandwich LN
    shift, scale = (sd["final_layer.scale_shift_table"][None] + t_emb[:, None]).unbind(1)
    out = _lin(sd, "final_layer.linear", _ln(x) * (1 + scale[:, None]) + shift[:, None])
    c2 = out.shape[-1] // (p * p)
    out = out.reshape(b, h, w, p, p, c2).permute(0, 5, 1, 3, 2, 4).reshape(b, c2, h * p, w * p)
    return out[:, : c2 // 2]  # epsilon; the learned-sigma half is what the converter drops


def _inputs(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 8, 12, generator=g)
    text = torch.randn(b, 6, 128, generator=g)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    t = torch.tensor([0.3, 0.85])
    return image, text, mask, t


class TestConvertedForward:
    @pytest.mark.parametrize("frames,temporal_patch", [(1, 1), (2, 2), (4, 2)])
    def test_static_clip_matches_pixart_reference(self, frames, temporal_patch):
        sd = pixart_state()
        config = CONFIG.replace(temporal_patch=temporal_patch)
        model, _ = convert_pixart(sd, config, source_heads=HEADS)
        image, text, mask, t = _inputs()
        g = torch.Generator().manual_seed(2)
        pooled, micro = torch.randn(2, 128, generator=g), torch.rand(2, 6, generator=g) * 100
        with torch.no_grad():
            video = model(image[:, :, None].repeat(1, 1, frames, 1, 1), t, TextEmbedding(text, mask, pooled), micro)
            expected = pixart_reference(sd, image, 1000 * (1 - t), text, mask)
        assert expected.abs().mean() > 0.1  # a non-trivial output
        for f in range(frames):
            torch.testing.assert_close(video[:, :, f], expected, atol=2e-4, rtol=1e-3)

    def test_diffusers_names_convert_to_the_same_weights(self):
        sd = pixart_state(seed=3)
        original, report_o = convert_pixart(sd, CONFIG, source_heads=HEADS)
        diffusers, report_d = convert_pixart(to_diffusers(sd), CONFIG, source_heads=HEADS)
        assert (report_o.key_style.value, report_d.key_style.value) == ("original", "diffusers")
        a, b = original.state_dict(), diffusers.state_dict()
        for key in a:
            if key != "null_text":  # diffusers files have no y_embedding
                torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
        torch.testing.assert_close(a["null_text"], sd["y_embedder.y_embedding"])
        assert report_d.dropped_keys == () and report_o.dropped_keys == ("pos_embed",)
        assert any("null text" in note for note in report_d.notes)


class TestCommandLine:
    def test_writes_a_checkpoint_the_trainer_and_loader_read(self, tmp_path, capsys):
        src, out = tmp_path / "pixart.safetensors", tmp_path / "stiv.safetensors"
        save_file(to_diffusers(pixart_state()), str(src))
        main(["pixart", str(src), "--preset", "tiny", "--heads", str(HEADS), "--out", str(out)])
        printed = capsys.readouterr().out
        for word in ("epsilon", "RoPE", "QK-norm", "sandwich", "adaLN-single", "sigma", "heads"):
            assert word in printed
        with safe_open(str(out), framework="pt") as f:
            report = json.loads(f.metadata()[CONVERSION_KEY])
        assert report["key_style"] == "diffusers" and report["shape"]["learned_sigma"] is True
        loaded = load_model(out)
        assert loaded.config.num_heads == HEADS
        fresh = type(loaded)(loaded.config)
        initialize(fresh, InitConfig(kind=InitKind.FULL, path=str(out)))
        torch.testing.assert_close(fresh.state_dict()["final_table"], loaded.state_dict()["final_table"])

    def test_wrong_sizes_are_refused_clearly(self, tmp_path, capsys):
        src = tmp_path / "pixart.safetensors"
        save_file(pixart_state(), str(src))
        with pytest.raises(SystemExit) as exit_info:
            main(["pixart", str(src), "--preset", "XL", "--out", str(tmp_path / "x.safetensors")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "does not fit STIV config 'XL'" in err and "hidden_size: source 128 vs config 1152" in err
        assert not (tmp_path / "x.safetensors").exists()

    def test_a_non_pixart_file_is_refused(self, tmp_path, capsys):
        with pytest.raises(ConversionError, match="not a PixArt"):
            convert_pixart({"model.weight": torch.zeros(2)}, CONFIG)
        partial = {k: v for k, v in pixart_state().items() if not k.startswith("t_block")}
        with pytest.raises(ConversionError, match="lacks PixArt tensors"):
            convert_pixart(partial, CONFIG)
        src = tmp_path / "other.safetensors"
        save_file({"model.weight": torch.zeros(2)}, str(src))
        with pytest.raises(SystemExit):
            main(["pixart", str(src), "--preset", "tiny", "--out", str(tmp_path / "x.safetensors")])
        assert "not a PixArt" in capsys.readouterr().err


    def test_a_truncated_file_is_a_clear_error(self, tmp_path, capsys):
        src = tmp_path / "pixart.safetensors"
        save_file(pixart_state(), str(src))
        src.write_bytes(src.read_bytes()[:-1000])    # the header intact, the tensor data cut short
        with pytest.raises(SystemExit) as exit_info:
            main(["pixart", str(src), "--preset", "tiny", "--heads", str(HEADS), "--out", str(tmp_path / "x.safetensors")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and ("not a readable safetensors file" in err or "not a safetensors file" in err)


class TestTrainerFromConvertedFile:
    """The trainer takes the converted file's recorded shape: PixArt's head count (not the preset's) and
    its null-text rows, so the model builds, loads and computes PixArt's output."""

    SOURCE_HEADS, TOKENS = 8, 12  # the tiny preset has 4 heads and 16 text tokens

    @pytest.mark.parametrize("kind,temporal_patch,frames", [("full", 1, 1), ("full", 2, 2), ("t2i", 1, 2)])
    def test_static_clip_matches_pixart(self, tmp_path, capsys, kind, temporal_patch, frames):
        sd = pixart_state(seed=4, tokens=self.TOKENS)
        src, out = tmp_path / "pixart.safetensors", tmp_path / "stiv_init.safetensors"
        save_file(sd, str(src))
        main(["pixart", str(src), "--preset", "tiny", "--heads", str(self.SOURCE_HEADS),
              "--temporal-patch", str(temporal_patch), "--out", str(out)])
        printed = capsys.readouterr().out
        assert f"{self.SOURCE_HEADS} heads, {self.TOKENS} text tokens" in printed and f"'{kind}'" in printed
        config = load_train_config(None, [f"output_dir={tmp_path / 'run'}", "model.preset=tiny",
                                          f"init.kind={kind}", f"init.path={out}"])
        assert (config.model.num_heads, config.model.max_text_tokens) == (self.SOURCE_HEADS, self.TOKENS)
        assert config.model.temporal_patch == (2 if kind == "t2i" else temporal_patch)
        torch.manual_seed(0)
        model = STIVTransformer(config.model)
        initialize(model, config.init)
        image, text, mask, t = _inputs()
        with torch.no_grad():
            video = model.eval()(image[:, :, None].repeat(1, 1, frames, 1, 1), t,
                                 TextEmbedding(text, mask, torch.randn(2, 128)), torch.rand(2, 6) * 100)
            expected = pixart_reference(sd, image, 1000 * (1 - t), text, mask, heads=self.SOURCE_HEADS)
        for f in range(frames):
            torch.testing.assert_close(video[:, :, f], expected, atol=2e-4, rtol=1e-3)

    def test_new_branches_are_recorded_and_fit_a_maskdit_stage(self, tmp_path, capsys):
        src, out = tmp_path / "pixart.safetensors", tmp_path / "stiv_init.safetensors"
        save_file(pixart_state(), str(src))
        main(["pixart", str(src), "--preset", "tiny", "--heads", str(HEADS), "--pooled-text-dim", "24",
              "--maskdit-extra-blocks", "2", "--out", str(out)])
        assert "MaskDiT: the 2 extra blocks are new" in capsys.readouterr().out
        config = load_train_config(None, [f"output_dir={tmp_path / 'run'}", "init.kind=full", f"init.path={out}",
                                          "recipe.maskdit_ratio=0.5", "model.rope_position_scale=[1, 0.5, 0.5]"])
        assert (config.model.pooled_text_dim, config.model.maskdit_extra_blocks) == (24, 2)
        model = STIVTransformer(config.model)
        initialize(model, config.init)
        assert model.pooled_proj[0].in_features == 24 and len(model.extra_blocks) == 2
        with pytest.raises(ConfigError, match="model.maskdit_extra_blocks = 0 vs 2"):
            load_train_config(None, [f"output_dir={tmp_path}", "init.kind=full", f"init.path={out}",
                                     "model.maskdit_extra_blocks=0"])
