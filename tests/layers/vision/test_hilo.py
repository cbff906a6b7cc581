"""HiLoAttention: equals window MHSA (Hi-Fi) ⊕ pooled-KV MHSA (Lo-Fi); special cases; padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headwise.layers.vision import HiLoAttention


def _mhsa(q, k, v, mask=None):
    """q, k, v: (B, L, h, d) -> (B, Lq, h, d), dense softmax attention."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


def _oracle(m: HiLoAttention, x: torch.Tensor) -> torch.Tensor:
    """Dense formulation on a map divisible by s: Hi-Fi as block-diagonal-masked MHSA."""
    b, height, width, c = x.shape
    s, d = m.window_size, m.head_dim
    tokens = x.reshape(b, -1, c)
    parts = []
    if m.hi_heads:
        q, k, v = m.h_qkv(tokens).reshape(b, -1, 3, m.hi_heads, d).unbind(2)
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        win = ((ys // s) * (width // s) + xs // s).flatten()
        parts.append(m.h_proj(_mhsa(q, k, v, win[:, None] == win[None, :]).flatten(2)))
    if m.lo_heads:
        q = m.l_q(tokens).reshape(b, -1, m.lo_heads, d)
        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), s).flatten(2).transpose(1, 2)
        k, v = m.l_kv(pooled).reshape(b, -1, 2, m.lo_heads, d).unbind(2)
        parts.append(m.l_proj(_mhsa(q, k, v).flatten(2)))
    return torch.cat(parts, -1).reshape(b, height, width, c)


@pytest.mark.parametrize(("window", "alpha"), [(2, 0.5), (2, 0.0), (2, 1.0), (1, 0.5), (3, 0.25)])
def test_equals_dense_oracle(window, alpha):
    torch.manual_seed(0)
    m = HiLoAttention(16, 4, window_size=window, alpha=alpha, qkv_bias=True).double()
    x = torch.randn(2, 6, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), _oracle(m, x))


def test_head_split_and_channel_order():
    m = HiLoAttention(24, 4, window_size=2, alpha=0.6)
    assert (m.lo_heads, m.hi_heads) == (2, 2)
    assert HiLoAttention(24, 4, window_size=1).lo_heads == 4  # s = 1: every head is Lo-Fi
    torch.manual_seed(1)
    x = torch.randn(1, 4, 4, 24)
    with torch.no_grad():
        m.l_proj.weight.zero_()
        m.l_proj.bias.zero_()
    y = m(x)
    assert y[..., 12:].abs().max() == 0  # Lo-Fi channels come last
    assert y[..., :12].abs().max() > 0


def test_odd_grid_forward_backward_and_tokens():
    torch.manual_seed(2)
    m = HiLoAttention(16, 4, window_size=2)
    x = torch.randn(2, 7, 5, 16, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    torch.testing.assert_close(m(x.reshape(2, 35, 16), size=(7, 5)), y.reshape(2, 35, 16))
    # zero padding to 8 x 6 then cropping: the padded map's output restricted to the real tokens
    padded = F.pad(x.detach(), (0, 0, 0, 1, 0, 1))
    torch.testing.assert_close(y.detach(), _oracle(m, padded)[:, :7, :5])


def test_errors():
    with pytest.raises(ValueError, match="alpha"):
        HiLoAttention(16, 4, alpha=1.5)
    with pytest.raises(ValueError, match="num_heads"):
        HiLoAttention(18, 4)
    with pytest.raises(ValueError, match=r"\(B, H, W, 16\)"):
        HiLoAttention(16, 4)(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="tokens"):
        HiLoAttention(16, 4)(torch.randn(2, 10, 16), size=(3, 4))
