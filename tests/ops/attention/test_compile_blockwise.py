"""torch.compile over the blockwise backend: its custom operators (opcheck: schema, fake shapes,
autograd registration) and a layer with ``backend="blockwise"`` compiled with
``fullgraph=True`` and 0 graph breaks, equal to eager forward and backward, with the non-finite
rule and attention dropout; a ``score_mod`` call's plan built while tracing."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from conftest import assert_poisoned_as_reference, assert_same_step
from headwise.layers import MultiHeadAttention
from headwise.ops.attention import attention
from headwise.ops.attention.pattern_keys import pattern_key

NAN = float("nan")

PATTERNS = {
    "sliding_window": P.sliding_window(5),
    "causal": P.causal(),
    "documents": P.documents([9, 0, 14, 12], causal=True),
    "per_head": P.per_head([P.sliding_window(w) for w in (1, 3)] + [P.causal(), P.full()]),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", PATTERNS)
def test_layer_compiles_in_one_graph_and_matches_eager(name):
    # aot_eager traces what inductor would (dynamo + AOT autograd), without compiling C++
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, num_kv_heads=2, pattern=PATTERNS[name], backend="blockwise")
    x = torch.randn(2, 35, 16)
    explained = torch._dynamo.explain(lambda x: layer(x).sum())(x.clone().requires_grad_())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert_same_step(layer, torch.compile(layer, fullgraph=True, backend="aot_eager"), x)


@pytest.mark.parametrize("bad,value", [("k", float("inf")), ("v", -float("inf")), ("q", NAN)])
def test_compiled_non_finite_rule_matches_the_reference(bad, value):
    # a bias that requires grad keeps the step-by-step backward in play as well
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 12, 2, 4, generator=gen) for _ in range(3))
    {"q": q, "k": k, "v": v}[bad][0, 5, 1, 2] = value
    bias = torch.randn(2, 12, 12, generator=gen)
    pattern = P.sliding_window(2)

    def run(q, k, v, bias, backend="blockwise"):
        return attention(q, k, v, pattern, bias=bias, return_lse=True, backend=backend)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    leaves = [tuple(t.clone().requires_grad_() for t in (q, k, v, bias)) for _ in range(2)]
    assert_poisoned_as_reference(run, compiled, leaves)


def test_compiled_dropout_matches_eager():
    # the keep mask is keep_mask's of the call's seed, compiled or not
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 20, 2, 8, generator=gen) for _ in range(3))
    causal = P.causal()  # built outside: one built while tracing costs a graph break

    def run(q, k, v):
        return attention(q, k, v, causal, dropout_p=0.3, dropout_seed=7, backend="blockwise")

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    leaves = [tuple(t.clone().requires_grad_() for t in (q, k, v)) for _ in range(2)]
    eager, done = run(*leaves[0]), compiled(*leaves[1])
    torch.testing.assert_close(done, eager)
    assert not torch.allclose(eager, attention(q, k, v, causal, backend="blockwise"))  # dropped
    grad = torch.randn_like(eager)
    for a, b in zip(
        torch.autograd.grad(done, leaves[1], grad), torch.autograd.grad(eager, leaves[0], grad)
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["sliding_window", "documents", "per_head"])
def test_score_mod_plan_is_built_while_tracing(name):
    # a score_mod is traced (no operator input): its plan is a constant of the graph, so the
    # planner's data-dependent steps break nothing (20 breaks for a window before); what breaks
    # is the non-finite screen's branch
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 35, 4, 8, generator=gen) for _ in range(3))
    pattern = PATTERNS[name]

    def run(q, k, v):
        mod = lambda s, b, h, i, j: s - 0.1 * (i - j).abs()  # noqa: E731
        return attention(q, k, v, pattern, score_mod=mod, backend="blockwise")

    with torch.no_grad():
        explained = torch._dynamo.explain(run)(q, k, v)
        assert explained.graph_break_count <= 1, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(run, backend="aot_eager")
        torch.testing.assert_close(compiled(q, k, v), run(q, k, v), atol=1e-6, rtol=1e-5)


def operator_cases():
    """Operator arguments with the pattern in place of its key: keys are made in the test, as
    an eager call makes them (made at collection, they could make way for newer ones first)."""
    gen = torch.Generator().manual_seed(3)
    window = P.sliding_window(3)
    q, k, v = (torch.randn(2, 12, 4, 8, generator=gen) for _ in range(3))
    kv = (torch.randn(2, 12, 2, 8, generator=gen), torch.randn(2, 12, 2, 5, generator=gen))
    bias = torch.randn(4, 12, 12, generator=gen)
    strided_q = q.transpose(1, 2).contiguous().transpose(1, 2)
    stacked = P.per_head([P.sliding_window(3), P.causal()] * 2)
    zero = torch.tensor(0)  # the seed tensor of calls without dropout
    return [
        ((q, k, v, None, window, 0.3, 32, 0.0, zero), "window"),
        ((q, *kv, bias, stacked, 0.5, 4, 0.0, zero), "gqa-bias"),
        ((strided_q, *kv, bias, window, 0.5, 4, 0.0, zero), "stepwise"),
        ((q, k, v, None, window, 0.3, 32, 0.25, torch.tensor(-12345)), "dropout"),
        ((*(t.bfloat16() for t in (q, k, v)), None, window, 0.3, 32, 0.0, zero), "bf16"),
        ((*(t.double() for t in (q, k, v)), None, window, 0.3, 32, 0.0, zero), "f64"),
    ]


@pytest.mark.parametrize("case", operator_cases(), ids=lambda case: case[1])
def test_opcheck(case):
    args, _ = case
    args = (*args[:4], pattern_key(args[4]), *args[5:])
    args = tuple(a.clone().requires_grad_() if i < 4 and a is not None else a
                 for i, a in enumerate(args))  # fmt: skip
    torch.library.opcheck(torch.ops.headwise.blockwise_attention_fwd.default, args)


@pytest.mark.parametrize("case", operator_cases()[:3], ids=lambda case: case[1])
def test_opcheck_backward(case):
    # the fake implementation's shapes and strides are what the real gradients have (the
    # step-by-step path's are transposes: made contiguous)
    (q, k, v, bias, pattern, *rest), _ = case
    rest = [pattern_key(pattern), *rest]
    out, lse, screened = torch.ops.headwise.blockwise_attention_fwd(q, k, v, bias, *rest)
    gen = torch.Generator().manual_seed(4)
    grad_out, grad_lse = (
        torch.randn(out.shape, generator=gen),
        torch.randn(lse.shape, generator=gen),
    )
    args = (grad_out, grad_lse, q, k, v, bias, out, lse, screened, *rest, bias is not None)
    torch.library.opcheck(torch.ops.headwise.blockwise_attention_bwd.default, args)
