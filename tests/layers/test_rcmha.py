"""RelativeConvAttention: causal conv + relative scores; reduces to causal MHA; never sees ahead."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.layers.rcmha import RelativeConvAttention

E, H = 8, 2


def _explicit(m, x):
    """Convolutions as explicit tap sums and the relative score as a loop over (i, j)."""
    b, length, _ = x.shape
    d = m.head_dim

    def conv(conv_layer, t):
        t = t.view(b, length, H, d)
        out = torch.zeros_like(t) + conv_layer.bias
        for tap in range(m.kernel_size):
            shift = m.kernel_size - 1 - tap  # tap k-1 multiplies the current step
            shifted = torch.zeros_like(t)
            shifted[:, shift:] = t[:, : length - shift]
            out = out + shifted * conv_layer.weight[:, 0, tap]
        return out

    q = conv(m.q_conv, x @ m.q_proj.weight.T)
    k = conv(m.k_conv, x @ m.k_proj.weight.T)
    v = conv(m.v_conv, x @ m.v_proj.weight.T + m.v_proj.bias)
    s = torch.full((b, H, length, length), float("-inf"), dtype=x.dtype)
    for i in range(length):
        for j in range(i + 1):
            content = ((q[:, i] + m.content_bias) * k[:, j]).sum(-1)
            rel = (q[:, i] * m.rel_key[i - j]).sum(-1) + m.rel_bias[i - j]
            s[:, :, i, j] = (content + rel) / math.sqrt(d)
    o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)
    return m.out_proj(o.reshape(b, length, E))


def _randomise(m):
    with torch.no_grad():
        for p in (m.content_bias, m.rel_key, m.rel_bias):
            p.normal_(0, 0.5)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_equals_explicit_formula_and_backward(backend):
    torch.manual_seed(0)
    m = RelativeConvAttention(E, H, max_len=9, backend=backend).double()
    _randomise(m)
    x = torch.randn(2, 7, E, dtype=torch.float64, requires_grad=True)
    out = m(x)
    torch.testing.assert_close(out, _explicit(m, x))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and m.rel_key.grad[:7].abs().sum() > 0


def test_identity_conv_zero_tables_is_causal_mha():
    torch.manual_seed(1)
    m = RelativeConvAttention(E, H, max_len=8).double()
    with torch.no_grad():
        for conv in (m.q_conv, m.k_conv, m.v_conv):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0
            conv.bias.zero_()
    x = torch.randn(1, 6, E, dtype=torch.float64)
    q = (x @ m.q_proj.weight.T).view(1, 6, H, 4).transpose(1, 2)
    k = (x @ m.k_proj.weight.T).view(1, 6, H, 4).transpose(1, 2)
    v = m.v_proj(x).view(1, 6, H, 4).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(m(x), m.out_proj(o.transpose(1, 2).reshape(1, 6, E)))


def test_output_at_t_independent_of_later_inputs():
    torch.manual_seed(2)
    m = RelativeConvAttention(E, H, kernel_size=4, max_len=11).double()
    _randomise(m)
    x = torch.randn(2, 11, E, dtype=torch.float64)
    for t in (0, 4, 9):
        later = x.clone()
        later[:, t + 1 :] = torch.randn_like(later[:, t + 1 :])
        torch.testing.assert_close(m(later)[:, : t + 1], m(x)[:, : t + 1])


def test_errors():
    m = RelativeConvAttention(E, H, max_len=4)
    with pytest.raises(ValueError, match=r"longer than max_len=4; got \(1, 5, 8\)"):
        m(torch.randn(1, 5, E))
    with pytest.raises(ValueError, match="num_heads must divide embed_dim"):
        RelativeConvAttention(E, 3)
