"""SelectiveMultiHeadAttention: per-head token subsets in order; unselected tokens untouched."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_fa3_close
from headwise import patterns
from headwise.layers.multihead import MultiHeadAttention
from headwise.layers.selective import SelectiveMultiHeadAttention
from headwise.ops.attention import attention

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


def _compacted(m, x):
    """The layer's former formulation: each head's tokens gathered ``E`` wide, projected by that
    head's slice of each projection, attended, and scatter-added back through ``W_o^h``."""
    selected = m.route(x)
    b, length, e = x.shape
    h, d = m.num_heads, m.head_dim
    counts = selected.sum(1)
    slots = int(counts.max())
    position = torch.arange(length)
    order = torch.where(selected, position[:, None], position[:, None] + length)
    idx = order.transpose(1, 2).sort(-1).values[..., :slots] % length
    valid = torch.arange(slots) < counts[..., None]
    x_sel = x[:, None].expand(b, h, length, e).gather(2, idx[..., None].expand(-1, -1, -1, e))

    def project(proj):
        out = torch.einsum("bhte,hde->bhtd", x_sel, proj.weight.view(h, d, e))
        return out if proj.bias is None else out + proj.bias.view(h, 1, d)

    flat = (b * h, slots, 1, d)
    q, k, v = (project(p).reshape(flat) for p in (m.q_proj, m.k_proj, m.v_proj))
    bias = None
    if not m.causal:
        hidden = torch.zeros(valid.shape, dtype=q.dtype).masked_fill(~valid, float("-inf"))
        bias = hidden.view(b * h, 1, 1, slots)
    pattern = patterns.causal() if m.causal else None
    dropout = m.dropout if m.training else 0.0
    out = attention(q, k, v, pattern, bias=bias, backend=m.backend, dropout_p=dropout)
    out = out.view(b, h, slots, d)
    contrib = torch.einsum("bhtd,ehd->bhte", out, m.out_proj.weight.view(e, h, d))
    contrib = contrib * valid[..., None]
    y = x.new_zeros(b, length, e).scatter_add(
        1, idx.reshape(b, h * slots, 1).expand(-1, -1, e), contrib.reshape(b, h * slots, e)
    )
    return y if m.out_proj.bias is None else y + m.out_proj.bias


def _step(m, x, forward, seed=5):
    """Output, gradients of x and every parameter, and the next draw of torch's generator (so
    both formulations consume it alike) under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    out = forward(m, x)
    leaves = [x, *m.parameters()]
    grads = torch.autograd.grad(out.float().square().sum(), leaves, materialize_grads=True)
    return out, grads, torch.rand(())


SHAPES = [  # (batch, length, embed_dim, heads, head_dim, top_k)
    (3, 11, 12, 4, None, 2),
    (2, 9, 10, 3, 5, 1),
    (1, 1, 12, 4, None, 3),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("backend", "bias"), [("reference", True), ("auto", True), ("auto", False)]
)
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_the_compacted_formulation_with_dropout_float32(causal, backend, bias, shape):
    """Training with dropout: the same outputs, gradients and dropout draws as the former
    per-head gathered formulation (the router takes no gradient in either)."""
    b, length, e, h, d, top_k = shape
    torch.manual_seed(0)
    m = SelectiveMultiHeadAttention(
        e, h, head_dim=d, top_k=top_k, causal=causal, bias=bias, backend=backend, dropout=0.3
    ).train()
    x = torch.randn(b, length, e, requires_grad=True)
    out, grads, after = _step(m, x, SelectiveMultiHeadAttention.forward)
    want, want_grads, want_after = _step(m, x, _compacted)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, want_after)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_equals_the_compacted_formulation_bfloat16(causal, shape):
    """bfloat16, dropout on: against the former formulation in float64 on the same routing and
    keep mask, within twice the former formulation's own bfloat16 error."""
    b, length, e, h, d, top_k = shape
    torch.manual_seed(1)
    m = SelectiveMultiHeadAttention(
        e, h, head_dim=d, top_k=top_k, causal=causal, backend="reference", dropout=0.3
    ).train()
    oracle = SelectiveMultiHeadAttention(
        e, h, head_dim=d, top_k=top_k, causal=causal, backend="reference", dropout=0.3
    ).train()
    oracle.load_state_dict(m.state_dict())
    m, oracle = m.bfloat16(), oracle.double()
    x = torch.randn(b, length, e, dtype=torch.bfloat16, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    selected = m.route(x)
    oracle.route = lambda _: selected  # the same tokens per head as the bfloat16 layer
    fast = _step(m, x, SelectiveMultiHeadAttention.forward)
    naive = _step(m, x, _compacted)
    exact = _step(oracle, x64, _compacted)
    assert_fa3_close(fast[0], naive[0], exact[0], torch.bfloat16, "out")
    for i, (got, low, want) in enumerate(zip(fast[1], naive[1], exact[1])):
        assert_fa3_close(got, low, want, torch.bfloat16, f"grad {i}")
