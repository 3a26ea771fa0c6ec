"""Rotary position embeddings: the rotation formula, relative-position scores, interpolated positions."""
from __future__ import annotations

import math

import pytest
import torch

from stiv_core.model.rope import Rope, apply_rope, grid_positions, rope_tables
from stiv_core.model.transformer import STIVTransformer

THETA = 10000.0


def reference_rope(x: torch.Tensor, positions: torch.Tensor, axes_dims: list[int]) -> torch.Tensor:
    """float64 complex reference: pair (2i, 2i+1) of axis a is multiplied by exp(1j * pos_a * f_i)."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = torch.tensor([THETA ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
        angles.append(positions[:, axis, None].double() * freqs)
    angle = torch.cat(angles, dim=-1)                                        # (N, hd/2)
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def scores(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, axes_dims: list[int]) -> torch.Tensor:
    """q . k after rotating q to positions[0] and k to positions[1]. q, k: (hd,)."""
    rope = rope_tables(positions, axes_dims, THETA)
    rq = apply_rope(q.expand(2, -1), rope)[0]
    rk = apply_rope(k.expand(2, -1), rope)[1]
    return (rq.double() * rk.double()).sum()


@pytest.mark.parametrize("axes_dims, n_axes", [([16], 1), ([8, 8], 2)])
def test_apply_rope_matches_complex_reference(axes_dims, n_axes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 10, 16, generator=g)                   # (B, heads, N, hd)
    positions = torch.rand(10, n_axes, generator=g) * 20
    out = apply_rope(x, rope_tables(positions, axes_dims, THETA))
    torch.testing.assert_close(out.double(), reference_rope(x, positions, axes_dims), atol=2e-5, rtol=1e-5)
    # A rotation keeps the norm of every pair.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_scores_depend_only_on_relative_position_1d():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    base = scores(q, k, torch.tensor([[3.0], [7.0]]), [16])
    for offset in (1.0, 5.0, 40.0):
        shifted = scores(q, k, torch.tensor([[3.0 + offset], [7.0 + offset]]), [16])
        assert shifted == pytest.approx(base.item(), abs=2e-4)
    # ...and it does depend on the relative position (otherwise the test above proves nothing).
    assert abs(scores(q, k, torch.tensor([[3.0], [8.0]]), [16]) - base) > 1e-2


def test_scores_depend_only_on_relative_position_2d():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    pos = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    base = scores(q, k, pos, [8, 8])
    for offset in ([3.0, 0.0], [0.0, 5.0], [7.0, 2.0]):
        assert scores(q, k, pos + torch.tensor(offset), [8, 8]) == pytest.approx(base.item(), abs=2e-4)
    for moved in ([[1.0, 2.0], [5.0, 0.0]], [[1.0, 2.0], [4.0, 1.0]]):  # each axis matters
        assert abs(scores(q, k, torch.tensor(moved), [8, 8]) - base) > 1e-2


def test_grid_positions_are_row_major_and_scaled():
    pos = grid_positions(2, 3, scale=(1.0, 0.5))
    expected = [[r, c * 0.5] for r in range(2) for c in range(3)]
    assert pos.tolist() == expected


def test_index_tokens_gathers_rows():
    rope = rope_tables(torch.arange(6.0)[:, None], [8], THETA)            # (6, 4)
    index = torch.tensor([[0, 2, 5], [1, 3, 4]])
    kept = rope.index_tokens(index)                                        # (2, 3, 4)
    assert isinstance(kept, Rope) and kept.cos.shape == (2, 3, 4)
    torch.testing.assert_close(kept.sin[1, 2], rope.sin[4], rtol=0, atol=0)


@pytest.mark.parametrize("scale_h, scale_w", [(0.5, 0.5), (0.5, 0.25)])
def test_interpolated_rope_on_a_larger_grid_reproduces_the_small_grid(tiny_config, scale_h, scale_w):
    # A model moved from an 8x8 token grid to one 2x larger (8x8 -> 16x16) with positions scaled by
    # 0.5: token (2i, 2j) of the large grid must get exactly the tables of token (i, j) of the small
    # grid. The (0.5, 0.25) case on a 16x32 grid tells height from width.
    sh, sw = round(1 / scale_h), round(1 / scale_w)
    small = STIVTransformer(tiny_config)
    large = STIVTransformer(tiny_config.replace(rope_position_scale=(1.0, scale_h, scale_w)))
    (s_small, t_small), (s_large, t_large) = small.rope((3, 8, 8), "cpu"), large.rope((3, 8 * sh, 8 * sw), "cpu")
    assert s_large.cos.shape == (64 * sh * sw, tiny_config.head_dim // 2)
    for i in range(8):
        for j in range(8):
            for table_small, table_large in ((s_small.cos, s_large.cos), (s_small.sin, s_large.sin)):
                assert torch.equal(table_large[(sh * i) * 8 * sw + sw * j], table_small[i * 8 + j])
    assert torch.equal(t_large.cos, t_small.cos)                           # time is not scaled here
    # Odd grid positions lie between the small grid's tokens: not equal to any neighbour.
    assert not torch.equal(s_large.cos[1], s_small.cos[0]) and not torch.equal(s_large.cos[1], s_small.cos[1])


def test_interpolated_rope_in_time(tiny_config):
    small = STIVTransformer(tiny_config)
    large = STIVTransformer(tiny_config.replace(rope_position_scale=(0.5, 1.0, 1.0)))
    _, t_small = small.rope((4, 2, 2), "cpu")
    _, t_large = large.rope((8, 2, 2), "cpu")
    assert torch.equal(t_large.cos[::2], t_small.cos) and torch.equal(t_large.sin[::2], t_small.sin)


def test_rope_tables_reject_mismatched_axes():
    with pytest.raises(ValueError, match="2 axes"):
        rope_tables(torch.zeros(4, 2), [16], THETA)


def test_frequencies_follow_theta():
    # Pair i of a 1D axis of width d turns by theta^(-2i/d) per unit position.
    rope = rope_tables(torch.tensor([[1.0]]), [8], THETA)
    expected = [math.cos(THETA ** (-2 * i / 8)) for i in range(4)]
    assert rope.cos[0].tolist() == pytest.approx(expected, abs=1e-6)
