"""BasedAttention: causal, the linear branch is Based's formula, the window keeps w + 1 keys."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.layers.based import BasedAttention


def _layer(window_size, backend="auto"):
    torch.manual_seed(0)
    layer = BasedAttention(
        12, 3, feature_dim=4, window_size=window_size, chunk_size=4, backend=backend
    )
    return layer.double()


def test_changing_a_future_token_never_changes_a_past_output():
    layer = _layer(window_size=3)
    x = torch.randn(2, 13, 12, dtype=torch.float64)
    y = layer(x)
    for t in (0, 5, 12):
        x2 = x.clone()
        x2[:, t] += torch.randn(12, dtype=torch.float64)
        y2 = layer(x2)
        torch.testing.assert_close(y2[:, :t], y[:, :t])
        assert (y2[:, t] - y[:, t]).abs().max() > 1e-6


# auto: the quadratic form on 1 + z + z^2/2 (short sequence); chunk: Taylor features by chunks.
@pytest.mark.parametrize("backend", ["auto", "chunk"])
def test_linear_branch_is_normalised_taylor_attention(backend):
    layer = _layer(window_size=0, backend=backend)
    x = torch.randn(1, 9, 12, dtype=torch.float64)
    q = layer.q_proj(x).view(1, 9, 3, 4)
    k = layer.k_proj(x).view(1, 9, 3, 4)
    v = layer.v_proj(x).view(1, 9, 3, 4)
    z = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(4)
    kernel = (1 + z + z * z / 2).tril()
    o = torch.einsum("bhij,bjhe->bihe", kernel, v) / (
        kernel.sum(-1).transpose(1, 2)[..., None] + 1e-12
    )
    torch.testing.assert_close(layer(x), layer.out_proj(o.flatten(-2)))


# Windows shorter than the sequence, reaching exactly back to token 0 (served as plain causal
# attention), and longer than the sequence.
@pytest.mark.parametrize("window_size", [2, 5, 6, 9])
def test_window_branch_keeps_w_plus_one_keys(window_size):
    layer = _layer(window_size=window_size)
    x = torch.randn(1, 7, 12, dtype=torch.float64)
    wq, wk, wv = layer.window_qkv(x).view(1, 7, 3, 3, 4).unbind(2)
    scores = torch.einsum("bihd,bjhd->bhij", wq, wk) / 2.0
    i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
    visible = (j <= i) & (j >= i - window_size)
    assert visible.sum(-1).tolist() == [min(t, window_size) + 1 for t in range(7)]
    window = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    window_out = torch.einsum("bhij,bjhe->bihe", window, wv)
    linear_only = BasedAttention(12, 3, feature_dim=4, window_size=0, chunk_size=4).double()
    linear_only.load_state_dict(layer.state_dict(), strict=False)
    expected = linear_only(x) + layer.out_proj(window_out.flatten(-2))
    torch.testing.assert_close(layer(x), expected)


def test_bad_input():
    with pytest.raises(ValueError, match=r"window_size must be an integer >= 0; got -1"):
        BasedAttention(12, 3, window_size=-1)
    with pytest.raises(ValueError, match="divisible"):
        BasedAttention(10, 3)
    with pytest.raises(ValueError, match=r"x must be \(B, L, 12\)"):
        _layer(2)(torch.randn(2, 12, dtype=torch.float64))
