"""Unpadded batches: pack/unpack, packed == padded on real tokens, cu_seqlens checks."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from headwise.ops.attention import attention, attention_varlen, pack, unpack


def padded_batch(lengths, max_len, heads=4, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max_len, heads, dim, generator=gen)
    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def test_pack_unpack_roundtrip():
    x, mask = padded_batch([3, 1, 5, 0], 6)
    packed = pack(x, mask)
    assert packed.cu_seqlens.tolist() == [0, 3, 4, 9, 9]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.tokens.shape == (9, 4, 16) and packed.max_seqlen == 5
    back = unpack(packed.tokens, packed)
    assert torch.equal(back[mask], x[mask])
    assert torch.all(back[~mask] == 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["blockwise", "reference"])
def test_packed_equals_padded_on_real_tokens(causal, backend):
    lengths = [5, 1, 9, 0, 3]
    max_len = 9
    q, mask = padded_batch(lengths, max_len, seed=1)
    k, _ = padded_batch(lengths, max_len, seed=2)
    v, _ = padded_batch(lengths, max_len, seed=3)
    for t in (q, k, v):
        t.requires_grad_()
    # padded: key-padding bias; right-padded sequences so causal top-left is per-sequence causal
    bias = torch.zeros(len(lengths), 1, 1, max_len).masked_fill(~mask[:, None, None], float("-inf"))
    pattern = P.causal("top_left") if causal else None
    padded = attention(q, k, v, pattern, bias=bias, backend=backend)
    pq, pk, pv = (pack(t, mask).tokens for t in (q, k, v))
    cu = pack(q, mask).cu_seqlens
    packed = attention_varlen(pq, pk, pv, cu, causal=causal, backend=backend)
    torch.testing.assert_close(packed, padded[mask], atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(packed)
    g_packed = torch.autograd.grad(packed, (q, k, v), grad)
    g_padded = torch.autograd.grad(padded[mask], (q, k, v), grad)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)


def test_varlen_cross_lengths_and_lse():
    q = torch.randn(6, 2, 8)
    k = torch.randn(9, 2, 8)
    cu_q = torch.tensor([0, 2, 2, 6])
    cu_k = torch.tensor([0, 4, 5, 9])
    out, lse = attention_varlen(q, k, k, cu_q, cu_k, causal=True, return_lse=True)
    # sequence 0: 2 queries over 4 keys, bottom-right causal; checked one row by hand
    scores = torch.einsum("hd,khd->hk", q[1], k[:4]) * 8**-0.5
    expected = torch.einsum("hk,khd->hd", scores.softmax(-1), k[:4])
    torch.testing.assert_close(out[1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, 1], scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    assert lse.shape == (2, 6)


@pytest.mark.parametrize(
    "cu,match",
    [
        (torch.tensor([1, 3, 6]), "start at 0"),
        (torch.tensor([0, 4, 3, 6]), "non-decreasing"),
        (torch.tensor([0, 3, 7]), "end at T=6"),
        (torch.tensor([[0, 6]]), "1-D"),
        (torch.tensor([0.0, 6.0]), "int32 or int64"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    x = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match=match):
        attention_varlen(x, x, x, cu)


def test_varlen_rejects_padded_layout():
    x = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match=r"packed \(T, H, D\)"):
        attention_varlen(x, x, x, torch.tensor([0, 6]))
