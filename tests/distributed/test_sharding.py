"""Single-process checks of the sharding layouts, the padding rule, the LSE merge and the
shard-local pattern (no process group needed)."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise import patterns as P
from headwise.distributed import (
    padded_length,
    ring_attention,
    shard_positions,
    shard_sequence,
)
from headwise.distributed.sharding import AtPositions, shard_runs
from headwise.ops.attention import merge_partials


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_layouts_partition_the_padded_sequence(world, layout):
    seq_len = 37
    total = padded_length(seq_len, world, layout)
    assert total >= seq_len and total % (2 * world if layout == "zigzag" else world) == 0
    positions = torch.cat([shard_positions(seq_len, world, r, layout) for r in range(world)])
    assert sorted(positions.tolist()) == list(range(total))


def test_zigzag_balances_causal_work():
    seq_len, world = 64, 4
    work = []
    for rank in range(world):
        q = shard_positions(seq_len, world, rank)
        work.append(int((q[:, None] >= torch.arange(seq_len)).sum()))
    assert len(set(work)) == 1
    contiguous = [
        int((shard_positions(seq_len, world, r, "contiguous")[:, None] >= torch.arange(64)).sum())
        for r in range(world)
    ]
    assert contiguous[-1] > 3 * contiguous[0]


def test_merge_handles_empty_rows_on_both_sides():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=gen) for _ in range(3))
    # Keys 0..2 in part a, 3..5 in part b; a window makes some rows empty on one side.
    pattern = P.sliding_window(1, align="top_left")
    ref_out, ref_lse = headwise.attention(q, k, v, pattern, return_lse=True, backend="reference")
    halves = []
    for start in (0, 3):
        local = AtPositions(pattern, 6, ((0, 6),), ((start, 3),))
        halves.append(
            headwise.attention(
                q, k[:, start : start + 3], v[:, start : start + 3], local, return_lse=True
            )
        )
    out, lse = merge_partials(*halves[0], *halves[1])
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)
    empty = torch.full_like(lse, float("-inf"))
    both_empty, lse_empty = merge_partials(
        torch.zeros_like(out), empty, torch.zeros_like(out), empty
    )
    assert not both_empty.isnan().any() and (both_empty == 0).all() and lse_empty.isinf().all()


def test_padded_positions_are_never_visible():
    runs = shard_runs(5, 2, 1)  # zigzag: chunks 1 and 2 of 4 -> positions 2, 3, 4, 5(pad)
    local = AtPositions(P.full(), 5, runs, runs)
    mask = local.dense_mask(4, 4)[0]
    assert mask[:3, :3].all() and not mask[3].any() and not mask[:, 3].any()


def test_ring_on_one_process_is_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=gen) for _ in range(3))
    ref = headwise.attention(q, k, v, P.causal())
    out = ring_attention(q, k, v, P.causal(), layout="contiguous")
    assert torch.allclose(out, ref, atol=1e-6)
    # zig-zag cuts 2 chunks even on one rank, so 9 tokens are padded to 10
    padded = ring_attention(*(shard_sequence(t) for t in (q, k, v)), P.causal(), seq_len=9)
    assert torch.allclose(padded[:, :9], ref, atol=1e-6) and (padded[:, 9] == 0).all()


def test_ring_rejects_wrong_shard_length():
    q = torch.randn(1, 9, 2, 8)
    with pytest.raises(ValueError, match="L_local=9"):
        ring_attention(q, q, q, seq_len=7)
