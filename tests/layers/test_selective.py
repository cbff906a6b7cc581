"""SelectiveMultiHeadAttention: per-head token subsets in order; unselected tokens untouched."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.layers.multihead import MultiHeadAttention
from headwise.layers.selective import SelectiveMultiHeadAttention

E, H = 12, 4


def _explicit(m, x):
    """Loop over (sequence, head): attention on the routed tokens only, scattered back."""
    selected = m.route(x)
    d = m.head_dim
    q_all = (x @ m.q_proj.weight.T + m.q_proj.bias).view(*x.shape[:2], H, d)
    k_all = (x @ m.k_proj.weight.T + m.k_proj.bias).view(*x.shape[:2], H, d)
    v_all = (x @ m.v_proj.weight.T + m.v_proj.bias).view(*x.shape[:2], H, d)
    y = torch.zeros_like(x) + m.out_proj.bias
    for b in range(x.shape[0]):
        for h in range(H):
            rows = selected[b, :, h].nonzero().flatten()
            if not len(rows):
                continue
            s = q_all[b, rows, h] @ k_all[b, rows, h].T / math.sqrt(d)
            if m.causal:
                s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), float("-inf"))
            o = torch.softmax(s, -1) @ v_all[b, rows, h]
            y[b, rows] += o @ m.out_proj.weight[:, h * d : (h + 1) * d].T
    return y


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_equals_per_head_loop_and_backward(causal, backend):
    torch.manual_seed(0)
    m = SelectiveMultiHeadAttention(E, H, top_k=2, causal=causal, backend=backend).double()
    x = torch.randn(2, 9, E, dtype=torch.float64, requires_grad=True)
    out = m(x)
    torch.testing.assert_close(out, _explicit(m, x))
    assert (m.route(x).sum(-1) == 2).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and m.q_proj.weight.grad.abs().sum() > 0


def test_all_heads_selected_equals_mha():
    torch.manual_seed(1)
    m = SelectiveMultiHeadAttention(E, H, top_k=H).double()
    mha = MultiHeadAttention(E, H, causal=True).double()
    missing, _ = mha.load_state_dict(m.state_dict(), strict=False)
    assert not missing
    x = torch.randn(2, 7, E, dtype=torch.float64)
    torch.testing.assert_close(m(x), mha(x))


def test_unselected_tokens_get_no_update_from_that_head():
    torch.manual_seed(2)
    m = SelectiveMultiHeadAttention(E, H, top_k=1).double()
    x = torch.randn(2, 10, E, dtype=torch.float64)
    selected = m.route(x)
    d = m.head_dim
    for h in range(H):
        only_h = SelectiveMultiHeadAttention(E, H, top_k=1).double()
        only_h.load_state_dict(m.state_dict())
        with torch.no_grad():  # keep head h's share of the output projection only
            keep = torch.zeros(H * d, dtype=torch.bool)
            keep[h * d : (h + 1) * d] = True
            only_h.out_proj.weight[:, ~keep] = 0
            only_h.out_proj.bias.zero_()
        written = only_h(x).abs().amax(-1) > 0
        assert torch.equal(written, selected[..., h])


def test_causality():
    torch.manual_seed(3)
    m = SelectiveMultiHeadAttention(E, H).double()
    x = torch.randn(1, 11, E, dtype=torch.float64)
    later = x.clone()
    later[:, 6:] = torch.randn_like(later[:, 6:])
    torch.testing.assert_close(m(later)[:, :6], m(x)[:, :6])


def test_errors():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_heads=4\]; got 5"):
        SelectiveMultiHeadAttention(E, H, top_k=5)
    with pytest.raises(ValueError, match=r"x must be \(B, L, E=12\); got \(3, 12\)"):
        SelectiveMultiHeadAttention(E, H)(torch.randn(3, E))
