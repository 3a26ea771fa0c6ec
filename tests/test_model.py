"""STIVTransformer on a tiny config: shapes, input errors, text dropout, masks, MaskDiT, zero-init, inflation.

Inputs (see conftest.make_inputs): x `(B=2, C=4, T=4, H=8, W=8)` -> token grid `(T'=2, 4, 4)`, 16 spatial
tokens per frame; text `(2, 5, 24)` with row 1's last token masked.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dataclasses import replace

from stiv_core.interfaces import TextEmbedding
from stiv_core.model.attention import AttentionBackend
from stiv_core.model.rope import apply_rope
from stiv_core.model.transformer import STIVTransformer, inflate_patch_embed, sample_keep_index

close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def first_given(batch: int, frames: int, index: int = 0) -> torch.Tensor:
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask[:, index] = True
    return mask


class TestForward:
    @pytest.mark.parametrize("temporal_patch, frames", [(1, 3), (2, 4), (4, 4), (4, 8)])
    def test_output_has_the_input_shape(self, make_model, make_inputs, tiny_config, temporal_patch, frames):
        config = tiny_config.replace(temporal_patch=temporal_patch)
        model, inputs = make_model(config), make_inputs(config, frames=frames)
        out = model(**inputs)                                               # (2, 4, frames, 8, 8)
        assert out.shape == inputs["x"].shape and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.abs().mean() > 1e-3

    def test_ti2v_frame_mask_changes_the_output(self, make_model, make_inputs):
        model, inputs = make_model(), make_inputs()
        t2v = model(**inputs)
        ti2v = model(**inputs, frame_mask=first_given(2, 4))
        assert ti2v.shape == t2v.shape and not torch.allclose(ti2v, t2v, atol=1e-4)
        # Which frame inside a temporal patch is given matters too (frames 0 and 1 share a patch).
        assert not torch.allclose(model(**inputs, frame_mask=first_given(2, 4, 1)), ti2v, atol=1e-4)
        # An all-False mask is the same as no mask: nothing is given.
        close(model(**inputs, frame_mask=torch.zeros(2, 4, dtype=torch.bool)), t2v)

    def test_condition_inputs_all_matter(self, make_model, make_inputs):
        model, inputs = make_model(), make_inputs()
        base = model(**inputs)
        changed = [dict(t=inputs["t"] + 0.1), dict(text=replace(inputs["text"], pooled=inputs["text"].pooled + 1.0))]
        for i in range(6):  # every micro-condition (height, width, crops, stride, frames)
            micro = inputs["micro"].clone()
            micro[:, i] += 16.0
            changed.append(dict(micro=micro))
        for change in changed:
            assert not torch.allclose(model(**{**inputs, **change}), base, atol=1e-4), change

    def test_batch_rows_are_independent(self, make_model, make_inputs):
        model, inputs = make_model(), make_inputs()
        frame_mask = torch.tensor([[True, False, False, False], [True, False, False, True]])
        text_drop = torch.tensor([False, True])
        both = model(**inputs, frame_mask=frame_mask, text_drop=text_drop)
        for i in range(2):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            close(model(**row, frame_mask=frame_mask[i : i + 1], text_drop=text_drop[i : i + 1]), both[i : i + 1])

    def test_attention_backends_agree(self, make_model, make_inputs):
        model, inputs = make_model(), make_inputs()
        sdpa = model(**inputs)
        model.set_attention_backend(AttentionBackend.MATH)
        close(model(**inputs), sdpa)

    def test_gradient_checkpointing_gives_the_same_output_and_grads(self, make_model, make_inputs):
        inputs = make_inputs()
        results = []
        for checkpointing in (False, True):
            model = make_model().train().requires_grad_(True)
            model.gradient_checkpointing = checkpointing
            out = model(**inputs)
            out.square().mean().backward()
            results.append((out.detach(), model.blocks[0].spatial_attn.qkv.weight.grad.clone()))
        close(results[1][0], results[0][0])
        close(results[1][1], results[0][1])


class TestBadInput:
    @pytest.mark.parametrize("temporal_patch, frames, allowed", [(2, 5, "4 or 6"), (2, 1, "e.g. 2)"),
                                                                 (4, 6, "4 or 8")])
    def test_frame_count_the_temporal_patch_cannot_take(self, make_model, make_inputs, tiny_config,
                                                        temporal_patch, frames, allowed):
        config = tiny_config.replace(temporal_patch=temporal_patch)
        with pytest.raises(ValueError, match=f"multiple of {temporal_patch}") as err:
            make_model(config)(**make_inputs(config, frames=frames))
        assert allowed in str(err.value)

    @pytest.mark.parametrize("height, width, allowed", [(7, 8, "e.g. 6x8"), (8, 9, "e.g. 8x8"),
                                                        (1, 8, "e.g. 2x8")])
    def test_size_not_divisible_by_the_patch(self, make_model, make_inputs, height, width, allowed):
        with pytest.raises(ValueError, match="multiples of 2") as err:
            make_model()(**make_inputs(height=height, width=width))
        assert f"{height}x{width}" in str(err.value) and allowed in str(err.value)

    def test_text_longer_than_max_text_tokens(self, make_model, make_inputs, tiny_config):
        with pytest.raises(ValueError, match=f"9 text tokens.*at most {tiny_config.max_text_tokens}"):
            make_model()(**make_inputs(text_len=9))

    def test_token_dropping_without_extra_blocks(self, make_model, make_inputs):
        with pytest.raises(ValueError, match="maskdit_extra_blocks"):
            make_model()(**make_inputs(), keep_index=sample_keep_index(2, 16))


class TestText:
    def test_text_drop_equals_explicit_null_text(self, make_model, make_inputs):
        model, inputs = make_model(), make_inputs()
        # Row 1 has a masked text token: the null text must be attended in full.
        dropped = model(**inputs, text_drop=torch.tensor([False, True]))
        length = inputs["text"].tokens.shape[1]
        null = dict(text=TextEmbedding(model.null_text[:length].expand(2, -1, -1),
                                       torch.ones(2, length, dtype=torch.bool), model.null_pooled.expand(2, -1)))
        close(dropped[1], model(**{**inputs, **null})[1])
        close(dropped[0], model(**inputs)[0])
        assert not torch.allclose(dropped[1], model(**inputs)[1], atol=1e-4)

    def test_masked_text_tokens_are_ignored(self, make_model, make_inputs):
        model, inputs = make_model(), make_inputs()                         # row 1: token 4 masked
        base = model(**inputs)
        tokens = inputs["text"].tokens.clone()
        tokens[1, 4] = 50.0
        close(model(**{**inputs, "text": replace(inputs["text"], tokens=tokens)}), base)
        # Padding is equivalent to a shorter prompt.
        row = {k: v[1:] for k, v in inputs.items() if k != "text"}
        text = inputs["text"]
        row["text"] = TextEmbedding(text.tokens[1:, :4], text.mask[1:, :4], text.pooled[1:])  # (1, 4, 24)
        close(model(**row), base[1:])


class TestFactorizedAttention:
    """Space and time are mixed only by their own attentions: check the folding reshapes."""

    def test_without_temporal_attention_frames_do_not_mix(self, make_model, make_inputs):
        model, inputs = make_model(), make_inputs()
        for block in model.blocks:
            torch.nn.init.zeros_(block.temporal_attn.proj.weight)
            torch.nn.init.zeros_(block.temporal_attn.proj.bias)
        x = inputs["x"].clone()
        x[:, :, 2:, 3, 5] += 3.0                                            # temporal patch 1 only
        delta = (model(**{**inputs, "x": x}) - model(**inputs)).abs()
        assert delta[:, :, :2].max() < 1e-5 and delta[:, :, 2:].max() > 1e-2
        # A given-frame flag also stays in its temporal patch (frame 2 -> patch 1).
        delta = (model(**inputs, frame_mask=first_given(2, 4, 2)) - model(**inputs)).abs()
        assert delta[:, :, :2].max() < 1e-5 and delta[:, :, 2:].max() > 1e-2

    def test_without_spatial_attention_tokens_mix_only_in_time(self, make_model, make_inputs):
        model, inputs = make_model(), make_inputs()
        d = model.config.hidden_size
        with torch.no_grad():                                               # gate_sa = chunk 2 of 6
            model.adaln_single[1].weight[2 * d : 3 * d] = 0
            model.adaln_single[1].bias[2 * d : 3 * d] = 0
            for block in model.blocks:
                block.scale_shift_table[2] = 0
        x = inputs["x"].clone()
        x[:, :, 0, 2:4, 4:6] += 3.0                                         # frame 0, spatial token (1, 2)
        delta = (model(**{**inputs, "x": x}) - model(**inputs)).abs()
        outside = delta.clone()
        outside[:, :, :, 2:4, 4:6] = 0
        assert outside.max() < 1e-5
        assert delta[:, :, 2:, 2:4, 4:6].max() > 1e-2                       # reached the other frames

    @pytest.mark.parametrize("temporal_patch", [1, 2, 4])
    def test_unpatchify_puts_each_patch_back_in_place(self, tiny_config, temporal_patch, make_inputs):
        # A fresh model's blocks are identities; with a random final layer the output of each patch
        # then depends on that input patch only.
        config = tiny_config.replace(temporal_patch=temporal_patch)
        torch.manual_seed(0)
        model = STIVTransformer(config).eval().requires_grad_(False)
        torch.nn.init.normal_(model.final_linear.weight)
        inputs = make_inputs(config, frames=4)
        x = inputs["x"].clone()
        x[:, :, 3, 4, 6] += 3.0                                             # in patch (3 // pt, 2, 3)
        delta = (model(**{**inputs, "x": x}) - model(**inputs)).abs()
        t0 = 3 // temporal_patch * temporal_patch
        inside = delta[:, :, t0 : t0 + temporal_patch, 4:6, 6:8]
        assert inside.min() > 0 and delta.sum() == pytest.approx(inside.sum().item())


def rms(y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return y / (y.square().mean(-1, keepdim=True) + eps).sqrt() * weight


def reference_attention(q, k, v, mask=None):
    """Per-head softmax attention on (heads, N, hd) tensors, float64."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class TestReferences:
    """Sublayers and one block against plain float64 re-implementations of the paper's formulas."""

    @pytest.fixture
    def model(self, make_model):
        return make_model(dtype=torch.float64)

    def test_self_attention_heads_qk_norm_and_rope(self, model):
        layer, eps, heads = model.blocks[0].spatial_attn, model.config.norm_eps, model.config.num_heads
        x = torch.randn(2, 6, 32, dtype=torch.float64)                      # (B, N, D)
        rope, _ = model.rope((1, 2, 3), "cpu")
        q, k, v = (x @ layer.qkv.weight.T + layer.qkv.bias).chunk(3, dim=-1)  # [q | k | v], each (B, N, D)
        split = lambda y: y.unflatten(-1, (heads, -1)).transpose(1, 2)     # (B, heads, N, hd)
        q = apply_rope(rms(split(q), layer.q_norm.weight, eps), rope)
        k = apply_rope(rms(split(k), layer.k_norm.weight, eps), rope)
        out = reference_attention(q, k, split(v)).transpose(1, 2).flatten(2)
        expected = out @ layer.proj.weight.T + layer.proj.bias
        close(layer(x, rope, AttentionBackend.SDPA), expected)

    def test_cross_attention_with_text_mask(self, model):
        layer, eps, heads = model.blocks[1].cross_attn, model.config.norm_eps, model.config.num_heads
        x, text = torch.randn(2, 6, 32, dtype=torch.float64), torch.randn(2, 4, 32, dtype=torch.float64)
        mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
        for i in range(2):                                                  # one row at a time
            q = (x[i] @ layer.q.weight.T + layer.q.bias).unflatten(-1, (heads, -1)).transpose(0, 1)
            k, v = (text[i, mask[i]] @ layer.kv.weight.T + layer.kv.bias).chunk(2, dim=-1)
            k, v = (y.unflatten(-1, (heads, -1)).transpose(0, 1) for y in (k, v))
            out = reference_attention(rms(q, layer.q_norm.weight, eps), rms(k, layer.k_norm.weight, eps), v)
            expected = out.transpose(0, 1).flatten(1) @ layer.proj.weight.T + layer.proj.bias
            close(layer(x, text, mask, AttentionBackend.SDPA)[i], expected)

    def test_block_matches_the_papers_formula(self, model):
        # Spatial attn and FFN: x + gate * LN(Sub((1 + scale) * LN(x) + shift)); cross and temporal
        # attention: x + Sub(LN(x)). Spatial attention per frame, temporal per spatial position.
        block, (b, t, s, d) = model.blocks[0], (2, 3, 4, 32)
        ln = lambda y: F.layer_norm(y, (d,), eps=block.eps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, t, s, d, generator=g, dtype=torch.float64)
        modulation = torch.randn(b, 6, d, generator=g, dtype=torch.float64) * 0.5
        text, text_mask = torch.randn(b, 3, d, generator=g, dtype=torch.float64), torch.ones(b, 3, dtype=torch.bool)
        spatial, temporal = model.rope((t, 2, 2), "cpu")
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (block.scale_shift_table + modulation).unbind(1)

        y = x.clone()
        for i in range(b):
            for f in range(t):
                h = ln(x[i, f]) * (1 + scale_sa[i]) + shift_sa[i]           # (S, D)
                y[i, f] = x[i, f] + gate_sa[i] * ln(block.spatial_attn(h[None], spatial, AttentionBackend.MATH)[0])
        y = y + block.cross_attn(ln(y).flatten(1, 2), text, text_mask, AttentionBackend.MATH).view(b, t, s, d)
        z = y.clone()
        for i in range(b):
            for j in range(s):
                z[i, :, j] = y[i, :, j] + block.temporal_attn(ln(y[i, :, j])[None], temporal, AttentionBackend.MATH)[0]
        h = block.ffn(ln(z) * (1 + scale_ff[:, None, None]) + shift_ff[:, None, None])
        expected = z + gate_ff[:, None, None] * ln(h)
        close(block(x, modulation, text, text_mask, spatial, temporal, AttentionBackend.SDPA), expected)


class TestMaskDiT:
    @pytest.fixture
    def model(self, make_model):
        return make_model(maskdit_extra_blocks=2)

    def test_sample_keep_index_keeps_half_the_tokens(self):
        index = sample_keep_index(3, 16, generator=torch.Generator().manual_seed(0))   # (3, 8)
        assert index.shape == (3, 8)
        for row in index:
            assert row.tolist() == sorted(set(row.tolist())) and 0 <= row.min() and row.max() < 16
        assert not torch.equal(index[0], index[1])

    def test_masked_forward_shape_and_dropped_tokens_are_ignored(self, model, make_inputs):
        inputs = make_inputs()
        keep = sample_keep_index(2, 16, generator=torch.Generator().manual_seed(1))
        out = model(**inputs, keep_index=keep)
        assert out.shape == inputs["x"].shape and torch.isfinite(out).all()
        dropped = sorted(set(range(16)) - set(keep[0].tolist()))[0]
        kept = keep[0, 0].item()
        for token, should_change in ((dropped, False), (kept, True)):
            x = inputs["x"].clone()
            h, w = divmod(token, 4)
            x[0, :, :, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2] += 3.0
            delta = (model(**{**inputs, "x": x}, keep_index=keep) - out).abs().max()
            assert (delta > 1e-3) == should_change, (token, delta)

    def test_keeping_every_token_in_any_order_equals_the_unmasked_forward(self, model, make_inputs):
        # Gathering tokens must gather their RoPE tables with them and scatter back to the same place.
        inputs = make_inputs()
        full = model(**inputs)
        all_sorted = torch.arange(16).expand(2, -1)
        shuffled = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(2)])
        close(model(**inputs, keep_index=all_sorted), full)
        close(model(**inputs, keep_index=shuffled), full)


class TestInitialization:
    def test_fresh_model_outputs_exactly_zero(self, tiny_config, make_inputs):
        model = STIVTransformer(tiny_config.replace(maskdit_extra_blocks=2))
        inputs = make_inputs()
        out = model(**inputs, frame_mask=first_given(2, 4))
        assert torch.equal(out, torch.zeros_like(out))
        # ...but it can learn: the final layer gets a gradient at once.
        (model(**inputs) - inputs["x"]).square().mean().backward()
        assert model.final_linear.weight.grad.abs().sum() > 0

    def test_temporal_and_cross_attention_outputs_are_zero_at_init(self, tiny_config):
        torch.manual_seed(0)
        model = STIVTransformer(tiny_config)
        block = model.blocks[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(6, 3, 32, generator=g)                              # (B*S, T', D)
        text = torch.randn(6, 5, 32, generator=g)
        _, temporal_rope = model.rope((3, 2, 3), "cpu")
        assert torch.equal(block.temporal_attn(x, temporal_rope, AttentionBackend.SDPA), torch.zeros_like(x))
        out = block.cross_attn(x, text, torch.ones(6, 5, dtype=torch.bool), AttentionBackend.SDPA)
        assert torch.equal(out, torch.zeros_like(x))
        # Spatial attention itself is not zero: its sandwich gate is what zeroes it.
        spatial_rope, _ = model.rope((1, 1, 3), "cpu")
        assert block.spatial_attn(x, spatial_rope, AttentionBackend.SDPA).abs().sum() > 0

    def test_a_fresh_block_is_the_identity(self, tiny_config):
        model = STIVTransformer(tiny_config)
        x = torch.randn(2, 2, 4, 32)                                        # (B, T', S, D)
        spatial, temporal = model.rope((2, 2, 2), "cpu")
        modulation = torch.zeros(2, 6, 32)
        out = model.blocks[0](x, modulation, torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool),
                              spatial, temporal, AttentionBackend.SDPA)
        assert torch.equal(out, x)


@pytest.mark.parametrize("temporal_patch", [2, 4])
def test_inflated_patch_embed_embeds_a_static_clip_like_the_image(temporal_patch):
    g = torch.Generator().manual_seed(0)
    weight_2d = torch.randn(32, 4, 2, 2, generator=g, dtype=torch.float64)    # (D, C, p, p)
    bias = torch.randn(32, generator=g, dtype=torch.float64)
    frame = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    clip = frame[:, :, None].expand(-1, -1, temporal_patch, -1, -1)           # (1, C, pt, H, W)
    weight_3d = inflate_patch_embed(weight_2d, temporal_patch)
    assert weight_3d.shape == (32, 4, temporal_patch, 2, 2)
    video = F.conv3d(clip, weight_3d, bias, stride=(temporal_patch, 2, 2))    # (1, D, 1, 4, 4)
    torch.testing.assert_close(video[:, :, 0], F.conv2d(frame, weight_2d, bias, stride=2), rtol=1e-12, atol=1e-12)
    # A clip that moves does not embed like its first frame.
    moving = clip.clone()
    moving[:, :, -1] += 1.0
    assert not torch.allclose(F.conv3d(moving, weight_3d, bias, stride=(temporal_patch, 2, 2))[:, :, 0],
                              video[:, :, 0])
    with pytest.raises(ValueError, match="2D patch-embed weight"):
        inflate_patch_embed(weight_3d, 2)
