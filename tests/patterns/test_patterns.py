"""Patterns: each predicate against its definition written out element by element, composition
against the logic of dense masks, block layouts and densities against the dense masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import headwise.patterns as P
from strategies import pattern_leaves


def brute(rule, heads, q_len, kv_len):
    return torch.tensor(
        [[[rule(h, i, j) for j in range(kv_len)] for i in range(q_len)] for h in range(heads)]
    )


def docs_rule(q_lengths, kv_lengths, causal):
    def where(lengths, idx):
        start = 0
        for d, n in enumerate(lengths):
            if idx < start + n:
                return d, idx - start, n
            start += n
        raise AssertionError

    def rule(h, i, j):
        dq, iq, nq = where(q_lengths, i)
        dk, jk, nk = where(kv_lengths, j)
        return dq == dk and (not causal or jk <= iq + (nk - nq))

    return rule


CASES = [
    (P.full(), lambda h, i, j, Lq, Lk: True),
    (P.causal(), lambda h, i, j, Lq, Lk: j <= i + Lk - Lq),
    (P.causal("top_left"), lambda h, i, j, Lq, Lk: j <= i),
    (P.sliding_window(3), lambda h, i, j, Lq, Lk: i + Lk - Lq - 3 <= j <= i + Lk - Lq),
    (P.sliding_window(2, 1), lambda h, i, j, Lq, Lk: -2 <= j - (i + Lk - Lq) <= 1),
    (P.sliding_window(None, 0, align="top_left"), lambda h, i, j, Lq, Lk: j <= i),
    (P.sinks(2), lambda h, i, j, Lq, Lk: j < 2 and j <= i + Lk - Lq),
    (P.sinks(2, causal=False), lambda h, i, j, Lq, Lk: j < 2),
    (P.strided(3, 1), lambda h, i, j, Lq, Lk: j % 3 == 1),
    (P.strided(2, 1, block=4), lambda h, i, j, Lq, Lk: (j // 4) % 2 == 1),
]


@pytest.mark.parametrize("pattern,rule", CASES, ids=lambda c: repr(c)[:40])
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (7, 7), (5, 9), (9, 5)])
def test_predicate_matches_definition(pattern, rule, q_len, kv_len):
    expected = brute(lambda h, i, j: rule(h, i, j, q_len, kv_len), 1, q_len, kv_len)
    assert torch.equal(pattern.dense_mask(q_len, kv_len), expected)


def test_documents_match_definition():
    lengths, kv_lengths = (3, 0, 1, 4), (2, 1, 3, 4)
    for causal in (False, True):
        pattern = P.documents(lengths, kv_lengths, causal=causal)
        expected = brute(docs_rule(lengths, kv_lengths, causal), 1, 8, 10)
        assert torch.equal(pattern.dense_mask(8, 10), expected)


def test_modality_mutual_follows_aki():
    # sequence: [text 0, image 1..3, question 4..5, assistant 6, answer 7..8]
    pattern = P.modality_mutual([((1, 4), (4, 6))])
    mask = pattern.dense_mask(9, 9)[0]
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    assert mask[1:4, 4:6].all(), "image tokens must see the question"
    assert not mask[1:4, 6:].any(), "image tokens must not see the assistant tag or the answer"
    assert torch.equal(mask[1:4, :4], causal[1:4, :4]), "image tokens stay causal among themselves"
    assert torch.equal(mask[4:], causal[4:]), "text rows are plain causal"
    assert torch.equal(mask[0], causal[0])
    assert torch.equal(P.modality_mutual([((1, 4), (4, 4))]).dense_mask(9, 9)[0], causal)


def test_block_sparse_matches_layout():
    layout = torch.tensor([[[1, 0, 1], [0, 1, 0]], [[0, 0, 1], [1, 1, 1]]], dtype=torch.bool)
    pattern = P.block_sparse(layout, (4, 3))
    expected = brute(lambda h, i, j: bool(layout[h, i // 4, j // 3]), 2, 7, 8)
    assert torch.equal(pattern.dense_mask(7, 8), expected)
    assert pattern.num_heads == 2


def test_per_head_stacks():
    pattern = P.per_head([P.causal(), P.sliding_window(1, 1), P.strided(2)])
    mask = pattern.dense_mask(6, 6)
    for h, p in enumerate([P.causal(), P.sliding_window(1, 1), P.strided(2)]):
        assert torch.equal(mask[h], p.dense_mask(6, 6)[0])
    mod = pattern.mask_mod(6, 6)
    for h in range(3):
        for i in range(6):
            for j in range(6):
                got = mod(torch.tensor(0), torch.tensor(h), torch.tensor(i), torch.tensor(j))
                assert bool(got) == bool(mask[h, i, j])


# ----------------------------------------------------------------- hypothesis: compositions
leaves = pattern_leaves()
Q_LEN, KV_LEN = 23, 31
# Each tree carries its expected mask, built from the leaves' masks while the tree is built, so
# the check never relies on how the composed pattern stores its structure.
leaf_cases = leaves.map(lambda p: (p, p.dense_mask(Q_LEN, KV_LEN)))
trees = st.recursive(
    leaf_cases,
    lambda sub: st.tuples(sub, sub, st.booleans()).map(
        lambda t: (
            (t[0][0] & t[1][0], t[0][1] & t[1][1])
            if t[2]
            else (t[0][0] | t[1][0], t[0][1] | t[1][1])
        )
    ),
    max_leaves=6,
)


@settings(max_examples=80, deadline=None)
@given(trees, st.integers(1, 9), st.integers(1, 9))
def test_compositions_layouts_and_density(case, block_q, block_k):
    pattern, expected = case
    mask = pattern.dense_mask(Q_LEN, KV_LEN)
    assert torch.equal(mask, expected)
    assert pattern.density(Q_LEN, KV_LEN) == pytest.approx(mask.float().mean().item())
    layout = pattern.block_layout(Q_LEN, KV_LEN, (block_q, block_k))
    n_q, n_k = layout.shape[1:]
    for r in range(n_q):
        for c in range(n_k):
            block = mask[:, r * block_q : (r + 1) * block_q, c * block_k : (c + 1) * block_k]
            code = P.FULL if block.all() else (P.PARTIAL if block.any() else P.EMPTY)
            assert int(layout[0, r, c]) == code


def test_union_inside_intersection_keeps_its_meaning():
    # (a | b) & c must not be flattened into a & b & c
    stripes, window, causal = P.strided(2, 0, block=16), P.sliding_window(20), P.causal()
    for pattern in ((stripes | window) & causal, causal & (stripes | window)):
        expected = (stripes.dense_mask(200, 200) | window.dense_mask(200, 200)) & causal.dense_mask(
            200, 200
        )
        assert torch.equal(pattern.dense_mask(200, 200), expected)


def test_flex_block_mask_agrees_with_dense():
    pattern = P.per_head([P.sliding_window(40), P.documents([100, 0, 30, 70], causal=True)])
    block_mask = pattern.block_mask(200, 200, block_size=32)
    dense = block_mask.to_dense()[0].bool()  # (H, nq, nk) visited blocks
    layout = pattern.block_layout(200, 200, 32)
    assert torch.equal(dense, layout != P.EMPTY)


def test_patterns_are_hashable_values():
    assert P.sliding_window(4) == P.sliding_window(4)
    assert hash(P.documents([1, 2])) == hash(P.documents((1, 2)))
    assert len({P.causal(), P.causal(), P.full()}) == 2


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: P.sliding_window(-1), "left"),
        (lambda: P.causal("middle"), "align"),
        (lambda: P.strided(0), "stride"),
        (lambda: P.strided(3, 3), "offset"),
        (lambda: P.documents([2, -1]), "lengths"),
        (lambda: P.documents([1, 2], [3]), "kv_lengths"),
        (lambda: P.block_sparse(torch.ones(2, 2, 2, 2)), "layout"),
        (lambda: P.per_head([]), "at least one"),
        (lambda: P.per_head([P.causal()]) & P.per_head([P.causal()] * 2), "head counts"),
        (lambda: P.modality_mutual([((3, 1), (4, 5))]), "start <= stop"),
    ],
)
def test_bad_construction_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "pattern,q_len,kv_len,match",
    [
        (P.documents([3, 4]), 8, 8, "covers 7 queries"),
        (P.block_sparse(torch.ones(2, 2), 4), 12, 8, "need"),
        (P.modality_mutual([((0, 2), (2, 9))]), 8, 8, "reach position 9"),
    ],
)
def test_pattern_for_other_lengths_raises(pattern, q_len, kv_len, match):
    with pytest.raises(ValueError, match=match):
        pattern.dense_mask(q_len, kv_len)


def test_full_and_plain_causal_say_so_and_nothing_else_does():
    # what a backend serving dense or plain causal attention natively asks (structural: how the
    # pattern was built, whatever the lengths)
    assert P.full().is_full and P.full().causal_align is None
    for align in ("bottom_right", "top_left"):
        assert P.causal(align).causal_align == align and not P.causal(align).is_full
    for other in (
        P.sliding_window(None, None),
        P.causal() & P.full(),
        P.causal() | P.sinks(2),
        P.per_head([P.causal(), P.causal()]),
    ):
        assert not other.is_full and other.causal_align is None
