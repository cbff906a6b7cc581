"""torch.compile over the native backend: its custom operators (opcheck: schema, fake shapes,
autograd registration) and whole layers compiled with ``fullgraph=True`` and 0 graph breaks,
equal to eager forward and backward, the non-finite rule included."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import headwise.patterns as P
from conftest import assert_poisoned_as_reference, assert_same_step
from headwise.layers import MultiHeadAttention
from headwise.layers.neighborhood import NeighborhoodAttention2D
from headwise.ops.attention import attention, attention_varlen, pattern_keys
from headwise.ops.attention.mods import relative_position_bias
from headwise.ops.attention.native import available, native_attention
from headwise.ops.attention.pattern_keys import pattern_key

NAN = float("nan")
pytestmark = pytest.mark.skipif(not available(), reason="native tile kernel not built")

PATTERNS = {
    "sliding_window": P.sliding_window(5),
    "per_head": P.per_head([P.sliding_window(w) for w in (1, 3, 7)] + [P.causal()]),
    "neighborhood_2d": P.neighborhood((5, 7), 3),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graph_breaks(fn, *args) -> int:
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_count == 1, explained.break_reasons
    return explained.graph_break_count


@pytest.mark.parametrize("name", PATTERNS)
def test_layer_compiles_in_one_graph_and_matches_eager(name):
    # the auto dispatch picks native for every one of these (float32 CPU, a sparse pattern);
    # aot_eager traces what inductor would (dynamo + AOT autograd), without compiling C++
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, num_kv_heads=2, pattern=PATTERNS[name])
    x = torch.randn(2, 35, 16)
    assert graph_breaks(lambda x: layer(x).sum(), x.clone().requires_grad_()) == 0
    assert_same_step(layer, torch.compile(layer, fullgraph=True, backend="aot_eager"), x)


@pytest.mark.parametrize("name", ["full", "sliding_window", "neighborhood_2d"])
def test_layer_compiles_with_dynamic_shapes(name):
    # dynamic=True traces Python numbers (dropout_p, scale) as symbols: the argument checks
    # must take them without a graph break, and new lengths must not recompile per value
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, pattern=PATTERNS.get(name))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    lengths = (35,) if name == "neighborhood_2d" else (35, 23, 41)
    counters.clear()
    for batch, length in zip((2, 3, 4), lengths):  # (a size 1 is specialized: a new graph)
        assert_same_step(layer, compiled, torch.randn(batch, length, 16))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow  # inductor's C++ build: about 15 s on a loaded 2-core machine
def test_inductor_compiles_the_operator():
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, pattern=PATTERNS["per_head"])
    assert_same_step(layer, torch.compile(layer, fullgraph=True), torch.randn(1, 35, 16))


def test_relative_position_table_gets_its_gradient_compiled():
    # the neighborhood's score_mod: the table is an input of the operator
    torch.manual_seed(0)
    layer = NeighborhoodAttention2D(16, 4, kernel_size=3)
    x = torch.randn(2, 5, 6, 16)
    assert graph_breaks(lambda x: layer(x).sum(), x.clone().requires_grad_()) == 0
    assert_same_step(layer, torch.compile(layer, fullgraph=True, backend="aot_eager"), x)


@pytest.mark.parametrize("bad,value", [("k", float("inf")), ("v", -float("inf")), ("q", NAN)])
def test_compiled_non_finite_rule_matches_the_reference(bad, value):
    # a non-finite entry poisons only the rows that give it weight, compiled as in the oracle
    # (an infinite key gives some rows' scores -inf: only the rule makes those rows NaN)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 12, 2, 4, generator=gen) for _ in range(3))
    {"q": q, "k": k, "v": v}[bad][0, 5, 1, 2] = value
    pattern = P.sliding_window(2)

    def run(q, k, v, backend="auto"):
        return attention(q, k, v, pattern, return_lse=True, backend=backend)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    leaves = [(q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_())
              for _ in range(2)]  # fmt: skip
    assert_poisoned_as_reference(run, compiled, leaves)


def operator_cases():
    gen = torch.Generator().manual_seed(2)
    window, hood = P.sliding_window(3), P.neighborhood((3, 4), 3)
    q, k, v = (torch.randn(2, 12, 4, 8, generator=gen) for _ in range(3))
    kv = (torch.randn(2, 12, 2, 8, generator=gen), torch.randn(2, 12, 2, 5, generator=gen))
    table = torch.randn(4, 5, 5, generator=gen)
    bias = torch.randn(4, 12, 12, generator=gen)
    half = tuple(t.bfloat16() for t in (q, k, v))
    zero = torch.tensor(0)  # the seed tensor of calls without dropout
    return [
        ((q, k, v, None, None, pattern_key(window), 0.3, 0.0, zero), "window"),
        (
            (q, *kv, bias, None, pattern_key(P.per_head([window, P.causal()] * 2)), 0.5, 0.0, zero),
            "gqa",
        ),
        ((q, k, v, None, table, pattern_key(hood), 0.35, 0.0, zero), "table"),
        ((q, k, v, None, None, pattern_key(window), 0.3, 0.25, torch.tensor(-12345)), "dropout"),
        ((*half, None, None, pattern_key(window), 0.3, 0.0, zero), "bfloat16"),
    ]


@pytest.mark.parametrize("case", operator_cases(), ids=lambda case: case[1])
def test_opcheck(case):
    args, _ = case
    grads = [i for i, a in enumerate(args[:5]) if i != 3 and a is not None]
    args = tuple(a.clone().requires_grad_() if i in grads else a for i, a in enumerate(args))
    torch.library.opcheck(torch.ops.headwise.native_attention_fwd.default, args)


def test_eager_keys_make_way_but_backward_still_finds_its_pattern(monkeypatch):
    monkeypatch.setattr(pattern_keys, "RECENT_PATTERNS", 2)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 9, 2, 4, generator=gen).requires_grad_() for _ in range(3))
    first = P.sliding_window(1, 1)
    out, _ = native_attention(q, k, v, first)
    for w in (2, 3, 4):  # push the first pattern's key out of the registry
        native_attention(q.detach(), k.detach(), v.detach(), P.sliding_window(w))
    assert pattern_key(P.sliding_window(4)) == pattern_key(P.sliding_window(4))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    wanted = torch.autograd.grad(attention(q, k, v, first, backend="reference").sum(), (q, k, v))
    for a, b in zip(grads, wanted):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_relative_position_table_is_an_operator_input():
    gen = torch.Generator().manual_seed(4)
    pattern = P.neighborhood((4, 4), 3)
    q, k, v = (torch.randn(1, 16, 2, 4, generator=gen) for _ in range(3))
    table = torch.randn(2, 5, 5, generator=gen, requires_grad=True)
    mod = relative_position_bias(pattern, table)
    out, _ = native_attention(q, k, v, pattern, score_mod=mod)
    wanted = attention(q, k, v, pattern, score_mod=mod, backend="reference")
    torch.testing.assert_close(out, wanted, atol=1e-5, rtol=1e-5)
    (d_table,) = torch.autograd.grad(out.square().sum(), table)
    (wanted_table,) = torch.autograd.grad(wanted.square().sum(), table)
    torch.testing.assert_close(d_table, wanted_table, atol=1e-5, rtol=1e-5)


def test_pattern_built_inside_the_compiled_code():
    # dynamo holds such a pattern as an empty shell while tracing: the key is made after one
    # graph break, from the real pattern (not from the shell's class defaults)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 20, 2, 4, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 7, 20])

    def run(q, k, v):
        window = attention(q, k, v, P.sliding_window(3, 2, align="top_left"))
        return window + attention_varlen(q[0], k[0], v[0], cu, causal=True)[None]

    compiled = torch.compile(run, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), run(q, k, v))
    torch.testing.assert_close(compiled(q, k, v), run(q, k, v))


@pytest.mark.parametrize("backend", ["native", "blockwise"])
def test_compiled_dropout_draws_a_new_mask_every_call(backend):
    # the seed is drawn at run time, never frozen into the graph as a constant
    q = torch.randn(2, 19, 2, 8)
    pattern = P.sliding_window(4)
    compiled = torch.compile(
        lambda q: attention(q, q, q, pattern, dropout_p=0.5, backend=backend),
        backend="aot_eager",
    )
    assert not torch.equal(compiled(q), compiled(q))
