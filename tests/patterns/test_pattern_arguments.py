"""Pattern arguments: huge integers give the mathematically right mask on every view, arguments of
the wrong type are refused with an error naming them, and patterns print as the expression a user
would write."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_neighborhood import brute_mask

import headwise
import headwise.patterns as P
from strategies import pattern_leaves

# Small values, values around the int32 and int64 limits, and values no int64 can hold.
HUGE = st.one_of(
    st.integers(0, 14),
    st.integers(2**31 - 2, 2**31 + 2),
    st.integers(2**62, 2**64 + 2),
    st.just(sys.maxsize),
    st.integers(2**64, 2**80),
)
ALIGN = st.sampled_from(["bottom_right", "top_left"])
LENGTH = st.integers(1, 12)


def brute(rule, heads, q_len, kv_len):
    return torch.tensor(
        [[[rule(h, i, j) for j in range(kv_len)] for i in range(q_len)] for h in range(heads)],
        dtype=torch.bool,
    ).view(heads, q_len, kv_len)


def position(i, q_len, kv_len, align):
    return i + (kv_len - q_len if align == "bottom_right" else 0)


def assert_views(pattern, expected, q_len, kv_len, block=(3, 4)):
    """Every view of ``pattern`` agrees with the dense ``expected`` mask ``(H, Lq, Lk)``."""
    heads = expected.shape[0]
    assert torch.equal(pattern.dense_mask(q_len, kv_len), expected)
    mod = pattern.mask_mod(q_len, kv_len)
    got = mod(
        torch.tensor(0),
        torch.arange(heads).view(-1, 1, 1),
        torch.arange(q_len).view(1, -1, 1),
        torch.arange(kv_len).view(1, 1, -1),
    )
    assert torch.equal(got.expand(heads, q_len, kv_len), expected)
    assert pattern.density(q_len, kv_len) == pytest.approx(expected.float().mean().item())
    layout = pattern.block_layout(q_len, kv_len, block)
    for r in range(layout.shape[1]):
        for c in range(layout.shape[2]):
            tile = expected[:, r * block[0] : (r + 1) * block[0], c * block[1] : (c + 1) * block[1]]
            codes = [P.FULL if t.all() else P.PARTIAL if t.any() else P.EMPTY for t in tile]
            assert layout[:, r, c].tolist() == codes


# ----------------------------------------------------------------- item 4: huge integers
def test_issue_examples_of_huge_integers():
    assert int(P.sliding_window(sys.maxsize, sys.maxsize).dense_mask(12, 12).sum()) == 144
    assert P.sinks(2**63, causal=False).dense_mask(5, 5).all()
    assert torch.equal(P.sinks(2**63).dense_mask(6, 6), P.causal().dense_mask(6, 6))
    assert torch.equal(P.sliding_window(2**70).dense_mask(6, 6), P.causal().dense_mask(6, 6))


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.none(), HUGE), st.one_of(st.none(), HUGE), ALIGN, LENGTH, LENGTH)
def test_sliding_window_huge(left, right, align, q_len, kv_len):
    def rule(h, i, j):
        p = position(i, q_len, kv_len, align)
        return (left is None or j >= p - left) and (right is None or j <= p + right)

    pattern = P.sliding_window(left, right, align=align)
    assert_views(pattern, brute(rule, 1, q_len, kv_len), q_len, kv_len)


@settings(max_examples=60, deadline=None)
@given(HUGE, st.booleans(), ALIGN, LENGTH, LENGTH)
def test_sinks_huge(n, causal, align, q_len, kv_len):
    def rule(h, i, j):
        return j < n and (not causal or j <= position(i, q_len, kv_len, align))

    pattern = P.sinks(n, causal=causal, align=align)
    assert_views(pattern, brute(rule, 1, q_len, kv_len), q_len, kv_len)


@settings(max_examples=60, deadline=None)
@given(HUGE.map(lambda s: s + 1), HUGE, HUGE.map(lambda b: b + 1), LENGTH, LENGTH)
def test_strided_huge(stride, offset, block, q_len, kv_len):
    offset %= stride

    def rule(h, i, j):
        return (j // block) % stride == offset

    pattern = P.strided(stride, offset, block=block)
    assert_views(pattern, brute(rule, 1, q_len, kv_len), q_len, kv_len)


@settings(max_examples=40, deadline=None)
@given(
    HUGE.map(lambda b: b + 1),
    HUGE.map(lambda b: b + 1),
    LENGTH,
    LENGTH,
    st.integers(1, 3),
    st.randoms(use_true_random=False),
)
def test_block_sparse_huge_blocks(block_q, block_k, q_len, kv_len, heads, rng):
    n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
    layout = torch.tensor([rng.random() < 0.5 for _ in range(heads * n_q * n_k)])
    layout = layout.view(heads, n_q, n_k)
    pattern = P.block_sparse(layout, (block_q, block_k))

    def rule(h, i, j):
        return bool(layout[h, i // block_q, j // block_k])

    assert_views(pattern, brute(rule, heads, q_len, kv_len), q_len, kv_len)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(HUGE, HUGE, st.booleans()), min_size=1, max_size=3), LENGTH, LENGTH)
def test_per_head_of_huge_leaves(params, q_len, kv_len):
    leaves = [
        P.sliding_window(a, b) if window else P.sinks(a) | P.strided(b + 1)
        for a, b, window in params
    ]

    def rule(h, i, j):
        a, b, window = params[h]
        p = position(i, q_len, kv_len, "bottom_right")
        if window:
            return p - a <= j <= p + b
        return (j < a and j <= p) or j % (b + 1) == 0

    assert_views(P.per_head(leaves), brute(rule, len(leaves), q_len, kv_len), q_len, kv_len)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 6), HUGE.map(lambda k: k + 1), HUGE.map(lambda d: d + 1)),
        min_size=1,
        max_size=2,
    ),
    st.data(),
)
def test_neighborhood_huge(axes, data):
    grid = tuple(n for n, _, _ in axes)
    kernel = tuple(k for _, k, _ in axes)
    dilation = tuple(d for _, _, d in axes)
    stride = tuple(data.draw(st.one_of(st.integers(1, k), st.just(k))) for k in kernel)
    causal = tuple(data.draw(st.booleans()) for _ in grid)
    pattern = P.neighborhood(grid, kernel, dilation, causal, stride=stride)
    size = pattern.size
    expected = brute_mask(grid, kernel, dilation, stride, causal)[None]
    assert_views(pattern, expected, size, size)


@settings(max_examples=30, deadline=None)
@given(HUGE, HUGE, LENGTH)
def test_huge_documents_and_segments_are_refused_by_length(a, b, length):
    # Their entries must add up to (or fit in) the sequence, so a huge entry is a length mismatch
    # reported as ValueError, never an overflow.
    if a + b != length:
        with pytest.raises(ValueError, match="documents pattern covers"):
            P.documents([a, b]).dense_mask(length, length)
    stop = a + b
    if stop > length:
        with pytest.raises(ValueError, match="reach position"):
            P.modality_mutual([((a, stop), (stop, stop))]).dense_mask(length, length)


def test_huge_block_size_argument_of_the_views():
    pattern = P.sliding_window(2) | P.sinks(1)
    for block in (2**70, sys.maxsize, (2**64, 3)):
        block_q, block_k = (block, block) if isinstance(block, int) else block
        small = (min(block_q, 12), min(block_k, 12))
        assert torch.equal(pattern.block_layout(12, 12, block), pattern.block_layout(12, 12, small))
    bm = pattern.block_mask(12, 12, block_size=2**40)
    assert bm.to_dense().shape[-2:] == (1, 1)


def test_huge_values_reach_the_backends():
    q = torch.randn(1, 12, 2, 8)
    for pattern in (P.sliding_window(sys.maxsize, sys.maxsize), P.sinks(2**63, causal=False)):
        out = headwise.attention(q, q, q, pattern)
        assert torch.allclose(out, headwise.attention(q, q, q, None), atol=1e-5)


# ----------------------------------------------------------------- item 12: argument types
BAD = [
    (lambda: P.documents([2.5, 1.5]), "lengths"),
    (lambda: P.documents(torch.tensor([2.5, 1.5])), "lengths"),
    (lambda: P.documents([True, 2]), "lengths"),
    (lambda: P.documents([2, 2], [1.0, 3.0]), "kv_lengths"),
    (lambda: P.documents("12"), "lengths"),
    (lambda: P.documents(3), "lengths"),
    (lambda: P.documents([3], causal="no"), "causal"),
    (lambda: P.documents([3], causal=1), "causal"),
    (lambda: P.strided(2, 0.5), "offset"),
    (lambda: P.strided(2.0), "stride"),
    (lambda: P.strided(True), "stride"),
    (lambda: P.strided(2, block=1.5), "block"),
    (lambda: P.strided(2, -1), "offset"),
    (lambda: P.modality_mutual([((1.5, 4), (4, 6))]), "segments"),
    (lambda: P.modality_mutual([((1, 4), (4, 6.9))]), "segments"),
    (lambda: P.modality_mutual([((True, 4), (4, 6))]), "segments"),
    (lambda: P.modality_mutual([((-1, 4), (4, 6))]), "segments"),
    (lambda: P.neighborhood(True, 1), "grid"),
    (lambda: P.neighborhood((5, 5.0), 3), "grid"),
    (lambda: P.neighborhood(5, 3.0), "kernel_size"),
    (lambda: P.neighborhood(5, True), "kernel_size"),
    (lambda: P.neighborhood(5, 3, 1.0), "dilation"),
    (lambda: P.neighborhood(5, 3, stride=1.0), "stride"),
    (lambda: P.neighborhood(5, 3, causal="no"), "causal"),
    (lambda: P.neighborhood((5, 5), 3, causal=(True, 0)), "causal"),
    (lambda: P.neighborhood("5", 3), "grid"),
    (lambda: P.sliding_window(2.5), "left"),
    (lambda: P.sliding_window(True), "left"),
    (lambda: P.sliding_window(3, 1.0), "right"),
    (lambda: P.sliding_window(3, align="middle"), "align"),
    (lambda: P.sliding_window(3, align=None), "align"),
    (lambda: P.sinks(2.0), "n"),
    (lambda: P.sinks(False), "n"),
    (lambda: P.sinks(2, causal="no"), "causal"),
    (lambda: P.sinks(2, causal=None), "causal"),
    (lambda: P.sinks(2, align=0), "align"),
    (lambda: P.causal(align=["top_left"]), "align"),
    (lambda: P.block_sparse(torch.ones(2, 2), 2.5), "block_size"),
    (lambda: P.block_sparse(torch.ones(2, 2), True), "block_size"),
    (lambda: P.block_sparse(torch.ones(2, 2), (4, 4.0)), "block_size"),
    (lambda: P.block_sparse(torch.ones(2, 2), (4, 4, 4)), "block_size"),
    (lambda: P.block_sparse(torch.full((2, 2), 0.5)), "layout"),
    (lambda: P.block_sparse(torch.tensor([[2, 0], [0, 1]])), "layout"),
    (lambda: P.block_sparse("1010"), "layout"),
    (lambda: P.per_head(P.causal()), "patterns"),
    (lambda: P.per_head([P.causal(), "causal"]), "patterns"),
    (lambda: P.causal().dense_mask(4.0, 4), "q_len"),
    (lambda: P.causal().dense_mask(4, True), "kv_len"),
    (lambda: P.causal().dense_mask(-1, 4), "q_len"),
    (lambda: P.causal().block_layout(4, 4, 2.0), "block_size"),
    (lambda: P.causal().block_layout(4, 4, (2, 0)), "block_size"),
    (lambda: P.causal().density(4, "4"), "kv_len"),
]


@pytest.mark.parametrize("make,name", BAD)
def test_bad_argument_is_refused_naming_it(make, name):
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b") as info:
        make()
    assert not isinstance(info.value, (OverflowError, AttributeError, IndexError))


def test_numpy_and_tensor_integers_are_accepted_as_ints():
    np = pytest.importorskip("numpy")
    assert P.sliding_window(np.int64(3)) == P.sliding_window(3)
    assert P.documents(torch.tensor([3, 5])) == P.documents([3, 5])
    assert P.documents(np.array([3, 5])) == P.documents([3, 5])
    assert P.block_sparse(torch.ones(2, 2, dtype=torch.int64), (np.int32(4), 4)) == P.block_sparse(
        torch.ones(2, 2, dtype=torch.bool), 4
    )
    assert P.block_sparse(torch.eye(2)) == P.block_sparse(torch.eye(2, dtype=torch.bool))
    assert repr(P.sliding_window(np.int64(3))) == "sliding_window(3)"


# ----------------------------------------------------------------- item 19: reprs
REPRS = [
    (P.full(), "full()"),
    (P.causal(), "causal()"),
    (P.causal("top_left"), "causal(align='top_left')"),
    (P.sliding_window(64), "sliding_window(64)"),
    (P.sliding_window(2, 1), "sliding_window(2, 1)"),
    (
        P.sliding_window(None, None, align="top_left"),
        "sliding_window(None, None, align='top_left')",
    ),
    (P.sinks(4), "sinks(4)"),
    (P.sinks(4, causal=False), "sinks(4, causal=False)"),
    (P.strided(8, 7), "strided(8, 7)"),
    (P.strided(2, block=16), "strided(2, block=16)"),
    (P.documents([3, 5], causal=True), "documents([3, 5], causal=True)"),
    (P.documents([3, 5], [2, 6]), "documents([3, 5], [2, 6])"),
    (P.modality_mutual([((1, 4), (4, 6))]), "modality_mutual([((1, 4), (4, 6))])"),
    (P.block_sparse(torch.eye(2, dtype=torch.bool), 64), "block_sparse([[1, 0], [0, 1]], 64)"),
    (P.block_sparse(torch.ones(2, 1, 2), (4, 3)), "block_sparse([[[1, 1]], [[1, 1]]], (4, 3))"),
    (P.neighborhood((5, 5), 3), "neighborhood((5, 5), 3)"),
    (
        P.neighborhood(9, 3, 2, True, stride=2),
        "neighborhood(9, 3, dilation=2, causal=True, stride=2)",
    ),
    (
        P.neighborhood((5, 6), (3, 5), causal=(True, False)),
        "neighborhood((5, 6), (3, 5), causal=(True, False))",
    ),
    (P.sliding_window(64) | P.sinks(4), "sliding_window(64) | sinks(4)"),
    (P.sliding_window(64) & P.causal(), "sliding_window(64) & causal()"),
    (
        (P.strided(2, block=16) | P.sliding_window(20)) & P.causal(),
        "(strided(2, block=16) | sliding_window(20)) & causal()",
    ),
    (P.strided(2) & P.causal() | P.sinks(1), "strided(2) & causal() | sinks(1)"),
    (P.per_head([P.causal(), P.full()]), "per_head([causal(), full()])"),
]


@pytest.mark.parametrize("pattern,text", REPRS, ids=[t for _, t in REPRS])
def test_repr_is_the_expression(pattern, text):
    assert repr(pattern) == text
    assert str(pattern) == text
    assert eval(text, vars(P)) == pattern


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        pattern_leaves(),
        lambda sub: st.tuples(sub, sub, st.booleans()).map(
            lambda t: t[0] & t[1] if t[2] else t[0] | t[1]
        ),
        max_leaves=5,
    )
)
def test_repr_round_trips(pattern):
    text = repr(pattern)
    assert "_" not in text.replace("sliding_window", "").replace("bottom_right", "").replace(
        "top_left", ""
    )
    assert eval(text, vars(P)) == pattern


def test_large_block_sparse_repr_is_one_short_line():
    text = repr(P.block_sparse(torch.ones(2, 40, 40), 16))
    assert text == "block_sparse(<layout of shape (2, 40, 40), 3200 of 3200 blocks visible>, 16)"


def test_errors_name_patterns_as_expressions():
    with pytest.raises(ValueError) as info:
        P.per_head([P.causal() | P.per_head([P.full(), P.full()])])
    assert "per_head([full(), full()])" in str(info.value)
    with pytest.raises(ValueError) as info:
        P.per_head([P.causal()]) & P.per_head([P.full(), P.causal()])
    assert "per_head([full(), causal()])" in str(info.value)
    assert "_Union" not in str(info.value) and "_Intersection" not in str(info.value)


def test_explain_names_the_pattern_as_an_expression():
    q = torch.randn(1, 8, 2, 4)
    text = str(headwise.explain(q, q, q, P.sliding_window(4) | P.sinks(2)))
    assert "sliding_window(4) | sinks(2)" in text
    assert "_Union" not in text
