"""Attention dropout in the native kernel (dropout_spec.md): its mask is
:func:`headwise.ops.attention.dropout.keep_mask` bit for bit, out, LSE and every gradient equal
autograd through that explicit mask, and it is deterministic for a seed, independent of the
thread count, exactly no dropout at p = 0, and keeps hidden keys hidden."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from headwise.ops.attention.dropout import keep_mask
from headwise.ops.attention.mods import relative_position_bias
from headwise.ops.attention.native import available, native_attention, tiles_forward
from headwise.ops.attention.problem import apply_score_mod, score_indices

pytestmark = pytest.mark.skipif(not available(), reason="native tile kernel not built")

SEED, PROB = 20261205, 0.3
# name: (pattern, q_len, kv_len, heads, kv_heads)
CASES = {
    "window_gqa": (P.sliding_window(5) | P.sinks(2), 37, 37, 4, 2),
    "per_head": (P.per_head([P.sliding_window(3), P.causal(), P.full()]), 29, 29, 3, 1),
    "neighborhood_2d": (P.neighborhood((6, 7), (3, 5)), 42, 42, 2, 2),
    "causal_rectangular": (P.causal(), 13, 21, 2, 1),
    "long_rows": (P.full(), 5, 1100, 2, 1),  # tiles of > 1024 keys, taken chunk by chunk
}


def _inputs(case, dim=8, dim_v=8, seed=0):
    pattern, q_len, kv_len, heads, kv_heads = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    return pattern, (
        torch.randn(2, q_len, heads, dim, generator=gen),
        torch.randn(2, kv_len, kv_heads, dim, generator=gen),
        torch.randn(2, kv_len, kv_heads, dim_v, generator=gen),
    )


def dropped_reference(q, k, v, pattern, scale, p, seed, score_mod=None):
    """``(out, lse)`` = ``((softmax(S) * Z / (1 - p)) @ V, logsumexp(S))`` with ``Z`` =
    ``keep_mask(seed, p, ...)`` and ``S`` masked by ``pattern``: the spec written out densely."""
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1:3]
    group = heads // kv_heads
    kh, vh = (t.transpose(1, 2).repeat_interleave(group, 1) for t in (k, v))
    scores = q.transpose(1, 2) @ kh.transpose(-1, -2) * scale
    if score_mod is not None:
        rows, keys = torch.arange(q_len), torch.arange(kv_len)
        indices = score_indices(batch, heads, rows, keys)
        scores = apply_score_mod(score_mod, scores, *indices)
    scores = scores.masked_fill(~pattern.dense_mask(q_len, kv_len)[None], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows that see no key: 0
    mask = keep_mask(seed, p, batch, heads, q_len, kv_len)
    out = (probs * mask / (1 - p)) @ vh
    return out.transpose(1, 2), lse


@pytest.mark.parametrize("case", CASES)
def test_kernel_mask_is_keep_mask(case):
    # v = one-hot rows: out[b, i, h, j] = P_ij Z_ij / (1 - p), which shows the mask directly
    pattern, (q, k, _) = _inputs(case)
    kv_len, kv_heads = k.shape[1:3]
    v = torch.eye(kv_len).view(1, kv_len, 1, kv_len).expand(2, -1, kv_heads, -1).contiguous()
    plain, lse = tiles_forward(q, k, v, pattern, 0.1)
    out, lse_dropped = tiles_forward(q, k, v, pattern, 0.1, dropout=(PROB, SEED))
    mask = keep_mask(SEED, PROB, 2, q.shape[2], q.shape[1], kv_len).transpose(1, 2)
    visible = pattern.dense_mask(q.shape[1], kv_len).transpose(0, 1)  # (Lq, H or 1, Lk)
    assert torch.equal(plain > 0, visible.expand_as(plain)), "P > 0 where visible"
    assert torch.equal(out > 0, (plain > 0) & mask), "kept where keep_mask keeps"
    torch.testing.assert_close(out, plain * mask / (1 - PROB), rtol=1e-6, atol=0)
    assert torch.equal(lse, lse_dropped), "the LSE is the undropped one"
    seen = plain > 0
    rate = (out > 0)[seen].float().mean().item()
    assert abs(rate - (1 - PROB)) < 5 * (PROB * (1 - PROB) / seen.sum().item()) ** 0.5


@pytest.mark.parametrize("case", CASES)
def test_out_lse_and_gradients_equal_autograd_through_the_explicit_mask(case):
    pattern, tensors = _inputs(case, dim=6, dim_v=5)
    score_mod = table = None
    if case == "neighborhood_2d":
        table = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(4)).requires_grad_()
        score_mod = relative_position_bias(pattern, table)
    leaves = [t.requires_grad_() for t in tensors] + ([table] if table is not None else [])
    out, lse = native_attention(
        *tensors, pattern, scale=0.4, score_mod=score_mod, dropout_p=PROB, seed=SEED
    )
    wide = [t.detach().double().requires_grad_() for t in leaves]
    wide_mod = None if table is None else relative_position_bias(pattern, wide[-1])
    expected = dropped_reference(*wide[:3], pattern, 0.4, PROB, SEED, wide_mod)
    gen = torch.Generator().manual_seed(9)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (out, lse)]
    finite = torch.isfinite(lse)
    cotangents[1] = cotangents[1].masked_fill(~finite, 0)  # rows without keys: no LSE gradient
    got = torch.autograd.grad((out, lse), leaves, cotangents)
    want = torch.autograd.grad(expected, wide, [c.double() for c in cotangents])
    torch.testing.assert_close(out.double(), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double()[finite], expected[1][finite], rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "d table"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_half_precision_dropout_is_the_float32_dropout_rounded():
    pattern, tensors = _inputs("window_gqa")
    half = [t.bfloat16() for t in tensors]
    out, _ = tiles_forward(*half, pattern, 0.3, dropout=(PROB, SEED))
    out32, _ = tiles_forward(*(t.float() for t in half), pattern, 0.3, dropout=(PROB, SEED))
    assert torch.equal(out.view(torch.int16), out32.bfloat16().view(torch.int16))


def test_seeds_threads_and_p_zero():
    pattern, tensors = _inputs("neighborhood_2d")
    leaves = [t.requires_grad_() for t in tensors]

    def run(threads=1, **options):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out, lse = native_attention(*leaves, pattern, **options)
            return out, lse, *torch.autograd.grad(out.square().sum() + lse.sum(), leaves)
        finally:
            torch.set_num_threads(previous)

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    once = run(dropout_p=0.2, seed=7)
    assert same(once, run(dropout_p=0.2, seed=7)), "deterministic for a seed"
    assert same(once, run(threads=2, dropout_p=0.2, seed=7)), "independent of the threads"
    assert not torch.equal(once[0], run(dropout_p=0.2, seed=8)[0]), "another seed, another mask"
    torch.manual_seed(3)
    drawn = run(dropout_p=0.2)
    torch.manual_seed(3)
    assert same(drawn, run(dropout_p=0.2)), "torch.manual_seed fixes the drawn seed"
    assert same(run(), run(dropout_p=0.0, seed=7)), "p = 0 is bit for bit no dropout"
    assert same(run(), run(dropout_p=0.0)), "p = 0 draws no seed"


def test_non_finite_hidden_keys_stay_hidden():
    # keys a row may not see carry inf/NaN in K (and -inf in the bias): every row that does not
    # see them gets exactly what it gets with finite values there, dropout or not
    pattern, (q, k, v) = _inputs("window_gqa")
    poisoned = k.clone()
    poisoned[0, 20, 1] = float("inf")
    poisoned[1, 3, 0] = float("nan")
    bias = torch.zeros(37, 37)
    bias[:, 30] = float("-inf")
    visible = pattern.dense_mask(37, 37)[0]
    for dropout in (None, (PROB, SEED)):
        clean, lse = tiles_forward(q, k, v, pattern, 0.3, bias=bias, dropout=dropout)
        out, lse_poisoned = tiles_forward(q, poisoned, v, pattern, 0.3, bias=bias, dropout=dropout)
        for b, key, kv in ((0, 20, 1), (1, 3, 0)):
            blind = ~visible[:, key]
            heads = [2 * kv, 2 * kv + 1]
            assert torch.equal(out[b, blind][:, heads], clean[b, blind][:, heads])
            assert torch.equal(lse_poisoned[b, heads][:, blind], lse[b, heads][:, blind])


def test_bad_dropout_arguments():
    pattern, (q, k, v) = _inputs("window_gqa")
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\); got 1.0"):
        tiles_forward(q, k, v, pattern, 0.3, dropout=(1.0, 3))
    with pytest.raises(TypeError, match="dropout must be None or a tuple"):
        tiles_forward(q, k, v, pattern, 0.3, dropout=0.1)
    with pytest.raises(TypeError, match="the dropout seed must be an int; got float"):
        tiles_forward(q, k, v, pattern, 0.3, dropout=(0.1, 3.0))
    with pytest.raises(ValueError, match=r"the dropout seed must be in \[0, 2\*\*64\)"):
        tiles_forward(q, k, v, pattern, 0.3, dropout=(0.1, -1))
    with pytest.raises(ValueError, match="dropout_p"):
        native_attention(q, k, v, pattern, dropout_p=-0.1)
