"""CombinerAttention: exact reductions to softmax attention, and the joint softmax written out."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from conftest import assert_fa3_close
from headwise.layers import combiner
from headwise.layers.combiner import CombinerAttention

E, H = 8, 2


def _heads(m, x):
    shape = (*x.shape[:2], m.num_heads, m.head_dim)
    return [p(x).view(shape) for p in (m.q_proj, m.k_proj, m.v_proj)]


def _softmax_attention(m, x):
    q, k, v = _heads(m, x)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / m.head_dim**0.5
    if m.causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)
    return m.out_proj(o.flatten(-2))


def _joint(m, x):
    """Per query: logits over direct keys and region keys, one softmax, weighted values."""
    q, k, v = _heads(m, x)
    b, length, h, d = q.shape
    s = m.segment_len
    n = length // s
    if m.variant == "fixed":
        kb = k.view(b, n, s, h, d).amax(2)
        qb = q.view(b, n, s, h, d).amax(2)
        w = torch.softmax(torch.einsum("bnhd,bnshd->bnhs", qb, k.view(b, n, s, h, d)) / d**0.5, -1)
        vb = torch.einsum("bnhs,bnshd->bnhd", w, v.view(b, n, s, h, d))
        region_of = [[(r, r) for r in range(n)] for _ in range(length)]  # (summary idx, segment)
    else:
        rows = length // s
        full = torch.einsum("bihd,bjhd->bhij", q, k) / d**0.5
        same_row = torch.arange(length)[:, None] // s == torch.arange(length)[None] // s
        p = torch.softmax(full.masked_fill(~same_row, float("-inf")), -1)
        vb = torch.einsum("bhij,bjhd->bihd", p, v)
        kb = m.k_proj(m.summary_norm(x + m.summary_proj(vb.flatten(-2)))).view(b, length, h, d)
        region_of = [[(r * s + i % s, r) for r in range(rows)] for i in range(length)]
    out = torch.zeros_like(q)
    for i in range(length):
        own = i // s
        direct = [j for j in range(own * s, own * s + s) if not m.causal or j <= i]
        regions = [idx for idx, r in region_of[i] if (r < own if m.causal else r != own)]
        logits = torch.cat(
            (
                torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, direct]),
                torch.einsum("bhd,bjhd->bhj", q[:, i], kb[:, regions]),
            ),
            -1,
        )
        p = torch.softmax(logits / d**0.5, -1)
        values = torch.cat((v[:, direct], vb[:, regions]), 1)
        out[:, i] = torch.einsum("bhj,bjhd->bhd", p, values)
    return m.out_proj(out.flatten(-2))


@pytest.mark.parametrize("variant", ["fixed", "axial"])
@pytest.mark.parametrize("causal", [True, False])
def test_equals_joint_softmax_and_backward(variant, causal):
    torch.manual_seed(0)
    m = CombinerAttention(E, H, segment_len=3, variant=variant, causal=causal).double()
    x = torch.randn(2, 12, E, dtype=torch.float64, requires_grad=True)
    out = m(x)
    torch.testing.assert_close(out, _joint(m, x))
    out.sum().backward()
    grads = [x.grad, *(p.grad for p in m.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("segment_len", [1, 7])
def test_fixed_reduces_to_causal_attention(segment_len):
    torch.manual_seed(1)
    m = CombinerAttention(E, H, segment_len=segment_len).double()
    x = torch.randn(2, 7, E, dtype=torch.float64)
    torch.testing.assert_close(m(x), _softmax_attention(m, x))


def test_weights_sum_to_one_and_causality():
    torch.manual_seed(2)
    for variant in ("fixed", "axial"):
        m = CombinerAttention(E, H, segment_len=2, variant=variant).double()
        x = torch.randn(1, 8, E, dtype=torch.float64)
        # V = ones through a zero value projection with bias 1: every output row is out_proj(1).
        with torch.no_grad():
            m.v_proj.weight.zero_()
            m.v_proj.bias.fill_(1.0)
        ones = m.out_proj(torch.ones(1, 1, H * m.head_dim, dtype=torch.float64))
        torch.testing.assert_close(m(x), ones.expand(1, 8, E))
        with torch.no_grad():
            m.v_proj.weight.normal_()
        later = x.clone()
        later[:, 5:] += 1
        torch.testing.assert_close(m(later)[:, :5], m(x)[:, :5])


@pytest.mark.parametrize("variant", ["fixed", "axial"])
def test_fast_path_vs_reference(variant):
    torch.manual_seed(3)
    m = CombinerAttention(E, H, segment_len=4, variant=variant)
    ref = CombinerAttention(E, H, segment_len=4, variant=variant, backend="reference")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 20, E)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)


def test_errors():
    m = CombinerAttention(E, H, segment_len=3)
    with pytest.raises(ValueError, match=r"multiple of segment_len=3; got \(1, 4, 8\)"):
        m(torch.randn(1, 4, E))
    with pytest.raises(ValueError, match=r"x must be \(B, L, E=8\); got \(4, 8\)"):
        m(torch.randn(4, E))
    with pytest.raises(ValueError, match="variant"):
        CombinerAttention(E, H, segment_len=3, variant="logsparse")


def test_embed_dim_is_the_deprecated_name_of_dim():
    with pytest.warns(DeprecationWarning, match="dim="):
        m = CombinerAttention(embed_dim=16, num_heads=4, segment_len=2)
    assert m.dim == m.embed_dim == 16
    with pytest.raises(TypeError, match="give dim only"):
        CombinerAttention(16, 4, segment_len=2, embed_dim=16)


SHAPES = [  # (batch, length, segment_len, dim, heads): n = 4, 5, 1, 5 segments
    (3, 12, 3, 8, 2),
    (2, 20, 4, 12, 3),
    (2, 7, 7, 8, 2),
    (2, 5, 1, 8, 2),
]


def _step(m, x, seed=5):
    """Output, gradients of x and every parameter, and the next draw of torch's generator under
    ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    out = m(x)
    grads = torch.autograd.grad(out.float().square().sum(), [x, *m.parameters()])
    return out, grads, torch.rand(())


def _explicit_and_calls(shape, causal, dropout=0.3):
    """The layer with ``backend="auto"`` (the explicit joint softmax at these sizes) and the same
    layer on the attention calls (``backend="reference"``: keep_mask's dropout, as native)."""
    b, length, s, e, h = shape
    torch.manual_seed(0)
    explicit = CombinerAttention(e, h, segment_len=s, causal=causal, dropout=dropout)
    calls = CombinerAttention(
        e, h, segment_len=s, causal=causal, dropout=dropout, backend="reference"
    )
    calls.load_state_dict(explicit.state_dict())
    return explicit, calls, torch.randn(b, length, e)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_explicit_joint_softmax_equals_the_attention_calls_float32(shape, causal, training):
    """Forward, backward and dropout draws (the seeds in the same order, the same keep masks)."""
    explicit, calls, x = _explicit_and_calls(shape, causal)
    explicit.train(training), calls.train(training)
    x.requires_grad_()
    out, grads, after = _step(explicit, x)
    want, want_grads, want_after = _step(calls, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, want_after)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_explicit_joint_softmax_bfloat16(shape, causal):
    """bfloat16 with dropout: against the attention calls in float64 (same masks), within twice
    the calls' own bfloat16 error."""
    explicit, calls, x = _explicit_and_calls(shape, causal)
    oracle = CombinerAttention(
        shape[3], shape[4], segment_len=shape[2], causal=causal, dropout=0.3, backend="reference"
    )
    oracle.load_state_dict(calls.state_dict())
    explicit, calls, oracle = explicit.bfloat16(), calls.bfloat16(), oracle.double()
    x16 = x.bfloat16().requires_grad_()
    fast, naive = _step(explicit, x16), _step(calls, x16)
    exact = _step(oracle, x16.detach().double().requires_grad_())
    assert_fa3_close(fast[0], naive[0], exact[0], torch.bfloat16, "out")
    for i, (got, low, want) in enumerate(zip(fast[1], naive[1], exact[1])):
        assert_fa3_close(got, low, want, torch.bfloat16, f"grad {i}")


def _calls_taken(monkeypatch, m, x) -> bool:
    """Whether ``m(x)`` ran the attention calls (:meth:`CombinerAttention._fixed`)."""
    taken = []
    fixed = CombinerAttention._fixed

    def spy(self, *args):
        taken.append(True)
        return fixed(self, *args)

    monkeypatch.setattr(CombinerAttention, "_fixed", spy)
    m(x)
    monkeypatch.undo()
    return bool(taken)


def test_which_path_serves_a_call(monkeypatch):
    explicit, calls, x = _explicit_and_calls(SHAPES[0], True)
    assert not _calls_taken(monkeypatch, explicit, x)
    assert _calls_taken(monkeypatch, calls, x)  # a backend named by the caller
    axial = CombinerAttention(8, 2, segment_len=3, variant="axial")
    monkeypatch.setattr(CombinerAttention, "_fixed_explicit", None)  # never reached
    axial(x)
    monkeypatch.undo()
    monkeypatch.setattr(combiner, "EXPLICIT_LIMIT", x.shape[0] * 2 * 12 * (3 + 4) - 1)
    assert _calls_taken(monkeypatch, explicit, x)  # above the limit


@pytest.mark.parametrize("causal", [True, False])
def test_non_finite_input_takes_the_calls_and_their_rule(monkeypatch, causal):
    """A NaN token poisons exactly the rows the attention calls' non-finite rule says (the
    explicit softmax would spread it through 0 * NaN to rows that give it no weight)."""
    explicit, calls, x = _explicit_and_calls(SHAPES[1], causal)
    explicit.eval(), calls.eval()
    x[1, 9] = float("nan")  # segment 2 of 5
    assert _calls_taken(monkeypatch, explicit, x)
    out, want = explicit(x), calls(x)
    torch.testing.assert_close(out, want, equal_nan=True)
    assert torch.isfinite(out[0]).all()  # the other sequence
    if causal:  # the rows before the NaN token
        assert torch.isfinite(out[1, :9]).all()


def test_segment_max_has_amax_gradient_with_ties():
    """The summaries' max splits the gradient evenly among tied maxima, as ``amax``."""
    rows = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, -1.0]])  # (segment, position)
    t = rows.view(1, 2, 4, 1, 1).expand(1, 2, 4, 1, 3).contiguous().requires_grad_()
    grad = torch.randn(1, 2, 1, 3)
    (got,) = torch.autograd.grad(combiner._SegmentMax.apply(t), t, grad)
    (want,) = torch.autograd.grad(t.amax(2), t, grad)
    assert torch.equal(combiner._SegmentMax.apply(t), t.amax(2))
    torch.testing.assert_close(got, want)
    assert (got[0, 1, :3] != 0).all() and (got[0, 1, 3] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("n", "s"), [(1, 4), (2, 1), (5, 3), (4, 8)])
def test_region_pattern_is_the_block_sparse_layout(n, s, causal):
    """The region call's pattern, built once for any length, shows the keys of the block-sparse
    layout of ``(s, 1)`` blocks it replaces (earlier or other segments); its key ranges too."""
    layer = CombinerAttention(8, 2, segment_len=s, causal=causal)
    regions = layer._region_pattern()
    layout = torch.ones(n, n, dtype=torch.bool)
    layout = layout.tril(-1) if causal else layout & ~torch.eye(n, dtype=torch.bool)
    want = P.block_sparse(layout, (s, 1)).dense_mask(n * s, n)
    assert torch.equal(regions.dense_mask(n * s, n), want)
    lo, hi = regions._key_ranges(torch.arange(n * s), n * s, n)
    keys = torch.arange(n)
    seen = ((keys >= lo[..., None]) & (keys < hi[..., None])).any(-2)
    assert torch.equal(seen, want)


def test_region_pattern_follows_assignments():
    """Built by the constructor, the same object while nothing changes, rebuilt after
    ``segment_len`` or ``causal`` is assigned."""
    layer = CombinerAttention(8, 2, segment_len=4)
    first = layer._region_pattern()
    assert layer._region_pattern() is first and first == combiner._Regions(4, True)
    layer.causal = False
    assert layer._region_pattern() == combiner._Regions(4, False)
    layer.segment_len = 2
    assert layer._region_pattern() == combiner._Regions(2, False)
