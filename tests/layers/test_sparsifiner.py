"""SparsifinerAttention: top-k budget per row, dense CLS row, detached mask, explicit formula."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.layers.sparsifiner import SparsifinerAttention


def _layer(n=13, keep_rate=0.25, **kw) -> SparsifinerAttention:
    torch.manual_seed(0)
    return SparsifinerAttention(24, 3, n, keep_rate=keep_rate, token_reduction=3, **kw).double()


def _qkv(layer, x):
    return layer.qkv(x).view(x.shape[0], layer.seq_len, 3, layer.num_heads, -1).unbind(2)


def _explicit(layer, x, keep):
    """softmax(mask_fill(q k^T / sqrt(D), ~keep, -inf)) v, then the output projection."""
    q, k, v = (t.transpose(1, 2) for t in _qkv(layer, x))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(layer.head_dim)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    return layer.out_proj((probs @ v).transpose(1, 2).flatten(-2))


def test_budget_keys_per_row_and_dense_cls_row():
    layer = _layer(n=13, keep_rate=0.25)
    assert layer.budget == 4
    with torch.no_grad():
        layer.token_proj.mul_(100)  # at init (std 0.02) the predictor is nearly input-agnostic
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    keep = layer.connectivity_mask(layer.approximate_attention(*_qkv(layer, x)[:2]))
    assert keep.shape == (2, 3, 13, 13)
    assert (keep[..., 1:, :].sum(-1) == 4).all()
    assert keep[..., 0, :].all()
    # Instance-dependent: the two batch elements choose different keys.
    assert not torch.equal(keep[0], keep[1])


def test_causal_rows_keep_min_budget_and_no_future_key():
    layer = _layer(n=10, keep_rate=0.3, cls_token=False, causal=True)
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    keep = layer.connectivity_mask(layer.approximate_attention(*_qkv(layer, x)[:2]))
    assert keep.sum(-1)[0, 0].tolist() == [min(3, i + 1) for i in range(10)]
    assert not (keep & torch.ones(10, 10).triu(1).bool()).any()


def test_predictor_is_the_low_rank_formula():
    layer = _layer(n=12)
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    q, k, _ = _qkv(layer, x)
    q_r = layer.q_reduce(q).transpose(1, 2)
    k_r = layer.k_reduce(k).transpose(1, 2)
    coeff = torch.softmax(q_r @ k_r.transpose(-1, -2) @ layer.token_proj / math.sqrt(3), -1)
    assert coeff.shape[-1] == 4  # N // token_reduction bases
    expected = coeff @ layer.basis.t()
    got = layer.approximate_attention(q, k, sparse=False)
    torch.testing.assert_close(got[..., 1:, :], expected[..., 1:, :])
    top = coeff.topk(4, -1)  # basis_top_k = 8 > 4 bases: all kept
    basis = layer.basis.t().abs()
    sparse = torch.zeros_like(coeff).scatter(-1, top.indices, top.values) @ (basis * (basis > 0.02))
    torch.testing.assert_close(layer.approximate_attention(q, k)[..., 1:, :], sparse[..., 1:, :])


@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_equal_explicit_formula_on_every_backend(causal):
    layer = _layer(n=13, keep_rate=0.4, causal=causal)
    x = torch.randn(2, 13, 24, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        keep = layer.connectivity_mask(layer.approximate_attention(*_qkv(layer, x)[:2]))
    if causal:
        keep &= torch.ones(13, 13).tril().bool()
    expected = _explicit(layer, x, keep)
    weights = [x, layer.qkv.weight, layer.out_proj.weight]
    grads_expected = torch.autograd.grad(expected.square().sum(), weights)
    for backend in ("auto", "reference"):
        layer.backend = backend
        y = layer(x)
        torch.testing.assert_close(y, expected)
        for g, g_ref in zip(torch.autograd.grad(y.square().sum(), weights), grads_expected):
            torch.testing.assert_close(g, g_ref)


def test_keep_rate_one_is_dense_attention():
    layer = _layer(n=9, keep_rate=1.0)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    dense = _explicit(layer, x, torch.ones(9, 9, dtype=torch.bool))
    torch.testing.assert_close(layer(x), dense)
    torch.testing.assert_close(layer(x, dense=True), dense)


def test_no_gradient_reaches_the_predictor_from_the_task_loss():
    layer = _layer(n=13)
    x = torch.randn(2, 13, 24, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    predictor = [layer.q_reduce.weight, layer.k_reduce.weight, layer.token_proj, layer.basis]
    assert all(p.grad is None for p in predictor)
    assert layer.qkv.weight.grad is not None
    # The reconstruction loss on Ahat does train it.
    _, approx = layer(x, return_approx=True)
    approx.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor)


def test_bad_input():
    layer = _layer(n=13)
    with pytest.raises(ValueError, match=r"x must be \(B, N=13, C=24\).*got \(2, 12, 24\)"):
        layer(torch.randn(2, 12, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="keep_rate"):
        SparsifinerAttention(24, 3, 13, keep_rate=0.0)
    with pytest.raises(ValueError, match="channel_reduction"):
        SparsifinerAttention(24, 3, 13, channel_reduction=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SparsifinerAttention(24, 5, 13)


def _official_sparse_forward(layer, x):
    """lim142857/Sparsifiner ``src/models/sparsifiner.py`` (mask predictor and attention) when
    the reconstruction loss is off, written on this layer's weights: returns the mask
    ``(B, H, N, N)`` and the output."""
    b, n, c = x.shape
    heads = layer.num_heads
    q, k, v = layer.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q_r, k_r = layer.q_reduce(q), layer.k_reduce(k)
    k_r = k_r.permute(0, 1, 3, 2) @ layer.token_proj
    threshold = torch.nn.Threshold(layer.basis_threshold, 0.0)
    basis = threshold(layer.basis.permute(1, 0).abs())
    cheap = ((q_r @ k_r) * heads**-0.5)[..., 1:, :]
    coef = cheap.softmax(dim=-1)
    top, top_idx = coef.topk(layer.basis_top_k, sorted=False)
    coef = torch.zeros_like(coef).scatter_(-1, top_idx, top)
    approx = coef @ basis
    keep = torch.zeros_like(approx).scatter_(-1, approx.topk(layer.budget, sorted=False)[1], 1.0)
    keep = torch.cat([torch.ones(b, heads, 1, n, dtype=keep.dtype), keep], dim=2).bool()
    attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    attn = attn.masked_fill(~keep, float("-inf")).softmax(dim=-1).nan_to_num()
    return keep, layer.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_training_forward_sparsifies_the_predictor_as_the_official_code():
    """Issue 13: in training (reconstruction off) headwise used the dense predictor for the mask
    and sparsified it only in eval; the official code sparsifies whenever the reconstruction
    loss is off, so train and eval must choose the same keys."""
    torch.manual_seed(5)
    layer = SparsifinerAttention(
        24, 3, 13, keep_rate=0.3, token_reduction=1, basis_top_k=4, basis_threshold=0.02
    ).double()
    with torch.no_grad():
        layer.token_proj.normal_(0, 1.0)
        layer.basis.normal_(0, 0.05)
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    keep, expected = _official_sparse_forward(layer, x)
    q, k, _ = _qkv(layer, x)
    layer.train()
    torch.testing.assert_close(layer(x), expected)
    _, approx = layer(x, return_approx=True)
    assert torch.equal(layer.connectivity_mask(approx), keep)
    # The dense Ahat is the reconstruction stage's (training with dense=True) only.
    _, dense_approx = layer(x, dense=True, return_approx=True)
    torch.testing.assert_close(dense_approx, layer.approximate_attention(q, k, sparse=False))
    assert not torch.equal(layer.connectivity_mask(dense_approx), keep)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)
