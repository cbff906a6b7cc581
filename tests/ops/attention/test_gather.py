"""Gathered (per-query key list) attention against the reference with the equivalent mask."""

from __future__ import annotations

import pytest
import torch

from headwise.ops.attention import attention
from headwise.ops.attention.gather import gathered_attention


def random_index(batch, heads, q_len, kv_len, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, q_len, kv_len, generator=gen)
    return scores.topk(count, dim=-1).indices


def as_bias(index, valid, kv_len):
    mask = torch.zeros(*index.shape[:3], kv_len, dtype=torch.bool)
    mask.scatter_(-1, index, valid)
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("q_len,kv_len,count", [(1, 5, 3), (300, 97, 20), (37, 37, 37)])
def test_equals_reference_with_the_same_mask(kv_heads, q_len, kv_len, count):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, q_len, 4, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, kv_len, kv_heads, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, kv_len, kv_heads, 24, generator=gen, requires_grad=True)
    index = random_index(2, 4, q_len, kv_len, count)
    valid = torch.rand(index.shape, generator=gen) > 0.3
    valid[0, 0, 0] = False  # a row with no key at all
    out, lse = gathered_attention(q, k, v, index, valid=valid, return_lse=True)
    bias = as_bias(index, valid, kv_len)
    ref, ref_lse = attention(q, k, v, bias=bias, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out[0, 0, 0] == 0) and torch.isneginf(lse[0, 0, 0])
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum() + lse.nan_to_num(0, 0, 0).sum(), (q, k, v))
    want = torch.autograd.grad((ref * grad).sum() + ref_lse.nan_to_num(0, 0, 0).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_keys_not_listed_cannot_influence_the_output():
    q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))
    index = random_index(1, 2, 12, 12, 4)
    out = gathered_attention(q, k, v, index)
    listed = torch.zeros(1, 2, 12, dtype=torch.bool)
    for h in range(2):
        listed[0, h, index[0, h].unique()] = True
    k2, v2 = k.clone(), v.clone()
    hidden = ~listed[0].any(0)
    k2[:, hidden], v2[:, hidden] = 1e4, -1e4
    torch.testing.assert_close(gathered_attention(q, k2, v2, index), out, atol=0, rtol=0)


@pytest.mark.parametrize(
    "index,match",
    [
        (torch.zeros(1, 2, 5, 3, dtype=torch.long), r"index must be \(B, H, Lq, K\)"),
        (torch.full((1, 2, 6, 3), 9), r"\[0, Lk=6\)"),
        (torch.zeros(1, 2, 6, 3), "integer"),
    ],
)
def test_bad_index(index, match):
    x = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match=match):
        gathered_attention(x, x, x, index)
