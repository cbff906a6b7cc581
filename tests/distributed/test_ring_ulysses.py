"""Ring and Ulysses attention, the context-parallel wrapper, S2 head gathering and the runtime
length balancer on 2 and 4 gloo processes, against single-process ``headwise.attention``.

Spawning is slow, so each world size is launched once (module fixtures) and every check runs in
that one launch; the tests below read its results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import headwise
from headwise import patterns as P
from headwise.distributed import (
    balance,
    context_parallel,
    exchange_balanced,
    gather_heads,
    gather_sequence,
    launch,
    place_heads,
    ring_attention,
    s2_attention,
    shard_sequence,
    ulysses_attention,
)

TOL = 1e-5
PATTERNS = {
    "full": None,
    "causal": P.causal(),
    "window": P.sliding_window(5),
    "documents": P.documents([9, 0, 17, 1, 10], causal=True),
}
# (name, seq_len, heads, kv_heads): odd lengths that no world size divides; GQA and MQA
SHAPES = [("odd-gqa", 37, 4, 2), ("mqa", 23, 4, 1)]


def _inputs(seq_len, heads, kv_heads, seed, dim=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq_len, heads, dim, generator=gen)
    k = torch.randn(2, seq_len, kv_heads, dim, generator=gen)
    v = torch.randn(2, seq_len, kv_heads, dim, generator=gen)
    grad = torch.randn(2, seq_len, heads, dim, generator=gen)
    return q, k, v, grad


def _errors(got, want):
    return max(float((a - b).abs().max()) for a, b in zip(got, want))


def _check_op(op, pattern, layout, seq_len, heads, kv_heads, seed):
    """Max error of output and q/k/v gradients of a distributed op against the reference."""
    q, k, v, grad = _inputs(seq_len, heads, kv_heads, seed)
    shards = [shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
    out = op(*shards, pattern, seq_len=seq_len, layout=layout)
    out.backward(shard_sequence(grad, layout=layout))
    got = [
        gather_sequence(t.detach(), seq_len, layout=layout)
        for t in (out, *(s.grad for s in shards))
    ]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = headwise.attention(*leaves, pattern, backend="reference")
    ref.backward(grad)
    return _errors(got, [ref.detach(), *(t.grad for t in leaves)])


def _ring_lse(seq_len):
    q, k, v, _ = _inputs(seq_len, 4, 2, 7)
    _, lse = ring_attention(
        *(shard_sequence(t) for t in (q, k, v)), P.causal(), seq_len=seq_len, return_lse=True
    )
    _, ref_lse = headwise.attention(q, k, v, P.causal(), return_lse=True, backend="reference")
    return _errors([gather_sequence(lse, seq_len, dim=2)], [ref_lse])


def _wrapper(mode, seq_len):
    torch.manual_seed(0)
    mha = headwise.MultiHeadAttention(
        32, 4, num_kv_heads=2, rotary=True, qk_norm="rms", causal=True
    )
    x = torch.randn(2, seq_len, 32)
    grad = torch.randn(2, seq_len, 32)
    cp = context_parallel(mha, mode=mode)
    out = cp(shard_sequence(x), seq_len=seq_len)
    out.backward(shard_sequence(grad))
    got = [gather_sequence(out.detach(), seq_len)]
    for p in mha.parameters():
        dist.all_reduce(p.grad)
        got.append(p.grad.clone())
        p.grad = None
    ref = mha(x)
    ref.backward(grad)
    return _errors(got, [ref.detach(), *(p.grad for p in mha.parameters())])


def _s2(rank, world):
    seq_len, block, heads, kv_heads = 150, 16, 8, 4
    pattern = P.per_head(
        [
            (P.strided(2, (h // 2) % 2, block=block) & P.causal()) | P.sliding_window(20)
            for h in range(heads)
        ]
    )
    placement = place_heads(
        pattern, seq_len, world, num_heads=heads, num_kv_heads=kv_heads, block=block
    )
    q, k, v, _ = _inputs(seq_len, heads, kv_heads, 3)
    last = q[:, -4:]
    out = s2_attention(
        placement.local_q(last, rank),
        placement.local_kv(k, rank),
        placement.local_kv(v, rank),
        pattern,
        placement,
    )
    ref = headwise.attention(q, k, v, pattern, backend="reference")[:, -4:]
    return _errors([gather_heads(out, placement)], [ref]), placement.kv_tokens(rank)


def _exchange(rank, world):
    gen = torch.Generator().manual_seed(100 + rank)
    count = 3 + rank  # ranks start unbalanced in count and tokens
    lengths = (torch.randint(0, 12, (count,), generator=gen) * (rank + 1)).tolist()
    # Sample content encodes its origin so arrival can be checked.
    samples = [torch.full((n, 2), float(rank * 100 + i)) for i, n in enumerate(lengths)]
    batch = exchange_balanced(samples, timeout=20)
    pieces = torch.split(batch.tokens, batch.lengths)
    origins = [float(p[0, 0]) for p in pieces]
    all_lengths = [None] * world
    dist.all_gather_object(all_lengths, lengths)
    return {
        "tokens": int(batch.tokens.shape[0]),
        "ids": batch.ids,
        "origins": origins,
        "uniform": all(bool((p == p[0, 0]).all()) for p in pieces),
        "lengths": batch.lengths,
        "global_tokens": batch.global_tokens,
        "all_lengths": all_lengths,
    }


def _ulysses_heads_error(world):
    q, k, v, _ = _inputs(8 * world, world + 1, 1, 0)
    try:
        ulysses_attention(q[:, :8], k[:, :8], v[:, :8])
    except ValueError as err:
        return str(err)
    return ""


def _worker(rank, world):
    results = {}
    for shape, seq_len, heads, kv_heads in SHAPES:
        for name, pattern in PATTERNS.items():
            if name == "documents" and seq_len != 37:
                continue
            for layout in ("zigzag", "contiguous"):
                for op_name, op in (("ring", ring_attention), ("ulysses", ulysses_attention)):
                    key = f"{op_name}-{name}-{layout}-{shape}"
                    results[key] = _check_op(op, pattern, layout, seq_len, heads, kv_heads, 11)
    per_head = P.per_head([P.causal(), P.sliding_window(3), P.full(), P.strided(3, 1, block=4)])
    results["ulysses-per_head"] = _check_op(ulysses_attention, per_head, "zigzag", 37, 4, 2, 5)
    results["ring-per_head"] = _check_op(ring_attention, per_head, "zigzag", 37, 4, 2, 5)
    results["ring-lse"] = _ring_lse(37)
    results["wrap-ring"] = _wrapper("ring", 29)
    results["wrap-ulysses"] = _wrapper("ulysses", 29)
    results["s2"] = _s2(rank, world)
    results["exchange"] = _exchange(rank, world)
    results["ulysses-heads-error"] = _ulysses_heads_error(world)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world(request):
    results = launch(_worker, request.param, group_timeout=60, timeout=240)
    return request.param, [r.value for r in results]


def test_ring_and_ulysses_match_single_process(world):
    size, results = world
    for rank, res in enumerate(results):
        errors = {
            k: v
            for k, v in res.items()
            if k.startswith(("ring", "ulysses-")) and isinstance(v, float)
        }
        assert len(errors) >= 26
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"world {size} rank {rank}: {bad}"


def test_context_parallel_wrapper_matches_module(world):
    size, results = world
    for res in results:
        assert res["wrap-ring"] <= TOL and res["wrap-ulysses"] <= TOL, (size, res["wrap-ring"])


def test_s2_heads_over_ranks_match_and_keep_less_kv(world):
    size, results = world
    for res in results:
        error, kept = res["s2"]
        assert error <= TOL
        if size == 2:  # each rank holds one stripe class: about half the blocks plus the window
            assert kept < 150 * 0.75


def test_ulysses_heads_not_divisible_raise(world):
    size, results = world
    assert all(f"H={size + 1} heads on {size} ranks" in r["ulysses-heads-error"] for r in results)


def test_exchange_balanced_keeps_samples_and_bound(world):
    size, results = world
    parts = [r["exchange"] for r in results]
    lengths = [n for rank_lengths in parts[0]["all_lengths"] for n in rank_lengths]
    nonempty = sorted(n for n in lengths if n > 0)
    received = sorted(n for p in parts for n in p["lengths"])
    assert received == nonempty  # no sample lost or duplicated
    assert all(p["uniform"] for p in parts)
    origins = sorted(o for p in parts for o in p["origins"])
    expected = sorted(
        float(r * 100 + i)
        for r, rl in enumerate(parts[0]["all_lengths"])
        for i, n in enumerate(rl)
        if n
    )
    assert origins == expected
    tokens = [p["tokens"] for p in parts]
    assert max(tokens) - min(tokens) <= max(lengths)
    assert all(p["global_tokens"] == sum(lengths) for p in parts)
    # Every rank's share is exactly the sorted round-robin deal, longest first.
    width = max(len(rl) for rl in parts[0]["all_lengths"])
    padded = [n for rl in parts[0]["all_lengths"] for n in rl + [0] * (width - len(rl))]
    assignment = balance(padded, size)
    for rank, p in enumerate(parts):
        assert p["ids"] == assignment.ranks[rank]
        assert p["lengths"] == sorted(p["lengths"], reverse=True)
