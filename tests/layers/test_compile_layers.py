"""torch.compile over the layers with their own code paths (Combiner, MoA, S2, Selective, the
hooked probabilities of :class:`~headwise.layers._attention.SequenceAttention`), in training mode
with dropout and in ``eval()``, built as the MQAR model builds them: ``fullgraph=True`` with 0
graph breaks, and the compiled step equal to eager for the same ``torch.manual_seed`` (forward,
every gradient, the dropout draws)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from headwise.layers import CombinerAttention, MultiHeadAttention, SelectiveMultiHeadAttention
from headwise.layers.combiner import _joint_keep_mask, _seen_entries
from headwise.layers.moa import MoAAttention, MoASpan
from headwise.layers.s2 import S2Attention, S2Pattern
from headwise.ops.attention.dropout import keep_mask
from headwise.ops.attention.native import available

pytestmark = pytest.mark.skipif(not available(), reason="native tile kernel not built")

# MQAR's mixers (headwise.evals.mqar) at dim 32, 4 heads, dropout 0.1
LAYERS = {
    "combiner": lambda: CombinerAttention(32, 4, segment_len=8, causal=True, dropout=0.1),
    "combiner_one_segment": lambda: CombinerAttention(32, 4, segment_len=32, dropout=0.1),
    # the attention calls (a named backend, or above EXPLICIT_LIMIT) and the axial variant
    "combiner_calls": lambda: CombinerAttention(
        32, 4, segment_len=8, dropout=0.1, backend="native"
    ),
    "combiner_calls_bidirectional": lambda: CombinerAttention(
        32, 4, segment_len=8, causal=False, dropout=0.1, backend="native"
    ),
    "combiner_axial": lambda: CombinerAttention(
        32, 4, segment_len=8, variant="axial", dropout=0.1, backend="native"
    ),
    "combiner_axial_bidirectional": lambda: CombinerAttention(
        32, 4, segment_len=8, variant="axial", causal=False, dropout=0.1, backend="native"
    ),
    "moa": lambda: MoAAttention(
        32,
        4,
        alphas=(8.0, 16.0, 32.0, 32.0),
        betas=(0.0,) * 4,
        block=8,
        sink_size=8,
        min_cache=8,
        max_new_tokens=0,
        dropout=0.1,
    ),
    "s2": lambda: S2Attention(
        32, 4, block_size=4, local_blocks=4, vert_stride=2, causal=True, dropout=0.1
    ),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def explained(layer, x):
    result = torch._dynamo.explain(layer)(x)
    return result.graph_count, result.graph_break_count, result.break_reasons


def assert_same_seeded_step(layer, x):
    """``torch.compile(layer, fullgraph=True)`` and ``layer`` give the same output and gradients
    for the same ``torch.manual_seed`` (the same dropout draws)."""
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    grad = torch.randn(x.shape)
    results = []
    for run in (layer, compiled):
        torch.manual_seed(5)
        leaf = x.clone().requires_grad_()
        out = run(leaf)
        wrt = [leaf, *(p for p in layer.parameters() if p.requires_grad)]
        results.append((out, torch.autograd.grad(out, wrt, grad, allow_unused=True)))
    (eager, g_eager), (done, g_done) = results
    torch.testing.assert_close(done, eager, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_done, g_eager):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    return compiled


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_compiles_in_one_graph_and_matches_eager(name, training):
    # Combiner drew its seeds with .item() and scattered its keep mask through a boolean index
    # (a dynamic shape), and its attention calls built their patterns in forward; MoA's and
    # S2's patterns had the dataclass's generated repr, which auto's reasons call and dynamo
    # skips: 2 to 4 graph breaks, and fullgraph=True failed
    torch.manual_seed(0)
    layer = LAYERS[name]().train(training)
    x = torch.randn(2, 32, 32)
    graphs, breaks, reasons = explained(layer, x)
    assert (graphs, breaks) == (1, 0), reasons
    compiled = assert_same_seeded_step(layer, x)
    if training:  # a new mask every compiled call (the seeds are drawn in the graph)
        assert not torch.equal(compiled(x), compiled(x))


def test_compiled_combiner_refuses_non_finite_input():
    # eager takes the attention calls and their non-finite rule; the compiled explicit path
    # cannot branch on values and raises instead of returning silently wrong rows
    torch.manual_seed(0)
    layer = CombinerAttention(16, 2, segment_len=4, dropout=0.1).eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 16, 16)
    torch.testing.assert_close(compiled(x), layer(x))
    x[0, 5, 3] = float("inf")
    with pytest.raises(RuntimeError, match="must be finite"):
        compiled(x)


def test_selective_breaks_only_at_its_data_dependent_length():
    # the causal pattern is built once (it was built in every forward: a graph break at the
    # operators' key); what remains is the padded length max_h |S_h| read with .item(), a
    # data-dependent shape (slots of every (sequence, head), and the dropout counters, depend
    # on it), unless capture_scalar_outputs keeps it a symbol (the next test)
    torch.manual_seed(0)
    layer = SelectiveMultiHeadAttention(32, 4, dropout=0.1).train()
    graphs, breaks, reasons = explained(layer, torch.randn(2, 32, 32))
    assert (graphs, breaks) == (2, 1)
    assert "Tensor.item()" in reasons[0].reason


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("causal", [True, False])
def test_selective_compiles_in_one_graph_with_captured_scalars(causal, training):
    # with capture_scalar_outputs the padded length stays a symbol, bounded by the layer's
    # torch._check hints (without them fullgraph=True failed: data-dependent guards); one graph
    # serves every routing
    torch.manual_seed(0)
    layer = SelectiveMultiHeadAttention(32, 4, causal=causal, dropout=0.1, backend="native")
    layer.train(training)
    x = torch.randn(2, 32, 32)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        graphs, breaks, reasons = explained(layer, x)
        assert (graphs, breaks) == (1, 0), reasons
        torch._dynamo.reset()
        counters.clear()
        compiled = assert_same_seeded_step(layer, x)
        # equal tokens all pick the same heads: a padded length of L (x's is less)
        other = x[:, :1].expand(x.shape).clone().requires_grad_()
        assert int(layer.route(other).sum(1).max()) != int(layer.route(x).sum(1).max())
        torch.manual_seed(3)
        eager = layer(other)
        torch.manual_seed(3)
        torch.testing.assert_close(compiled(other), eager, atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_hooked_probabilities_with_dropout_compile():
    # a hook that patches the probabilities: the layer applies dropout to them itself, its seed
    # drawn in the graph (it was an int, read with .item())
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, causal=True, dropout=0.2, backend="native").train()
    layer.hook_pattern.register_forward_hook(lambda module, args, out: out * 0.5)
    x = torch.randn(2, 9, 16)
    graphs, breaks, reasons = explained(layer, x)
    assert (graphs, breaks) == (1, 0), reasons
    assert_same_seeded_step(layer, x)


def test_pattern_reprs_are_the_dataclass_text():
    # written out (torch.compile traces them); the text is unchanged
    assert repr(S2Pattern(4, 2, 4, 3, 2, 1, homo_head=True)) == (
        "S2Pattern(heads=4, num_kv_heads=2, block=4, n_local=3, vert_stride=2, head_step=1, "
        "head_offset=0, num_dense_heads=0, homo_head=True, causal=True, n_right=1)"
    )
    assert repr(MoASpan(float("inf"), 0.25, length=7)) == (
        "MoASpan(alpha=inf, beta=0.25, block=64, sink_size=64, min_cache=128, extra_tokens=0, "
        "length=7)"
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_compiled_combiner_keep_mask_is_the_eager_one(n, causal):
    # the compiled path keeps every logit (static shapes), eager only the seen ones: the same
    # entries where a query sees the logit
    batch, heads, s, p = 2, 3, 4, 0.3
    seeds = torch.tensor(11), torch.tensor(1 << 61)
    full = _joint_keep_mask(*seeds, p, batch, n, heads, s, torch.device("cpu")).flatten()
    sizes = (batch * n * heads * s * s, batch * heads * n * s * n)
    entries = _seen_entries(batch, n, heads, s, causal, torch.device("cpu"))
    for seed, size, (where, counter) in zip(seeds, sizes, entries):
        kept = keep_mask(seed, p, 1, 1, 1, size, keys=counter).flatten()
        assert torch.equal(full[where.long()], kept)
    assert len(entries) == (1 if n == 1 else 2)
