"""Key ranges (:meth:`Pattern._key_ranges`) against the predicate, and the block layouts and
densities built from them against the dense mask, on random compositions."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import headwise.patterns as P
from headwise.patterns.base import FULL, PARTIAL
from headwise.patterns.ranges import merge_ranges
from strategies import pattern_leaves


@st.composite
def ranged_problems(draw):
    """``(pattern, q_len, kv_len)``: compositions of leaves, per-head stacks, packed documents
    (empty ones too) intersected with a leaf, and modality-mutual segments."""
    leaf = pattern_leaves()
    kind = draw(st.sampled_from(["leaf", "and", "or", "per_head", "documents", "modality"]))
    q_len, kv_len = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    if draw(st.booleans()):
        kv_len = q_len
    if kind == "leaf":
        pattern = draw(leaf)
    elif kind == "and":
        pattern = draw(leaf) & draw(leaf) & draw(leaf)
    elif kind == "or":
        pattern = draw(leaf) | draw(leaf)
    elif kind == "per_head":
        pattern = P.per_head(draw(st.lists(leaf | st.tuples(leaf, leaf).map(lambda p: p[0] | p[1]),
                                           min_size=1, max_size=4)))  # fmt: skip
    elif kind == "documents":
        sizes = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=6)
        docs = draw(sizes.filter(lambda d: sum(a for a, _ in d) and sum(b for _, b in d)))
        q_lengths, kv_lengths = [a for a, _ in docs], [b for _, b in docs]
        q_len, kv_len = sum(q_lengths), sum(kv_lengths)
        pattern = P.documents(q_lengths, kv_lengths, causal=draw(st.booleans())) & draw(leaf)
    else:
        q_len = kv_len = max(q_len, 8)
        a, b, c = sorted(draw(st.lists(st.integers(0, q_len), min_size=3, max_size=3)))
        pattern = P.modality_mutual([((a, b), (b, c))])
    return pattern, q_len, kv_len


@settings(max_examples=80, deadline=None)
@given(ranged_problems())
def test_ranges_are_exactly_the_visible_keys(problem):
    pattern, q_len, kv_len = problem
    ranges = pattern._key_ranges(torch.arange(q_len), q_len, kv_len)
    if ranges is None:  # strided leaves have no ranges
        return
    lo, hi = ranges
    assert lo.dtype == hi.dtype == torch.long
    assert lo.min() >= 0 and hi.max() <= kv_len
    keys = torch.arange(kv_len)
    seen = ((keys >= lo[..., None]) & (keys < hi[..., None])).any(-2)
    mask = pattern.dense_mask(q_len, kv_len)
    assert torch.equal(seen.expand_as(mask), mask)


def dense_layout(mask: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    heads, q_len, kv_len = mask.shape
    block_q, block_k = min(block_q, q_len), min(block_k, kv_len)
    n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
    pad = (0, n_k * block_k - kv_len, 0, n_q * block_q - q_len)
    shape = (heads, n_q, block_q, n_k, block_k)
    touched = torch.nn.functional.pad(mask, pad, value=False).view(shape).any(2).any(-1)
    covered = torch.nn.functional.pad(mask, pad, value=True).view(shape).all(2).all(-1)
    layout = torch.zeros(heads, n_q, n_k, dtype=torch.uint8)
    layout[touched] = PARTIAL
    layout[touched & covered] = FULL
    return layout


@settings(max_examples=60, deadline=None)
@given(ranged_problems(), st.integers(1, 9), st.integers(1, 9))
def test_layout_and_density_from_ranges_match_the_dense_mask(problem, block_q, block_k):
    pattern, q_len, kv_len = problem
    mask = pattern.dense_mask(q_len, kv_len)
    layout = pattern.block_layout(q_len, kv_len, (block_q, block_k))
    assert torch.equal(layout, dense_layout(mask, block_q, block_k))
    assert pattern.density(q_len, kv_len) == int(mask.sum()) / mask.numel()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12), st.integers(0, 12)), max_size=30))
def test_merge_ranges_gives_the_union_of_each_group(ranges):
    group = torch.tensor([g for g, _, _ in ranges], dtype=torch.long)
    lo = torch.tensor([a for _, a, _ in ranges], dtype=torch.long)
    hi = torch.tensor([b for _, _, b in ranges], dtype=torch.long)
    owner, start, stop = merge_ranges(lo, hi, group, 13)
    for g in range(4):
        expected = set()
        for h, a, b in ranges:
            expected |= set(range(a, b)) if h == g else set()
        mine = [(int(s), int(e)) for o, s, e in zip(owner, start, stop) if o == g]
        assert sorted(mine) == mine, "runs come sorted"
        assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(mine)), "runs are disjoint"
        assert set().union(*(range(s, e) for s, e in mine)) == expected
    assert torch.equal(owner, owner.sort().values)
