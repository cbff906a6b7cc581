"""``auto`` on short sequences: the quadratic form (Taylor's closed form ``1 + z + z^2/2`` with no
features built, or ``phi(q) phi(k)^T`` for the other maps below the break-even length) equals the
chunked path over the features, outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import make_inputs

from conftest import assert_fa3_close
from headwise.ops.linear import api, linear_attention, taylor
from headwise.ops.linear.api import PARALLEL_MAX_LENGTH
from headwise.ops.linear.feature_maps import taylor_similarity


def _run(inputs, dtype, backend, causal, feature_map="taylor", normalize=True):
    q, k, v, lam, _ = inputs
    side = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [q.to(dtype), k.to(dtype), v.to(dtype), lam.to(side)]
    for x in leaves:
        x.requires_grad_()
    o = linear_attention(
        *leaves[:3], feature_map=feature_map, decay=leaves[3], causal=causal, normalize=normalize,
        backend=backend, chunk_size=8,
    )  # fmt: skip
    grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(o, leaves, grad_o.to(o.dtype))
    return dict(zip(("o", "dq", "dk", "dv", "ddecay"), (o, *grads), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_parallel_taylor_matches_chunked_features(dtype, causal):
    inputs = make_inputs(batch=2, length=21, heads=3, dim=4, dim_v=3, state=False)
    oracle = _run(inputs, torch.float64, "naive", causal)
    chunked = _run(inputs, dtype, "chunk", causal)
    parallel = _run(inputs, dtype, "auto", causal)
    for name in oracle:
        assert_fa3_close(parallel[name], chunked[name], oracle[name], dtype, what=name)


def test_auto_builds_no_taylor_features_on_short_sequences_only():
    # Through autograd's saved tensors: the features have 1 + D + D^2 columns.
    dim = 4
    q = make_inputs(batch=1, length=9, heads=2, dim=dim, dim_v=3, state=False)[0]
    q.requires_grad_()

    def saved_widths(length):
        widths = []

        def pack(t):
            widths.append(t.shape[-1] if t.dim() else 0)
            return t

        x = q.repeat(1, length // 9 + 1, 1, 1)[:, :length]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            linear_attention(x, x.detach(), x.detach()[..., :3], feature_map="taylor")
        return widths

    assert 1 + dim + dim * dim not in saved_widths(9)
    assert 1 + dim + dim * dim in saved_widths(PARALLEL_MAX_LENGTH + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("feature_map", "normalize"), [("elu+1", True), ("relu", True), (None, False)]
)
def test_parallel_features_match_chunked(dtype, causal, feature_map, normalize):
    inputs = make_inputs(batch=2, length=19, heads=3, dim=8, dim_v=5, state=False)
    args = (causal, feature_map, normalize)
    oracle = _run(inputs, torch.float64, "naive", *args)
    chunked = _run(inputs, dtype, "chunk", *args)
    parallel = _run(inputs, dtype, "auto", *args)
    for name in oracle:
        assert_fa3_close(parallel[name], chunked[name], oracle[name], dtype, what=name)


def test_auto_takes_the_quadratic_form_below_the_break_even_only(monkeypatch):
    calls = []
    real = api._run
    monkeypatch.setattr(api, "_run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    # F = E = 8 (unnormalized): quadratic while L * 16 <= 8 * 64, i.e. L <= 32
    for length, chunked in ((32, False), (33, True)):
        calls.clear()
        q = torch.randn(1, length, 2, 8)
        linear_attention(q, q, q, feature_map="elu+1")
        assert bool(calls) == chunked, length


def _run_fixed_decay(inputs, dtype, backend, causal, feature_map, normalize, decay):
    """As :func:`_run`, with a decay that takes no gradient (a buffer, as Lightning's) or none."""
    q, k, v, lam, _ = inputs
    side = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    o = linear_attention(
        *leaves, feature_map=feature_map, decay=lam.to(side) if decay else None, causal=causal,
        normalize=normalize, backend=backend, chunk_size=8,
    )  # fmt: skip
    grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(o, leaves, grad_o.to(o.dtype))
    return dict(zip(("o", "dq", "dk", "dv"), (o, *grads), strict=True))


class _OwnSimilarity:
    """Taylor features with a closed form that is not headwise's own: the generic path that
    takes the similarities as given."""

    tokenwise = True

    def query(self, x):
        return taylor(x)

    def key(self, x):
        return taylor(x)

    def similarity(self, q, k):
        return taylor_similarity(q, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize(
    ("feature_map", "normalize", "function"),
    [
        ("elu+1", True, "ParallelFeatureLinearAttention"),
        ("relu", False, "ParallelFeatureLinearAttention"),
        (None, False, "ParallelFeatureLinearAttention"),
        ("taylor", True, "ParallelFeatureLinearAttention"),
        (_OwnSimilarity(), True, "ParallelLinearAttention"),
    ],
)
def test_parallel_function_matches_naive(
    monkeypatch, dtype, causal, decay, feature_map, normalize, function
):
    # Odd sizes everywhere; a decay without gradient (or none) takes the fused autograd
    # functions of ops/linear/parallel.py, checked to be the path taken.
    calls = []
    fn = getattr(api, function)
    real = fn.apply
    monkeypatch.setattr(fn, "apply", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs(batch=2, length=19, heads=3, dim=5, dim_v=7, state=False)
    args = (causal, feature_map, normalize, decay)
    oracle = _run_fixed_decay(inputs, torch.float64, "naive", *args)
    chunked = _run_fixed_decay(inputs, dtype, "chunk", *args)
    assert not calls
    parallel = _run_fixed_decay(inputs, dtype, "auto", *args)
    assert calls
    for name in oracle:
        assert_fa3_close(parallel[name], chunked[name], oracle[name], dtype, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("feature_map", "normalize"), [(None, False), ("elu+1", True)])
def test_parallel_function_single_head_views(dtype, feature_map, normalize):
    # One head, q and k strided views of one projection (as MQAR's linear attention passes
    # them): the matrices go to bmm uncopied.
    gen = torch.Generator().manual_seed(0)
    qk = (torch.randn(3, 13, 2, 1, 6, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    v = torch.randn(3, 13, 1, 5, generator=gen, dtype=torch.float64).requires_grad_()
    grad_o = torch.randn(3, 13, 1, 5, generator=gen, dtype=torch.float64)

    def run(x, vv, backend):
        o = linear_attention(
            *x.unbind(2), vv, feature_map=feature_map, normalize=normalize, backend=backend
        )
        return [o, *torch.autograd.grad(o, [x, vv], grad_o.to(o.dtype))]

    low = [qk.detach().to(dtype).requires_grad_(), v.detach().to(dtype).requires_grad_()]
    oracle = run(qk, v, "naive")
    for fast, naive, exact in zip(run(*low, "auto"), run(*low, "chunk"), oracle, strict=True):
        assert_fa3_close(fast, naive, exact, dtype)
