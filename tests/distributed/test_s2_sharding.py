"""S2 head placement: kept KV blocks come from the block layout, placement groups heads that
share blocks, and each rank's compacted attention equals the full one for its heads."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise import patterns as P
from headwise.distributed import place_heads, s2_attention

L, BLOCK = 200, 16


def _s2_pattern(heads, group, stride=2, window=20):
    return P.per_head(
        [
            (P.strided(stride, (h // group) % stride, block=BLOCK) & P.causal())
            | P.sliding_window(window)
            for h in range(heads)
        ]
    )


def test_placement_groups_shared_stripes_and_saves_kv():
    pattern = _s2_pattern(8, 2)
    placement = place_heads(pattern, L, 2, num_heads=8, num_kv_heads=4, block=BLOCK)
    assert placement.kv_heads == ((0, 2), (1, 3))
    assert placement.heads == ((0, 1, 4, 5), (2, 3, 6, 7))
    n_blocks = -(-L // BLOCK)
    for rank in range(2):
        assert len(placement.kv_blocks[rank]) < len(placement.contiguous_kv_blocks[rank])
        assert placement.kv_tokens(rank) < L
        assert len(placement.contiguous_kv_blocks[rank]) == n_blocks
    report = placement.report(batch=1, head_dim=64)
    assert "61,440" in report and "102,400" in report


@pytest.mark.parametrize("world", [1, 2, 4])
def test_compacted_heads_equal_full_attention(world):
    heads, kv_heads = 8, 4
    pattern = _s2_pattern(heads, heads // kv_heads, stride=4)
    placement = place_heads(pattern, L, world, num_heads=heads, num_kv_heads=kv_heads, block=BLOCK)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, L, heads, 16, generator=gen)
    k, v = (torch.randn(1, L, kv_heads, 16, generator=gen) for _ in range(2))
    ref = headwise.attention(q, k, v, pattern, backend="reference")[:, -5:]
    for rank in range(world):
        out = s2_attention(
            placement.local_q(q[:, -5:], rank),
            placement.local_kv(k, rank),
            placement.local_kv(v, rank),
            pattern,
            placement,
            rank=rank,
        )
        assert torch.allclose(out, ref[:, :, list(placement.heads[rank])], atol=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="H_kv=3 on 2 ranks"):
        place_heads(P.causal(), L, 2, num_heads=6, num_kv_heads=3, block=BLOCK)
    placement = place_heads(P.causal(), L, 2, num_heads=4, block=BLOCK)
    q = torch.randn(1, 20, 2, 8)
    k = placement.local_kv(torch.randn(1, L, 4, 8), 0)
    with pytest.raises(ValueError, match="Lq=20"):
        s2_attention(q, k, k, P.causal(), placement, rank=0)
