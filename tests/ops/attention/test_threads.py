"""Threads: the shared plan caches survive concurrent use, and results do not depend on the
number of intra-op threads (``torch.set_num_threads``)."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import headwise.patterns as P
from headwise.ops.attention import attention
from headwise.ops.attention.plan_cache import PlanCache


@pytest.fixture
def switch_often():
    # make the interpreter hand over between threads every few bytecodes
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def hammer(work, threads=2):
    errors: list[BaseException] = []

    def loop(i):
        try:
            work(i)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[0]


def test_plan_cache_under_two_threads(switch_often):
    cache: PlanCache[int] = PlanCache(max_plans=8, max_size=40, size=lambda plan: plan % 7)

    def work(i):
        for n in range(40000):
            key = (i, n % 23)
            assert cache.get(key, lambda key=key: hash(key) % 1000) == hash(key) % 1000
            if n % 50 == 0:
                list(cache)

    hammer(work)
    assert len(list(cache)) <= 8


@pytest.mark.parametrize("backend", ["blockwise", "native"])
def test_two_threads_with_different_patterns(backend, switch_often, monkeypatch):
    import headwise.ops.attention.blockwise.plan as blockwise
    import headwise.ops.attention.native.plan as native

    # a tiny cache so that plans are evicted and rebuilt all the time
    for module in (blockwise, native):
        monkeypatch.setattr(module.PLANS, "max_plans", 3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 8, generator=gen) for _ in range(3))
    patterns = [
        [P.sliding_window(w) for w in (2, 3, 5, 7, 11)],
        [P.documents([n, 40 - n], causal=True) for n in (5, 10, 15, 20, 25)],
    ]
    wanted = {p: attention(q, k, v, p, backend="reference") for ps in patterns for p in ps}

    def work(i):
        for n in range(60):
            p = patterns[i][n % 5]
            out = attention(q, k, v, p, backend=backend)
            torch.testing.assert_close(out, wanted[p], atol=1e-5, rtol=1e-5)

    hammer(work)


PATTERNS = {
    "window": P.sliding_window(16),
    "per_head": P.per_head(
        [P.sliding_window(16), P.causal(), P.sliding_window(8) | P.sinks(2), P.documents([60, 68])]
    ),
    "neighborhood": P.neighborhood((8, 16), (3, 5)),
}


def per_thread_count(name, dtype, extra, with_lse):
    """``blockwise`` out, lse and gradients at 1, 2 and 3 intra-op threads."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 128, 4, 32, generator=gen).to(dtype).requires_grad_() for _ in range(3)
    )
    kwargs = {}
    if extra == "bias":
        kwargs["bias"] = torch.randn(4, 128, 128, generator=gen).to(dtype).requires_grad_()
    elif extra == "score_mod":
        kwargs["score_mod"] = lambda s, b, h, i, j: 5 * torch.tanh(s / 5)
    inputs = [q, k, v, *kwargs.values()][: 4 if extra == "bias" else 3]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse = attention(
                q, k, v, PATTERNS[name], backend="blockwise", return_lse=True, **kwargs
            )
            loss = (out.float() * torch.linspace(-1, 1, 32)).sum()
            grads = torch.autograd.grad(loss + lse.sum() if with_lse else loss, inputs)
            results.append((out, lse, *grads))
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_blockwise_does_not_depend_on_the_thread_count(name, dtype):
    # float32/bfloat16 without score_mod, bias gradient or LSE gradient: the fused CPU kernel,
    # parallel over (batch, head, query block), each row summed in one fixed order
    results = per_thread_count(name, dtype, "plain", with_lse=False)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize(
    "dtype,extra,with_lse",
    [
        (torch.float64, "plain", False),
        (torch.float32, "bias", False),
        (torch.float32, "score_mod", False),
        (torch.float32, "plain", True),
    ],
    ids=str,
)
def test_step_by_step_blockwise_differs_by_rounding_only(name, dtype, extra, with_lse):
    # the step-by-step path multiplies blocks with torch.matmul: BLAS may split a product among
    # threads in another order (a few ulps; documented in blockwise/stepwise.py)
    results = per_thread_count(name, dtype, extra, with_lse)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
