"""Neighborhood attention: the window rule against a brute-force oracle written from NATTEN's
definition, its properties, the learnable relative positional bias, and the modules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import headwise.patterns as P
from headwise.layers.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from headwise.ops.attention import attention, neighborhood_attention


def axis_keys(i, length, k, d, s, causal):
    """In-axis key positions of query ``i``, spelled out with Python integers."""
    g, ip = i % d, i // d
    group_len = len(range(g, length, d))
    if causal:
        leader = min((ip // s) * s + s - 1, group_len - 1)
        window = range(max(leader - k + 1, 0), ip + 1)
    elif group_len < k:
        window = range(group_len)
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = min((ip // s) * s + s // 2, group_len - 1)
        center = min(max(leader, left), group_len - 1 - right)
        window = range(center - left, center + right + 1)
    return {j * d + g for j in window}


def brute_mask(grid, k, d, s, causal):
    coords = list(itertools.product(*(range(n) for n in grid)))
    mask = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for a, qc in enumerate(coords):
        allowed = [axis_keys(qc[x], grid[x], k[x], d[x], s[x], causal[x]) for x in range(len(grid))]
        for b, kc in enumerate(coords):
            mask[a, b] = all(kc[x] in allowed[x] for x in range(len(grid)))
    return mask


CASES = [
    ((13,), (5,), (1,), (1,), (False,)),
    ((13,), (4,), (2,), (1,), (False,)),  # even kernel, dilation not dividing L
    ((13,), (5,), (3,), (2,), (False,)),  # stride
    ((10,), (3,), (2,), (1,), (True,)),
    ((11,), (4,), (1,), (3,), (True,)),
    ((7, 9), (3, 5), (1, 1), (1, 1), (False, False)),
    ((7, 9), (3, 4), (2, 1), (1, 2), (False, False)),
    ((7, 9), (3, 3), (1, 2), (1, 1), (True, False)),  # causal in one axis only
    ((6, 8), (2, 3), (1, 1), (2, 3), (False, True)),
    ((4, 5, 6), (3, 3, 3), (1, 1, 2), (1, 1, 1), (True, False, False)),
    ((4, 5, 6), (2, 3, 3), (1, 1, 1), (2, 1, 3), (False, False, False)),
    ((3, 4), (5, 7), (1, 1), (1, 1), (False, False)),  # grid smaller than the kernel
]


@pytest.mark.parametrize("grid,k,d,s,causal", CASES)
def test_window_rule_matches_definition(grid, k, d, s, causal):
    pattern = P.neighborhood(grid, k, d, causal, stride=s)
    expected = brute_mask(grid, k, d, s, causal)
    assert torch.equal(pattern.dense_mask(math.prod(grid), math.prod(grid))[0], expected)


def test_matches_natten_when_installed():
    natten = pytest.importorskip("natten")
    functions = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}
    for grid, k, d, s, causal in CASES:
        if any(kx * dx > n for kx, dx, n in zip(k, d, grid)):
            continue  # NATTEN rejects windows larger than the grid
        q, key, v = (torch.randn(1, *grid, 2, 8) for _ in range(3))
        expected = functions[len(grid)](
            q, key, v, kernel_size=k, dilation=d, stride=s, is_causal=causal
        )
        got = neighborhood_attention(q, key, v, k, dilation=d, stride=s, causal=causal)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "grid,k,d", [((17,), (5,), (3,)), ((9, 11), (3, 4), (2, 2)), ((5, 6, 7), (3, 2, 3), (1, 2, 2))]
)
def test_every_query_sees_exactly_the_kernel(grid, k, d):
    mask = P.neighborhood(grid, k, d).dense_mask(math.prod(grid), math.prod(grid))[0]
    assert torch.all(mask.sum(-1) == math.prod(k))


def test_corner_window_shifts_inwards():
    mask = P.neighborhood((6, 6), 3).dense_mask(36, 36)[0].view(6, 6, 6, 6)
    corner = mask[0, 0]
    assert corner[:3, :3].all() and corner.sum() == 9, "corner sees rows/cols 0..2"
    edge = mask[5, 2]
    assert edge[3:, 1:4].all() and edge.sum() == 9, "bottom edge window shifted up"


def test_special_cases():
    n = 10
    assert torch.equal(P.neighborhood(n, n).dense_mask(n, n), P.full().dense_mask(n, n))
    assert torch.equal(
        P.neighborhood(n, n + 3, causal=True).dense_mask(n, n), P.causal().dense_mask(n, n)
    )
    blocked = P.neighborhood(12, 4, stride=4).dense_mask(12, 12)
    assert torch.equal(blocked, P.documents([4, 4, 4]).dense_mask(12, 12))


# ----------------------------------------------------------------- relative positional bias
def explicit_rpb_bias(table, grid, k, d):
    """(H, L, L) bias: table[h, (j - i) / d + k - 1 per axis], from Python loops."""
    coords = list(itertools.product(*(range(n) for n in grid)))
    index = [[], *([] for _ in grid)]
    for qc in coords:
        for kc in coords:
            for axis in range(len(grid)):
                offset = (kc[axis] - qc[axis]) // d[axis] + k[axis] - 1
                index[axis + 1].append(min(max(offset, 0), 2 * k[axis] - 2))
    heads = table.shape[0]
    flat = [torch.tensor(ix).repeat(heads, 1) for ix in index[1:]]
    h = torch.arange(heads)[:, None].expand_as(flat[0])
    n = len(coords)
    return table[(h, *flat)].view(heads, n, n)


@pytest.mark.parametrize(
    "grid,k,d,causal",
    [
        ((9,), (5,), (1,), (False,)),
        ((6, 7), (3, 3), (2, 1), (False, False)),
        ((5, 6), (3, 2), (1, 1), (True, False)),
    ],
)
@pytest.mark.parametrize("backend", ["blockwise", "native", "reference"])
def test_rpb_forward_and_gradient_against_explicit_bias(grid, k, d, causal, backend):
    heads, dim = 2, 8
    q, key, v = (torch.randn(1, *grid, heads, dim, requires_grad=True) for _ in range(3))
    table = torch.randn(heads, *(2 * x - 1 for x in k), requires_grad=True)
    out = neighborhood_attention(
        q, key, v, k, dilation=d, causal=causal, rpb=table, backend=backend
    )
    n = math.prod(grid)
    pattern = P.neighborhood(grid, k, d, causal)
    flat = [t.reshape(1, n, heads, dim) for t in (q, key, v)]
    bias = explicit_rpb_bias(table, grid, k, d)
    expected = attention(*flat, pattern, bias=bias, backend="reference").reshape(out.shape)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, key, v, table), grad)
    want = torch.autograd.grad(expected, (q, key, v, table), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    used = torch.ones_like(table, dtype=torch.bool)
    for axis, is_causal in enumerate(causal):
        if is_causal:  # a causal axis only looks back: offsets > 0 never occur
            future = [slice(None)] * table.dim()
            future[axis + 1] = slice(k[axis], None)
            used[tuple(future)] = False
    assert torch.all(got[3][used] != 0) and torch.all(got[3][~used] == 0)


def test_rpb_corner_queries_use_the_table_ends():
    k = 5
    table = torch.zeros(1, 2 * k - 1)
    table[0, 0], table[0, 2 * k - 2] = 100.0, -100.0
    q = torch.zeros(1, 9, 1, 4)
    v = torch.arange(9.0).view(1, 9, 1, 1).expand(1, 9, 1, 4).contiguous()
    out = neighborhood_attention(q, q, v, k, rpb=table)
    # last query: window 4..8, key 4 is at offset -4 -> index 0 -> dominates
    assert out[0, 8, 0, 0] == pytest.approx(4.0)
    # first query: window 0..4, key 4 at offset +4 -> index 2k-2 -> suppressed
    assert out[0, 0, 0, 0] == pytest.approx(1.5, abs=1e-3)


# ----------------------------------------------------------------- modules
@pytest.mark.parametrize(
    "cls,shape",
    [
        (NeighborhoodAttention1D, (2, 11)),
        (NeighborhoodAttention2D, (2, 7, 9)),
        (NeighborhoodAttention3D, (1, 4, 5, 6)),
    ],
)
def test_modules_equal_explicit_computation(cls, shape):
    torch.manual_seed(0)
    module = cls(16, 2, 3, rel_pos_bias=True)
    x = torch.randn(*shape, 16)
    y = module(x)
    grid = shape[1:]
    n = math.prod(grid)
    q, k, v = module.qkv(x).reshape(shape[0], n, 3, 2, 8).unbind(2)
    bias = explicit_rpb_bias(module.rpb, grid, (3,) * len(grid), (1,) * len(grid))
    o = attention(q, k, v, P.neighborhood(grid, 3), bias=bias, backend="reference")
    expected = module.proj(o.reshape(shape[0], n, 16)).reshape(y.shape)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: P.neighborhood((5, 5), 3, stride=4), "stride must not exceed"),
        (lambda: P.neighborhood((5, 5), (3, 3, 3)), "kernel_size must be"),
        (lambda: P.neighborhood((5, 5, 5, 5), 3), "1, 2 or 3 axes"),
        (lambda: P.neighborhood(5, 0), "positive"),
        (
            lambda: neighborhood_attention(
                torch.randn(1, 8, 2, 4),
                torch.randn(1, 8, 2, 4),
                torch.randn(1, 8, 2, 4),
                3,
                stride=2,
                rpb=torch.zeros(2, 5),
            ),
            "stride 1",
        ),
        (
            lambda: neighborhood_attention(
                torch.randn(1, 8, 2, 4),
                torch.randn(1, 8, 2, 4),
                torch.randn(1, 8, 2, 4),
                3,
                rpb=torch.zeros(2, 7),
            ),
            r"rpb must be \(heads, 5\)",
        ),
        (
            lambda: neighborhood_attention(
                torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 4), 3
            ),
            "spatial axes",
        ),
        (lambda: NeighborhoodAttention2D(16, 2, 3)(torch.randn(2, 5, 16)), "2 spatial axes"),
        (lambda: P.neighborhood(8, 3).dense_mask(9, 9), "q_len = kv_len = 8"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
