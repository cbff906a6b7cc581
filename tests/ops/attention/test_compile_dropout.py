"""torch.compile over attention dropout without a ``dropout_seed`` on the ``native`` and
``blockwise`` custom operators: the seed is a 0-d int64 tensor drawn in the graph
(:func:`~headwise.ops.attention.dropout.draw_seed_tensor`), so ``fullgraph=True`` compiles with 0
graph breaks, every compiled call draws a new mask, and compiled forward and backward equal eager
ones for the same mask; eager masks are those of the int the generator gives (as before)."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import fresh_cache

import headwise.patterns as P
from headwise.layers import MultiHeadAttention
from headwise.ops.attention import attention
from headwise.ops.attention.backends import BACKENDS
from headwise.ops.attention.dropout import Dropout, draw_seed, draw_seed_tensor
from headwise.ops.attention.native import available

BACKEND_NAMES = [
    "blockwise",
    pytest.param(
        "native", marks=pytest.mark.skipif(not available(), reason="native kernel not built")
    ),
]
PATTERNS = {
    "sliding_window": P.sliding_window(4),
    "per_head": P.per_head([P.sliding_window(1), P.causal()]),
    "documents": P.documents([7, 0, 12], causal=True),
}
P_DROP = 0.3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 19, 2, 8, generator=gen).to(dtype) for _ in range(3))


def grads_of(run, leaves, grad):
    """``run``'s output on copies of ``leaves`` that require grad, and the gradients of
    ``(out * grad).sum()`` with respect to them."""
    leaves = [t.clone().requires_grad_() for t in leaves]
    out = run(*leaves)
    return out, torch.autograd.grad(out, leaves, grad)


def assert_same_step_under_seed(eager, compiled, leaves, manual_seed):
    """``compiled`` after ``torch.manual_seed(manual_seed)`` equals ``eager`` given the seed that
    torch's generator gives after the same call: forward and every gradient, bit for bit."""
    q, _, v = leaves
    grad = torch.randn(*q.shape[:3], v.shape[3], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(manual_seed)
    seed = draw_seed()
    out_e, grads_e = grads_of(lambda *t: eager(*t, seed), leaves, grad)
    torch.manual_seed(manual_seed)
    out_c, grads_c = grads_of(compiled, leaves, grad)
    assert torch.equal(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_seedless_dropout_compiles_in_one_graph_and_matches_eager(backend, name, dtype):
    pattern = PATTERNS[name]

    def run(q, k, v, seed=None):
        return attention(q, k, v, pattern, dropout_p=P_DROP, dropout_seed=seed, backend=backend)

    q, k, v = inputs(dtype=dtype)
    explained = torch._dynamo.explain(run)(q, k, v)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # aot_eager traces what inductor would (dynamo + AOT autograd) and draws the seed from
    # torch's generator as eager does: the same seed, so the very mask of an eager call
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    assert_same_step_under_seed(run, compiled, (q, k, v), manual_seed=11)
    assert not torch.equal(compiled(q, k, v), compiled(q, k, v))  # a new mask every call


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_layer_with_dropout_compiles_in_train_mode(backend):
    torch.manual_seed(0)
    layer = MultiHeadAttention(
        16, 4, num_kv_heads=2, pattern=PATTERNS["sliding_window"], backend=backend, dropout=0.1
    ).train()
    x = torch.randn(2, 23, 16)
    explained = torch._dynamo.explain(lambda x: layer(x).sum())(x.clone().requires_grad_())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    grad = torch.randn(2, 23, 16)
    results = []
    for run in (layer, compiled, compiled):
        torch.manual_seed(5)
        x_leaf = x.clone().requires_grad_()
        out = run(x_leaf)
        results.append((out, torch.autograd.grad(out, [x_leaf, *layer.parameters()], grad)))
    (eager, g_eager), (done, g_done), (again, _) = results
    assert torch.equal(done, eager)
    for a, b in zip(g_done, g_eager):
        assert torch.equal(a, b)
    assert not torch.equal(layer(x), layer(x))  # train mode drops
    assert torch.equal(done, again)  # the mask follows torch.manual_seed
    assert torch.equal(layer.eval()(x), compiled(x))  # no dropout in eval()


@pytest.mark.skipif(not available(), reason="native kernel not built")
@pytest.mark.parametrize("how", ["pattern", "flag"])
def test_causal_layer_with_dropout_compiles_through_auto(how):
    # the common training case: causal attention with dropout. While tracing, auto passes over
    # sdpa (its dropout path looks for non-finite values in Python: fullgraph=True failed) and
    # takes native, whose seed is drawn in the graph; the same step as eager on native. With
    # causal=True the layer's causal pattern is built before the traced code (it was built in
    # every forward: a pattern made while tracing breaks the graph at the operators' key)
    torch.manual_seed(0)
    causal = {"pattern": P.causal()} if how == "pattern" else {"causal": True}
    layer = MultiHeadAttention(16, 4, **causal, dropout=0.1).train()
    x = torch.randn(2, 23, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    grad = torch.randn(2, 23, 16)
    results = []
    for backend, run in (("native", layer), ("auto", compiled)):
        layer.backend = backend
        torch.manual_seed(5)
        x_leaf = x.clone().requires_grad_()
        out = run(x_leaf)
        results.append((out, torch.autograd.grad(out, [x_leaf, *layer.parameters()], grad)))
    (eager, g_eager), (done, g_done) = results
    assert torch.equal(done, eager)
    for a, b in zip(g_done, g_eager):
        assert torch.equal(a, b)
    assert not torch.equal(compiled(x), compiled(x))


@pytest.mark.parametrize("backend", ["reference", *BACKEND_NAMES])
def test_eager_seedless_mask_is_that_of_the_generators_int(backend):
    # the golden check: a call without dropout_seed takes the mask of the int that one draw of
    # torch.randint(0, 2**62) gives, and draws nothing else from the generator
    # (several manual seeds: a draw in another power-of-two range keeps some seeds' ints)
    q, k, v = inputs()
    pattern = PATTERNS["sliding_window"]
    for manual_seed in range(8):
        torch.manual_seed(manual_seed)
        seedless = attention(q, k, v, pattern, dropout_p=P_DROP, backend=backend)
        after = torch.get_rng_state()
        torch.manual_seed(manual_seed)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        assert torch.equal(torch.get_rng_state(), after)
        seeded = attention(q, k, v, pattern, dropout_p=P_DROP, dropout_seed=seed, backend=backend)
        assert torch.equal(seedless, seeded)


def test_seed_tensor_gives_the_mask_of_its_int():
    # tensor seeds hold the int64 bits of the uint64 seed, from either end of its range
    q, k, v = inputs()
    run = BACKENDS["blockwise"].run
    for seed in (5, 2**63 + 5):
        bits = torch.tensor(seed - (2**64 if seed >= 2**63 else 0))
        by_int = run(q, k, v, None, 0.5, None, None, Dropout(P_DROP, seed))
        by_tensor = run(q, k, v, None, 0.5, None, None, Dropout(P_DROP, bits))
        assert all(torch.equal(a, b) for a, b in zip(by_int, by_tensor))


@pytest.mark.parametrize(
    "seed,error",
    [
        (torch.tensor(1.0), TypeError),
        (torch.tensor(1, dtype=torch.int32), TypeError),
        (torch.ones(2, dtype=torch.int64), ValueError),
    ],
)
def test_bad_seed_tensor_is_refused(seed, error):
    with pytest.raises(error, match="seed"):
        BACKENDS["blockwise"].run(*inputs(), None, 0.5, None, None, Dropout(P_DROP, seed))


@pytest.mark.slow  # inductor's C++ build, from an empty cache: tens of seconds when loaded
def test_inductor_draws_a_fresh_seed_per_call_and_matches_eager(tmp_path):
    # inductor's own random numbers: the compiled function returns the seeds it drew, and each
    # call equals eager with that seed, forward and backward, on both operators in one graph
    pattern = PATTERNS["per_head"]

    def run(q, k, v):
        seeds = draw_seed_tensor(), draw_seed_tensor()
        outs = [
            BACKENDS[name].run(q, k, v, pattern, 0.5, None, None, Dropout(P_DROP, seed))[0]
            for name, seed in zip(("native", "blockwise"), seeds)
        ]
        return torch.stack(outs), torch.stack(seeds)

    def eager(q, k, v, seeds):
        return torch.stack([
            BACKENDS[name].run(q, k, v, pattern, 0.5, None, None, Dropout(P_DROP, int(seed)))[0]
            for name, seed in zip(("native", "blockwise"), seeds)
        ])  # fmt: skip

    if not available():
        pytest.skip("native kernel not built")
    leaves = [t.requires_grad_() for t in inputs()]
    # a fresh cache: a compiled graph cached under an older operator schema would be stale (the
    # backward pass compiles at its first call: inside too)
    with fresh_cache(dir=str(tmp_path)):
        compiled = torch.compile(run, fullgraph=True)
        calls = [compiled(*leaves) for _ in range(2)]
        grad = torch.randn_like(calls[0][0])
        grads = [torch.autograd.grad(out, leaves, grad) for out, _ in calls]
    assert not torch.equal(calls[0][1], calls[1][1])
    for (out, seeds), got in zip(calls, grads):
        wanted = eager(*leaves, seeds)
        torch.testing.assert_close(out, wanted)
        for a, b in zip(got, torch.autograd.grad(wanted, leaves, grad)):
            torch.testing.assert_close(a, b)


@pytest.mark.slow  # inductor's C++ build, from an empty cache: tens of seconds when loaded
def test_inductor_keeps_the_mask_of_keep_mask_traced_in_python(tmp_path):
    # keep_mask traced in Python (the reference backend, Combiner's explicit path, a patched
    # hook_pattern): inductor folded the hash's wrapping int64 products into index arithmetic on
    # Python ints, which gave other masks than eager (silently) or an OverflowError. While
    # tracing it runs as the operator headwise::keep_mask: the eager code.
    from headwise.ops.attention.dropout import keep_mask

    torch.manual_seed(0)
    seed = draw_seed_tensor()
    x = torch.randn(2, 2, 18, 10)
    leaves = [t.requires_grad_() for t in inputs()]

    def masked(seed, x):
        return x * keep_mask(seed, P_DROP, 2, 2, 19, 19, rows=slice(1, None), keys=slice(0, 19, 2))

    def reference(q, k, v, seed):
        run = BACKENDS["reference"].run
        return run(q, k, v, PATTERNS["sliding_window"], 0.5, None, None, Dropout(P_DROP, seed))[0]

    with fresh_cache(dir=str(tmp_path)):
        got = torch.compile(masked, fullgraph=True)(seed, x)
        out = torch.compile(reference)(*leaves, seed)  # its non-finite screen: one break
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad)
    assert torch.equal(got, masked(seed, x))
    wanted = reference(*leaves, int(seed))
    torch.testing.assert_close(out, wanted)
    for a, b in zip(grads, torch.autograd.grad(wanted, leaves, grad)):
        torch.testing.assert_close(a, b)


def test_keep_mask_operator_opcheck():
    seed = torch.tensor(123456789, dtype=torch.int64)
    h, i, j = torch.tensor([1]), torch.arange(2, 7), torch.arange(0, 9, 3)
    args = (seed, 5_000_000, 2, 3, 7, 9, h, i, j)
    torch.library.opcheck(torch.ops.headwise.keep_mask.default, args)
    from headwise.ops.attention.dropout import keep_mask

    wanted = keep_mask(123456789, 5_000_000 / 2**24, 2, 3, 7, 9, head_ids=h, rows=i, keys=j)
    assert torch.equal(torch.ops.headwise.keep_mask(*args), wanted)
