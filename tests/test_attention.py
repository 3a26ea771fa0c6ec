"""Attention backends: agreement with a float64 reference, masks, and SAGE falling back on the CPU."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from stiv_core.model.attention import (AttentionBackend, attention, available_backends, math_attention,
                                       resolve_backend)

# `stiv_core.model.attention` the attribute is the re-exported function; fetch the module itself.
attention_module = importlib.import_module("stiv_core.model.attention")


def reference(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v in float64, masked keys weighted exactly 0."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    if mask is not None:
        weights = weights * mask
    return weights @ v / weights.sum(-1, keepdim=True)


def qkv(seed=0, b=2, h=3, nq=7, nk=5, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g),
            torch.randn(b, h, nk, d, generator=g))


def text_mask(b=2, nk=5):
    """(B, 1, 1, Nk) like CrossAttention's: row 0 keeps 3 keys, row 1 keeps all but key 1."""
    mask = torch.ones(b, nk, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 1] = False
    return mask[:, None, None, :]


def test_cpu_backends_are_listed():
    backends = available_backends("cpu")
    assert AttentionBackend.SDPA in backends and AttentionBackend.MATH in backends
    assert AttentionBackend.SAGE not in backends


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_backends_match_math_and_float64_reference(backend, masked):
    q, k, v = qkv()
    mask = text_mask() if masked else None
    out = attention(q, k, v, mask, backend=backend)                      # (B, H, Nq, d)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, math_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_math_attention_in_float64_is_exact_to_float64():
    q, k, v = (t.double() for t in qkv(seed=3))
    out = math_attention(q, k, v, text_mask())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(q, k, v, text_mask()), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_fully_masked_key_is_ignored(backend):
    q, k, v = qkv(seed=4)
    mask = text_mask()
    out = attention(q, k, v, mask, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4], v2[0, :, 4] = 100.0, -100.0                              # key 4 is masked in row 0
    k2[1, :, 1], v2[1, :, 1] = -50.0, 1e3                                 # key 1 is masked in row 1
    torch.testing.assert_close(attention(q, k2, v2, mask, backend=backend), out, atol=1e-6, rtol=0)
    # A key that is not masked does change the output.
    k2[0, :, 0] = 5.0
    assert not torch.allclose(attention(q, k2, v2, mask, backend=backend), out, atol=1e-3)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_a_query_with_no_key_to_attend_gets_zeros(backend):
    # E.g. a prompt whose tokens are all masked: every backend must agree (zeros), none may give NaN.
    q, k, v = qkv(seed=6)
    mask = text_mask()
    mask[1] = False
    out = attention(q, k, v, mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0].double(), reference(q, k, v, text_mask())[0], atol=1e-5, rtol=1e-5)


def test_sage_on_cpu_falls_back_to_sdpa_with_a_logged_reason(caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "_logged", set())  # the reason is logged once per process
    q, k, v = qkv(seed=5)
    with caplog.at_level(logging.WARNING, logger=attention_module.__name__):
        out = attention(q, k, v, backend=AttentionBackend.SAGE)
    torch.testing.assert_close(out, attention(q, k, v, backend=AttentionBackend.SDPA))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert "sage" in messages[0] and "using sdpa" in messages[0]
    # The reason names what is missing: the package, or CUDA when the package is installed.
    assert "not installed" in messages[0] or "CUDA" in messages[0]


def test_backend_without_mask_support_falls_back_when_a_mask_is_given(monkeypatch):
    # Pretend sage could serve this tensor: the mask alone must still force SDPA.
    entry = attention_module._REGISTRY[AttentionBackend.SAGE]
    monkeypatch.setitem(attention_module._REGISTRY, AttentionBackend.SAGE,
                        type(entry)(entry.fn, entry.supports_mask, lambda q: None))
    monkeypatch.setattr(attention_module, "_logged", set())
    q = torch.zeros(1, 1, 2, 8)
    assert resolve_backend(AttentionBackend.SAGE, q, has_mask=False) is AttentionBackend.SAGE
    assert resolve_backend(AttentionBackend.SAGE, q, has_mask=True) is AttentionBackend.SDPA


def test_backend_names_parse():
    assert AttentionBackend("sdpa") is AttentionBackend.SDPA
    with pytest.raises(ValueError):
        AttentionBackend("flash")
