"""The native C tile kernel: its plans, its numerics (forward, LSE and backward) against the
float64 oracle on the shapes that stress it (2-D/3-D neighborhoods, scattered keys, long key
runs, odd head dims, strided inputs), thread-count independence, and the fallback when it cannot
compile."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import check_against_oracle, make_inputs

import headwise.patterns as P
from headwise.ops.attention import attention, explain
from headwise.ops.attention.native import (
    available,
    lanes,
    tile_plan,
    tiles_backward,
    tiles_forward,
)
from headwise.ops.attention.plan_cache import PlanCache
from headwise.ops.attention.reference import reference_attention
from strategies import pattern_leaves


def test_kernel_compiles_where_ci_runs():
    # CI sets HEADWISE_REQUIRE_NATIVE=1: the suite must exercise the kernel, not skip it
    if os.environ.get("HEADWISE_REQUIRE_NATIVE") == "1":
        assert available()
    if not available():
        pytest.skip("no C compiler here: the native kernel is not built")


needs_kernel = pytest.mark.skipif(not available(), reason="native tile kernel not built")

_SEEDED = torch.Generator().manual_seed(3)
PLAN_PATTERNS = {
    "window": (P.sliding_window(20, 9), 203),
    "neighborhood_2d": (P.neighborhood((20, 24), 7), 480),
    "neighborhood_2d_dilated_causal": (
        P.neighborhood((12, 20), (5, 4), dilation=(2, 3), causal=(True, False)),
        240,
    ),
    "neighborhood_3d": (P.neighborhood((5, 6, 7), (3, 5, 3)), 210),
    "block_sparse": (P.block_sparse(torch.rand(6, 6, generator=_SEEDED) > 0.5, 16), 96),
    "window_sinks": (P.sliding_window(12) | P.sinks(3), 100),
    "documents_with_empty": (P.documents([30, 0, 1, 33], causal=True), 64),
}


@needs_kernel
@pytest.mark.parametrize("name", PLAN_PATTERNS)
def test_plan_tiles_cover_every_query_once_and_bits_are_the_pattern(name):
    pattern, length = PLAN_PATTERNS[name]
    plan = tile_plan(pattern, length, length)
    rows = plan.rows[plan.rows >= 0]
    assert plan.rows.shape[1] == lanes()
    assert torch.equal(rows.sort().values, torch.arange(length, dtype=torch.int32))
    mask = pattern.dense_mask(length, length)[0]
    seen = torch.zeros(length, length, dtype=torch.bool)
    for t in range(len(plan.rows)):
        segs = range(int(plan.seg_offsets[t]), int(plan.seg_offsets[t + 1]))
        keys = torch.cat(
            [torch.arange(int(plan.seg_start[g]), int(plan.seg_start[g] + plan.seg_len[g]))
             for g in segs] or [torch.zeros(0, dtype=torch.long)]
        )  # fmt: skip
        assert torch.all(keys.diff() > 0), "segments are increasing runs of distinct keys"
        for lane, row in enumerate(plan.rows[t].tolist()):
            if row < 0:
                continue
            if plan.bit_offsets[t] < 0:
                visible = torch.ones(len(keys), dtype=torch.bool)
            else:
                start = int(plan.bit_offsets[t])
                visible = (plan.bits[0, start : start + len(keys)] >> lane) & 1 == 1
            seen[row, keys[visible]] = True
    # every key a query may see is in its tile with its bit set, and no other
    assert torch.equal(seen, mask)


NUMERIC_CASES = {
    # (pattern, batch, length, heads, kv_heads, dim)
    "neighborhood_2d_k7": (P.neighborhood((16, 20), 7), 2, 320, 4, 2, 32),
    "neighborhood_2d_dilated": (
        P.neighborhood((12, 18), (3, 5), dilation=(2, 3)), 1, 216, 2, 1, 16
    ),
    "neighborhood_3d_causal": (
        P.neighborhood((4, 6, 5), 3, causal=(True, False, True)), 1, 120, 2, 2, 24
    ),
    "long_window_runs": (P.sliding_window(100), 1, 300, 2, 1, 8),
    "scattered_blocks": (
        P.block_sparse(torch.rand(5, 5, generator=_SEEDED) > 0.5, 8) | P.sinks(2), 1, 40, 3, 3, 40
    ),
    "head_dim_256": (P.sliding_window(9), 1, 50, 2, 1, 256),
    "head_dim_100": (P.sliding_window(9, 9), 1, 50, 2, 2, 100),
    "one_token": (P.sliding_window(3), 1, 1, 2, 1, 16),
}  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_native_matches_oracle(name):
    pattern, batch, length, heads, kv_heads, dim = NUMERIC_CASES[name]
    q, k, v = make_inputs(batch, length, length, heads, kv_heads, dim)
    check_against_oracle("native", q, k, v, pattern)


@needs_kernel
def test_strided_inputs_and_last_dim_not_contiguous():
    q, k, v = make_inputs(batch=2, q_len=60, kv_len=60, heads=4, kv_heads=2, dim=16)
    pattern = P.sliding_window(7)
    ref = reference_attention(q.double(), k.double(), v.double(), pattern)[0]
    # heads-first storage seen as (B, L, H, D): strides that are not the contiguous ones
    q_t, k_t, v_t = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out, _ = tiles_forward(q_t, k_t, v_t, pattern, 16**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    # the head dim itself strided: copied to contiguous first
    q_s = torch.cat([q.detach(), q.detach()], -1)[..., ::2]
    out, _ = tiles_forward(q_s, k.detach(), v.detach(), pattern, 16**-0.5)
    ref = reference_attention(q_s.double(), k.double(), v.double(), pattern)[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)


@needs_kernel
def test_result_does_not_depend_on_the_thread_count():
    # forward items and backward units (one per K/V head) are each done by one thread, in order
    q, k, v = make_inputs(2, 256, 256, 4, 2, 32)
    pattern = P.neighborhood((16, 16), 5)
    threads = torch.get_num_threads()

    def run():
        out, lse = attention(q, k, v, pattern, backend="native", return_lse=True)
        return out, lse, *torch.autograd.grad((out.square().sum() + lse.sum()), (q, k, v))

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@needs_kernel
def test_every_item_runs_once_whatever_the_thread_count():
    # threads claim ranges of forward items and backward units as they go: each exactly once,
    # also with more threads than ranges (3 batches x 3 heads x 3 tiles; 3 backward units)
    q, k, v = (t.detach() for t in make_inputs(3, 37, 37, 3, 3, 16))
    pattern = P.sliding_window(9) | P.sinks(2)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))

    def run():
        out = torch.full_like(q, float("nan"))
        lse = torch.full((3, 3, 37), float("nan"))
        tiles_forward(q, k, v, pattern, 0.25, out=(out, lse))
        grads = (torch.full_like(q, float("nan")), torch.zeros_like(k), torch.zeros_like(v))
        tiles_backward(d_out, None, q, k, v, out, lse, pattern, 0.25, grads)
        return out, lse, *grads

    results = _with_threads((1, 2, 5, 16), run)
    assert all(not t.isnan().any() for t in results[1])
    ref, _ = reference_attention(q.double(), k.double(), v.double(), pattern)
    torch.testing.assert_close(results[1][0].double(), ref, atol=2e-6, rtol=0)
    for count in (2, 5, 16):
        assert all(torch.equal(a, b) for a, b in zip(results[1], results[count])), count


def _with_threads(counts, run):
    """``run()`` under each thread count of ``counts``, the caller's count restored."""
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in counts:
            torch.set_num_threads(count)
            results[count] = run()
        return results
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_relative_position_gradient_does_not_depend_on_the_thread_count():
    # the table's gradient sums over batches that different threads handle: one partial sum per
    # batch, added in a fixed order, not one per thread
    from headwise import neighborhood_attention

    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(5, 12, 14, 4, 16, generator=gen, requires_grad=True) for _ in range(3))
    table = torch.randn(4, 13, 9, generator=gen, requires_grad=True)

    def run():
        out = neighborhood_attention(q, k, v, (7, 5), rpb=table, backend="native")
        return out, *torch.autograd.grad(out.square().sum(), (q, k, v, table))

    results = _with_threads((1, 2, 3), run)
    for count in (2, 3):
        for name, a, b in zip(("out", "dq", "dk", "dv", "d_table"), results[1], results[count]):
            assert torch.equal(a, b), f"{name} differs between 1 and {count} threads"


@needs_kernel
def test_grouped_long_tiles_do_not_depend_on_the_thread_count(monkeypatch):
    # tiles grouped by the forward take their keys in chunks at fixed positions, so which tiles
    # a thread's range puts together does not change any tile's sums
    import headwise.ops.attention.native.call as call

    monkeypatch.setattr(call, "LONG_TILE_KEYS", 1)
    q, k, v = (t.detach() for t in make_inputs(1, 700, 700, 3, 3, 16))
    pattern = P.sliding_window(300) | P.sinks(3)
    results = _with_threads(
        (1, 2, 3), lambda: attention(q, k, v, pattern, backend="native", return_lse=True)
    )
    for count in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[1], results[count])), count


@needs_kernel
@pytest.mark.parametrize("long_keys", [1024, 4])
def test_softmax_shift_is_the_largest_score_wherever_it_lies(monkeypatch, long_keys):
    # the kernel takes a tile's largest score in four running maxima (then a tail); a key that
    # outweighs the others by e^300 must be the shift at every position of its tile's keys, or
    # 2^(s - shift) overflows; long_keys=4 sends the tile through the grouped forward
    import headwise.ops.attention.native.call as call

    monkeypatch.setattr(call, "LONG_TILE_KEYS", long_keys)
    keys = 13  # three rounds of four maxima and a tail of one
    q = torch.ones(1, 16, 1, 4)
    v = torch.randn(1, keys, 1, 3, generator=torch.Generator().manual_seed(0))
    for top in range(keys):
        k = torch.zeros(1, keys, 1, 4)
        k[0, top] = 150.0  # score 300 at scale 0.5, the others 0
        out, lse = tiles_forward(q, k, v, P.full(), 0.5)
        assert torch.equal(out[0, :, 0], v[0, top, 0].expand(16, 3)), top
        torch.testing.assert_close(lse, torch.full_like(lse, 300.0), atol=0, rtol=1e-6)


@needs_kernel
def test_lse_gradient_flows_through_the_native_backward():
    q, k, v = make_inputs()
    pattern = P.neighborhood((37,), 5) | P.sinks(2)
    grads = {}
    for backend in ("native", "reference"):
        out, lse = attention(q, k, v, pattern, backend=backend, return_lse=True)
        grads[backend] = torch.autograd.grad(out.sum() + 0.5 * lse.sum(), (q, k, v))
    for a, b in zip(grads["native"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_bad_inputs_name_what_they_got():
    q, k, v = (t.detach() for t in make_inputs())
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 CPU"):
        tiles_forward(q.double(), k, v, P.sliding_window(3), 0.25)
    learnable = torch.zeros(37, 37, requires_grad=True)
    with pytest.raises(ValueError, match="bias gradient"):
        attention(q, k, v, P.sliding_window(3), bias=learnable, backend="native")
    with pytest.raises(ValueError, match="score_mod"):
        attention(q, k, v, P.sliding_window(3), score_mod=lambda s, b, h, i, j: s, backend="native")


def test_without_a_compiler_auto_falls_back_to_blockwise(tmp_path):
    script = (
        "import torch, headwise.patterns as P\n"
        "from headwise.ops.attention import explain\n"
        "from headwise.ops.attention.native import available\n"
        "q = torch.randn(1, 16, 2, 8)\n"
        "print(available(), explain(q, q, q, P.sliding_window(2)).backend)\n"
    )
    env = {**os.environ, "HEADWISE_NATIVE": "0", "HEADWISE_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "blockwise"]


def test_plans_stay_cached_within_their_budget(monkeypatch):
    import headwise.ops.attention.native.plan as plans

    cache = PlanCache(plans.PLANS.max_plans, plans.PLANS.max_size, plans.PLANS.size)
    monkeypatch.setattr(plans, "PLANS", cache)
    windows = [P.sliding_window(w) for w in range(1, 41)]  # 40 layers' worth of patterns
    cached = plans._shared_tile_plan  # the cache itself (tile_plan hands out copies)
    first = [cached(p, 100, 100) for p in windows]
    assert all(cached(p, 100, 100) is f for p, f in zip(windows, first))
    # past the entry budget the least recently used plans go first, the newest stays
    monkeypatch.setattr(cache, "max_size", 1)
    newest = cached(P.sliding_window(50), 100, 100)
    assert list(cache) == [(P.sliding_window(50), 100, 100)]
    assert cached(P.sliding_window(50), 100, 100) is newest


@needs_kernel
@pytest.mark.parametrize(
    "flags,check",
    [
        # machines without AVX-512 get 8 lanes (4 x 2 tiles on a 2-D grid): same numerics
        ("-mno-avx512f", "lanes() == 8"),
        # compilers without OpenMP: the items are split among Python threads instead
        ("-fno-openmp", "not library().headwise_tiles_openmp()"),
    ],
)
def test_other_builds_match_oracle(tmp_path, flags, check):
    if flags == "-mno-avx512f" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 build flag")
    script = (
        "import sys, torch\n"
        f"sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[2])]!r}\n"
        "from test_attention import check_against_oracle, make_inputs\n"
        "import headwise.patterns as P\n"
        "from headwise.ops.attention.native.build import lanes, library\n"
        f"assert {check}\n"
        "torch.set_num_threads(2)\n"
        "q, k, v = make_inputs(2, 120, 120, 4, 2, 20)\n"
        "grid = P.neighborhood((10, 12), (5, 3), dilation=(1, 2))\n"
        "check_against_oracle('native', q, k, v, grid)\n"
        "check_against_oracle('native', q, k, v, P.sliding_window(9) | P.sinks(2))\n"
        "from headwise import neighborhood_attention as na\n"
        "grids = [t.detach().view(2, 10, 12, -1, 20) for t in (q, k, v)]\n"
        "table = torch.randn(4, 9, 5, requires_grad=True)\n"
        "grads = [torch.autograd.grad(na(*grids, (5, 3), dilation=(1, 2), rpb=table, "
        "backend=b).square().sum(), table)[0] for b in ('native', 'reference')]\n"
        "torch.testing.assert_close(*grads, atol=2e-5, rtol=2e-5)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HEADWISE_NATIVE_FLAGS": flags, "HEADWISE_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@needs_kernel
def test_long_key_lists_and_cross_attention():
    # tiles that see thousands of keys (the scratch holds a score vector per key)
    q, k, v = make_inputs(batch=1, q_len=21, kv_len=2100, heads=2, kv_heads=1, dim=16)
    check_against_oracle("native", q, k, v, P.full())
    check_against_oracle("native", q, k, v, P.causal() | P.sinks(3))


@needs_kernel
def test_relative_position_table_runs_natively_with_its_gradient():
    # NAT's learnable RPB: the native kernel adds the table and returns its gradient (summed
    # over batches that different threads handle); GQA, dilation, a 2-D grid, batch 3
    from headwise import neighborhood_attention
    from headwise.ops.attention.mods import relative_position_bias

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 10, 12, 4, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(3, 10, 12, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    table = torch.randn(4, 9, 5, generator=gen, requires_grad=True)
    pattern = P.neighborhood((10, 12), (5, 3), dilation=(1, 2))
    flat = [t.flatten(1, 2) for t in (q, k, v)]
    choice = explain(*flat, pattern, score_mod=relative_position_bias(pattern, table))
    assert choice.backend == "native"
    results = {}
    for backend in ("native", "reference"):
        out = neighborhood_attention(q, k, v, (5, 3), dilation=(1, 2), rpb=table, backend=backend)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, table))
        results[backend] = (out, *grads)
    for a, b in zip(results["native"], results["reference"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------- hypothesis: any composition
_leaves = pattern_leaves(max_window=9, max_block=5)
_trees = st.recursive(
    _leaves,
    lambda sub: st.tuples(sub, sub, st.booleans()).map(
        lambda t: t[0] & t[1] if t[2] else t[0] | t[1]
    ),
    max_leaves=4,
)
_patterns = st.one_of(_trees, st.lists(_trees, min_size=4, max_size=4).map(P.per_head))


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    _patterns,
    st.integers(1, 45),
    st.integers(1, 45),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([8, 12, 24]),
)
def test_any_composition_matches_oracle(pattern, q_len, kv_len, kv_heads, dim):
    # tiles of odd sizes, rows without keys, scattered and partial key runs, per-head plans
    q, k, v = make_inputs(2, q_len, kv_len, 4, kv_heads, dim)
    check_against_oracle("native", q, k, v, pattern)


@needs_kernel
@pytest.mark.parametrize("name", ["long_window_runs", "scattered_blocks", "neighborhood_2d_k7"])
def test_grouped_long_tiles_match_oracle(monkeypatch, name):
    # every tile through the grouped, chunked forward (online softmax over shared key chunks)
    import headwise.ops.attention.native.call as call

    monkeypatch.setattr(call, "LONG_TILE_KEYS", 1)
    pattern, batch, length, heads, kv_heads, dim = NUMERIC_CASES[name]
    q, k, v = make_inputs(batch, length, length, heads, kv_heads, dim)
    check_against_oracle("native", q, k, v, pattern)
    # keys beyond one chunk, rows without keys, a bias and the empty rows it makes
    q, k, v = make_inputs(batch=2, q_len=40, kv_len=700, heads=4, kv_heads=2, dim=16)
    bias = torch.randn(2, 1, 1, 700)
    bias[..., 300:320] = float("-inf")
    check_against_oracle("native", q, k, v, P.causal() | P.sinks(3), bias=bias)
    check_against_oracle("native", q, k, v, P.documents([10, 0, 30], [300, 0, 400], causal=True))


@needs_kernel
def test_grouped_long_tiles_with_relative_position_table(monkeypatch):
    import headwise.ops.attention.native.call as call
    from headwise import neighborhood_attention

    monkeypatch.setattr(call, "LONG_TILE_KEYS", 1)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, 11, 2, 8, generator=gen) for _ in range(3))
    table = torch.randn(2, 9, 9, generator=gen)
    out = neighborhood_attention(q, k, v, 5, rpb=table, backend="native")
    ref = neighborhood_attention(q, k, v, 5, rpb=table, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
