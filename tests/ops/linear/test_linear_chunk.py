"""Chunked (and recurrent) linear attention == quadratic reference: outputs, state, all gradients.

Tolerances follow the FA3 rule (tests/conftest.py): the error of the path under test against a
float64 oracle must stay within twice the error of the quadratic reference run in the same low
precision, plus a rounding floor.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linear_helpers import make_inputs, run

from conftest import assert_fa3_close
from headwise.ops.linear import linear_attention
from headwise.ops.linear.chunk import SEGMENT_CHUNKS

# The recurrent path is a reference that accumulates in the input dtype, so it is held to the
# oracle in float64 only; the chunked path computes in float32 and must pass the FA3 rule.
CASES = [("chunk", torch.float32), ("chunk", torch.bfloat16), ("recurrent", torch.float64)]

# (length, chunk_size): chunk divides L, does not divide L, L = 1, L < chunk, chunk = 1.
SHAPES = [(32, 8), (37, 16), (1, 16), (5, 64), (11, 1)]


@pytest.mark.parametrize(("backend", "dtype"), CASES)
@pytest.mark.parametrize(("length", "chunk_size"), SHAPES)
@pytest.mark.parametrize("with_decay", [True, False])
def test_causal_matches_quadratic(backend, dtype, length, chunk_size, with_decay):
    inputs = make_inputs(length=length, decay=with_decay)
    oracle = run(inputs, torch.float64, "naive")
    naive_low = run(inputs, dtype, "naive")
    fast = run(inputs, dtype, backend, chunk_size=chunk_size)
    assert fast.keys() == oracle.keys()
    for name in oracle:
        assert_fa3_close(fast[name], naive_low[name], oracle[name], dtype, what=name)


@pytest.mark.parametrize(("backend", "dtype"), CASES)
@pytest.mark.parametrize("with_decay", [True, False])
def test_non_causal_matches_quadratic(dtype, with_decay, backend):
    inputs = make_inputs(length=29, decay=with_decay, state=False)
    oracle = run(inputs, torch.float64, "naive", causal=False)
    naive_low = run(inputs, dtype, "naive", causal=False)
    fast = run(inputs, dtype, backend, causal=False, chunk_size=8)
    for name in oracle:
        assert_fa3_close(fast[name], naive_low[name], oracle[name], dtype, what=name)


def test_non_causal_decay_is_symmetric_in_distance():
    # o_i = sum_j lam^|i-j| (q_i . k_j) v_j, written out for one head
    q, k, v, _, _ = make_inputs(batch=1, length=9, heads=1, state=False)
    lam = torch.tensor([0.7], dtype=torch.float64)
    out = linear_attention(q, k, v, decay=lam, causal=False, backend="chunk", chunk_size=4)
    expected = torch.stack([
        sum(0.7 ** abs(i - j) * (q[0, i, 0] @ k[0, j, 0]) * v[0, j, 0] for j in range(9))
        for i in range(9)
    ])  # fmt: skip
    torch.testing.assert_close(out[0, :, 0], expected)


@pytest.mark.parametrize("causal", [True, False])
def test_normalize_matches_explicit_denominator(causal):
    q, k, v, lam, _ = make_inputs(length=13, state=False)
    qf, kf = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    pos = torch.arange(13)
    dist = (pos[:, None] - pos[None, :]).to(torch.float64)
    weights = lam[:, None, None] ** dist.abs() * (dist >= 0 if causal else 1)
    scores = torch.einsum("bthd,bshd->bhts", qf, kf) * weights
    expected = torch.einsum("bhts,bshe->bthe", scores, v) / (
        scores.sum(-1).transpose(1, 2)[..., None] + 1e-12
    )
    for backend in ("chunk", "naive", "recurrent"):
        out = linear_attention(
            q, k, v, feature_map="elu+1", decay=lam, causal=causal, normalize=True,
            backend=backend, chunk_size=4,
        )  # fmt: skip
        torch.testing.assert_close(out, expected, msg=backend)


def test_chunk_memory_does_not_build_full_score_matrix():
    # The intra-chunk score tensor is (B, H, L/C, C, C): linear in L. Check through autograd's
    # saved tensors that nothing of size L x L is kept for backward.
    q, k, v, lam, _ = make_inputs(batch=1, length=512, heads=1, state=False)
    q.requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_attention(q, k, v, decay=lam, backend="chunk", chunk_size=16)
    assert max(sizes) < 512 * 512 / 4


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    length=st.integers(1, 40),
    heads=st.integers(1, 3),
    dim=st.integers(1, 6),
    dim_v=st.integers(1, 5),
    chunk_size=st.integers(1, 20),
    lam=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_chunk_equals_quadratic_for_random_shapes(
    batch, length, heads, dim, dim_v, chunk_size, lam, seed
):
    q, k, v, _, s0 = make_inputs(batch, length, heads, dim, dim_v, seed=seed)
    decay = torch.full((heads,), lam, dtype=torch.float64)
    kwargs = {"decay": decay, "initial_state": s0, "return_state": True}
    o_ref, s_ref = linear_attention(q, k, v, backend="naive", **kwargs)
    o, s = linear_attention(q, k, v, backend="chunk", chunk_size=chunk_size, **kwargs)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


def test_decay_gradient_against_finite_differences():
    q, k, v, lam, s0 = make_inputs(batch=1, length=10, heads=2, dim=3, dim_v=2)
    lam = torch.tensor([0.6, 0.95], dtype=torch.float64, requires_grad=True)
    s0.requires_grad_()

    def f(lam, s0):
        o, s = linear_attention(
            q, k, v, decay=lam, initial_state=s0, return_state=True, backend="chunk", chunk_size=3
        )
        return o.square().sum() + s.sum()

    assert torch.autograd.gradcheck(f, (lam, s0))


def test_float_decay_equals_tensor_decay_and_length_zero():
    q, k, v, _, s0 = make_inputs(length=7)
    a = linear_attention(q, k, v, decay=0.8, backend="chunk")
    b = linear_attention(q, k, v, decay=torch.tensor(0.8, dtype=torch.float64), backend="chunk")
    torch.testing.assert_close(a, b)
    o, s = linear_attention(
        q[:, :0], k[:, :0], v[:, :0], decay=0.8, initial_state=s0, return_state=True
    )
    assert o.shape == (2, 0, 3, 6)
    torch.testing.assert_close(s, s0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_matches_quadratic_across_many_segments(dtype):
    # chunk_forward walks SEGMENT_CHUNKS chunks at a time and carries the state between segments:
    # 3 full segments and a short last chunk, with an initial state and the final state.
    length = SEGMENT_CHUNKS * 4 * 3 + 5
    inputs = make_inputs(batch=1, length=length, heads=2, dim=4, dim_v=3, scale=0.2)
    oracle = run(inputs, torch.float64, "naive")
    naive_low = run(inputs, dtype, "naive")
    fast = run(inputs, dtype, "chunk", chunk_size=4)
    for name in oracle:
        assert_fa3_close(fast[name], naive_low[name], oracle[name], dtype, what=name)
