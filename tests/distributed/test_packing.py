"""The Unpadded BERT balancing rule, the ahead-of-time sampler and the packing collate."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.distributed import BalancedBatchSampler, balance, collate_packed


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 512), min_size=1, max_size=40), st.integers(1, 8))
def test_balance_keeps_samples_and_bounds_imbalance(lengths, world):
    a = balance(lengths, world)
    dealt = sorted(i for r in a.ranks for i in r)
    assert dealt == sorted(i for i, n in enumerate(lengths) if n > 0)
    assert sorted(a.dropped) == [i for i, n in enumerate(lengths) if n == 0]
    assert a.imbalance <= a.bound == max(lengths)
    assert list(a.tokens) == sorted(a.tokens, reverse=True)
    counts = [len(r) for r in a.ranks]
    assert max(counts) - min(counts) <= 1
    for r in a.ranks:
        assert [lengths[i] for i in r] == sorted((lengths[i] for i in r), reverse=True)
    assert a.global_tokens == sum(lengths)
    assert balance(lengths, world) == a  # deterministic


def test_ties_keep_global_index_order():
    assert balance([5, 7, 5, 5, 7], 2).ranks == ((1, 0, 3), (4, 2))


def test_sampler_ranks_cover_each_global_batch_once():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (50,), generator=gen)
    samplers = [BalancedBatchSampler(lengths, 4, rank=r, world_size=3, seed=1) for r in range(3)]
    steps = [list(s) for s in samplers]
    assert len({len(s) for s in steps}) == 1 and len(steps[0]) == len(samplers[0]) == 5
    seen = []
    for step in range(len(steps[0])):
        shares = [steps[r][step] for r in range(3)]
        tokens = [int(lengths[s].sum()) for s in shares]
        step_ids = [i for share in shares for i in share]
        assert max(tokens) - min(tokens) <= int(lengths[step_ids].max())
        assert sum(tokens) == samplers[0].global_tokens(step)
        seen += step_ids
    assert sorted(seen) == list(range(50))
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != steps[0]


def test_collate_packs_without_padding():
    samples = [torch.arange(3.0), torch.arange(5.0), torch.arange(1.0)]
    batch = collate_packed(samples)
    assert batch.tokens.shape == (9,) and batch.cu_seqlens.tolist() == [0, 3, 8, 9]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.lengths == [3, 5, 1]
