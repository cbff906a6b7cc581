"""InLineAttention: injective weights sum to one per query; equals the quadratic formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headwise.layers.inline import InLineAttention


def _layer(**kwargs):
    torch.manual_seed(0)
    return InLineAttention(8, 2, **kwargs).double()


def _zero_local(m):
    with torch.no_grad():
        m.kernel_out.weight.zero_()
        m.kernel_out.bias.zero_()


def test_equals_quadratic_formula_with_local_term():
    m = _layer()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    q, k, v = m.qkv(x).chunk(3, -1)
    qh, kh, vh = (t.reshape(2, 12, 2, 4).transpose(1, 2) for t in (q, k, v))
    s, n = 4**-0.5, 12
    w = 1 / n + (s / n) * qh @ (kh - kh.mean(-2, keepdim=True)).transpose(-1, -2)
    o = (w @ vh).transpose(1, 2).reshape(2, 12, 8)
    kernels = m.kernel_out(F.gelu(m.kernel_hidden(x.mean(1)[..., None]))).reshape(2, 8, 1, 3, 3)
    local = torch.stack([
        F.conv2d(v[b].T.reshape(8, 3, 4), kernels[b], padding=1, groups=8).reshape(8, 12).T
        for b in range(2)
    ])  # fmt: skip
    torch.testing.assert_close(m(x, (3, 4)), m.proj(o + local))


def test_weights_sum_to_one_per_query():
    # constant values (v = c for every token) come out unchanged iff every row of w sums to 1
    m = _layer()
    _zero_local(m)
    c = torch.randn(8, dtype=torch.float64)
    with torch.no_grad():
        m.qkv.weight[16:].zero_()
        m.qkv.bias[16:] = c
    x = torch.randn(3, 20, 8, dtype=torch.float64) * 3
    expected = m.proj(c).expand(3, 20, 8)
    torch.testing.assert_close(m(x, (4, 5)), expected)


def test_local_term_vanishes_when_the_generator_is_zero_and_relu_kernel():
    m = _layer(kernel="relu")
    _zero_local(m)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    q, k, v = m.qkv(x).chunk(3, -1)
    qh, kh, vh = (t.reshape(1, 6, 2, 4).transpose(1, 2) for t in (q, k, v))
    qh, kh = qh.relu(), kh.relu()
    w = 1 / 6 + (0.5 / 6) * qh @ (kh - kh.mean(-2, keepdim=True)).transpose(-1, -2)
    o = (w @ vh).transpose(1, 2).reshape(1, 6, 8)
    torch.testing.assert_close(m(x, (2, 3)), m.proj(o))


def test_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        InLineAttention(9, 2)
    with pytest.raises(ValueError, match="token-wise"):
        InLineAttention(8, 2, kernel="inline")
    with pytest.raises(ValueError, match=r"x must be \(B, H\*W, 8\) with \(H, W\) = \(3, 3\)"):
        _layer()(torch.randn(1, 10, 8, dtype=torch.float64), (3, 3))
