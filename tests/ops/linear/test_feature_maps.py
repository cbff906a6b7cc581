"""Feature maps (Taylor identity, InLine injectivity and row sums) and the TNL decay schedule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.ops.linear import (
    InLineFeatureMap,
    alibi_slopes,
    get_feature_map,
    linear_attention,
    taylor,
    tnl_decay,
)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_taylor_kernel_identity(dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, dim, generator=gen, dtype=torch.float64)
    z = (q @ k) / math.sqrt(dim)
    assert taylor(q).shape == (1 + dim + dim * dim,)
    torch.testing.assert_close(taylor(q) @ taylor(k), 1 + z + z * z / 2)


def test_named_maps_and_callables():
    x = torch.linspace(-2, 2, 9).reshape(1, 9, 1, 1)
    torch.testing.assert_close(get_feature_map("elu+1").query(x), torch.nn.functional.elu(x) + 1)
    torch.testing.assert_close(get_feature_map("relu").key(x), x.clamp(min=0))
    torch.testing.assert_close(get_feature_map(None).query(x), x)
    torch.testing.assert_close(get_feature_map(torch.sigmoid).key(x), torch.sigmoid(x))
    with pytest.raises(ValueError, match="feature_map must be one of"):
        get_feature_map("softmax")


def _inline_weights(q, k, scale):
    """InLine's weights written out: 1/N + (s/N) phi(q_i) . (phi(k_j) - kbar), identity phi."""
    n = k.shape[0]
    kbar = k.mean(0)
    return 1 / n + (scale / n) * (q @ (k - kbar).T)


def test_inline_rows_sum_to_one_and_match_the_formula():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 11, 2, 4, generator=gen, dtype=torch.float64) for _ in "qkv")
    out = linear_attention(q, k, v, feature_map="inline", causal=False)
    for h in range(2):
        w = _inline_weights(q[0, :, h], k[0, :, h], 4**-0.5)
        torch.testing.assert_close(w.sum(-1), torch.ones(11, dtype=torch.float64))
        torch.testing.assert_close(out[0, :, h], w @ v[0, :, h])
    # rows sum to one: a constant value vector comes out unchanged
    ones = torch.ones_like(v)
    torch.testing.assert_close(
        linear_attention(q, k, ones, feature_map="inline", causal=False), ones
    )


def test_inline_is_injective_unlike_normalized_linear_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, 1, 4, generator=gen, dtype=torch.float64) for _ in "qkv")
    inline = InLineFeatureMap()
    a = linear_attention(q, k, v, feature_map=inline, causal=False)
    b = linear_attention(2 * q, k, v, feature_map=inline, causal=False)
    assert (a - b).abs().max() > 1e-3
    norm = {"feature_map": "relu", "causal": False, "normalize": True}
    torch.testing.assert_close(
        linear_attention(q.abs(), k.abs(), v, **norm),
        linear_attention(2 * q.abs(), k.abs(), v, **norm),
    )


def test_inline_needs_non_causal_and_dense_input():
    q = torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="causal=False"):
        linear_attention(q, q, q, feature_map="inline")
    with pytest.raises(ValueError, match="cu_seqlens"):
        linear_attention(q[0], q[0], q[0], feature_map="inline", causal=False,
                         cu_seqlens=torch.tensor([0, 4]))  # fmt: skip


def test_alibi_slopes_values():
    torch.testing.assert_close(alibi_slopes(8), 2.0 ** -torch.arange(1.0, 9.0))
    # non-power of two: slopes of 8 heads, then every other slope of 16 heads
    expected = [2.0 ** -(h + 1) for h in range(8)] + [2.0 ** -(0.5 * h) for h in (1, 3, 5, 7)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))
    assert alibi_slopes(32).shape == (32,)


def test_tnl_decay_layer_schedule():
    slopes = alibi_slopes(4)
    torch.testing.assert_close(tnl_decay(4, 0, 5), torch.exp(-slopes * (1 + 1e-5)))
    torch.testing.assert_close(tnl_decay(4, 2, 5), torch.exp(-slopes * (0.5 + 1e-5)))
    last = tnl_decay(4, 4, 5)
    assert bool((last < 1).all()) and bool((last > 0.9999).all())
    with pytest.raises(ValueError, match="layer_idx"):
        tnl_decay(4, 5, 5)
