"""Attention dropout (issue 16): ``reference`` and ``blockwise`` against autograd through an
explicit keep mask from the same seed, keep-rate statistics on every backend that has dropout
(``sdpa`` included, with its own mask), determinism, the exact no-dropout path at p = 0,
refusals, and the non-finite rule under dropout."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from conftest import assert_fa3_close
from headwise.ops.attention import attention, attention_varlen, explain
from headwise.ops.attention.blockwise.heads import head_passes
from headwise.ops.attention.dropout import keep_mask
from headwise.ops.attention.neighborhood import neighborhood_attention

SEED = 1234

PATTERNS = {
    "none": None,
    "causal": P.causal(),
    "window": P.sliding_window(3),
    "window_sinks": P.sliding_window(4) | P.sinks(2),
    "documents": P.documents([5, 0, 10], causal=True),
    "neighborhood": P.neighborhood((3, 5), 3, causal=(False, True)),
}


def make_inputs(batch, q_len, kv_len, heads, kv_heads, dim, dtype, value_dim=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    return (
        rand(batch, q_len, heads, dim),
        rand(batch, kv_len, kv_heads, dim),
        rand(batch, kv_len, kv_heads, value_dim or dim),
    )


def explicit_dropout(q, k, v, pattern, seed, p, bias=None):
    """The definition in float64, written out: ``(softmax(S) * Z / (1 - p)) V`` with the whole
    keep mask from :func:`keep_mask`, and the undropped LSE; autograd gives its gradients."""
    batch, q_len, heads, dim = q.shape
    kv_len, group = k.shape[1], heads // k.shape[2]
    qh = q.double().transpose(1, 2)
    kh = k.double().transpose(1, 2).repeat_interleave(group, 1)
    vh = v.double().transpose(1, 2).repeat_interleave(group, 1)
    scores = qh @ kh.transpose(-1, -2) * dim**-0.5
    if bias is not None:
        scores = scores + bias.double()
    if pattern is not None:
        scores = scores.masked_fill(~pattern.dense_mask(q_len, kv_len)[None], float("-inf"))
    probs = torch.softmax(scores, -1)
    keep = keep_mask(seed, p, batch, heads, q_len, kv_len).double()
    out = (probs * keep / (1 - p)) @ vh
    return out.transpose(1, 2), torch.logsumexp(scores, -1)


def check_against_explicit(backend, q, k, v, pattern, p, bias=None):
    """Out, LSE and every gradient (LSE's included) of ``backend`` against the explicit mask;
    the reference backend run on the same dtype is the low-precision comparison (FA3 rule)."""
    leaves = [t for t in (q, k, v, bias) if t is not None]
    got = attention(
        q,
        k,
        v,
        pattern,
        bias=bias,
        backend=backend,
        return_lse=True,
        dropout_p=p,
        dropout_seed=SEED,
    )
    same = attention(
        q,
        k,
        v,
        pattern,
        bias=bias,
        backend="reference",
        return_lse=True,
        dropout_p=p,
        dropout_seed=SEED,
    )
    d64 = [t.detach().double().requires_grad_() for t in leaves]
    want = explicit_dropout(*d64[:3], pattern, SEED, p, *d64[3:])
    gen = torch.Generator().manual_seed(1)
    d_out = torch.randn(want[0].shape, generator=gen, dtype=torch.float64)
    d_lse = torch.randn(want[1].shape, generator=gen, dtype=torch.float64)
    dtype = q.dtype
    for name, fast, slow, oracle in zip(("out", "lse"), got, same, want):
        assert_fa3_close(fast, slow, oracle, dtype, f"{backend} {name}")

    def grads(outputs, inputs, wide):
        loss = (outputs[0] * (d_out if wide else d_out.to(dtype))).sum()
        loss = loss + (outputs[1] * (d_lse if wide else d_lse.float())).sum()
        return torch.autograd.grad(loss, inputs)

    for name, fast, slow, oracle in zip(
        "qkvb", grads(got, leaves, False), grads(same, leaves, False), grads(want, d64, True)
    ):
        assert_fa3_close(fast, slow, oracle, dtype, f"{backend} d{name}", factor=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("backend", ["reference", "blockwise", "native"])
def test_gradients_equal_autograd_through_the_explicit_mask(backend, pattern, dtype):
    q, k, v = make_inputs(2, 15, 15, 4, 2, 8, dtype)
    check_against_explicit(backend, q, k, v, PATTERNS[pattern], 0.3)


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_rectangular_other_value_dim_and_bias_gradient(backend):
    q, k, v = make_inputs(1, 11, 19, 3, 1, 8, torch.float32, value_dim=5)
    bias = torch.randn(1, 3, 11, 19).requires_grad_()
    check_against_explicit(backend, q, k, v, P.causal(), 0.45, bias)


def test_blockwise_per_head_passes_take_their_heads_of_the_mask():
    """Heads grouped by pattern run in separate passes (an uneven group reads an index of
    heads): each pass must take its own heads' rows of the keep mask, forward and backward."""
    sw, full = P.sliding_window(4), P.full()
    pattern = P.per_head([sw, sw, full, sw, full, full])
    assert len(head_passes(pattern, 70, 70, 32)) == 2  # the path under test
    q, k, v = make_inputs(1, 70, 70, 6, 2, 8, torch.float32)
    check_against_explicit("blockwise", q, k, v, pattern, 0.2)


def test_blockwise_several_query_groups_in_bfloat16_larger():
    q, k, v = make_inputs(2, 97, 97, 2, 2, 16, torch.bfloat16)
    check_against_explicit("blockwise", q, k, v, P.sliding_window(40), 0.1)


def test_varlen_uses_the_packed_call_mask():
    lengths = [4, 0, 9, 6]
    cu = torch.tensor([0, 4, 4, 13, 19])
    q, k, v = (t[0] for t in make_inputs(1, 19, 19, 4, 2, 8, torch.float32))
    packed = attention_varlen(
        q, k, v, cu, causal=True, backend="blockwise", dropout_p=0.25, dropout_seed=SEED
    )
    want, _ = explicit_dropout(
        q[None], k[None], v[None], P.documents(lengths, causal=True), SEED, 0.25
    )
    torch.testing.assert_close(packed.double(), want[0], atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(packed.sum(), (q, k, v))
    wants = torch.autograd.grad(want.sum(), (q, k, v))
    for got, expected in zip(grads, wants):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_neighborhood_attention_passes_dropout_on():
    q, k, v = (torch.randn(1, 3, 5, 2, 4) for _ in range(3))
    pattern = P.neighborhood((3, 5), 3)
    got = neighborhood_attention(q, k, v, 3, backend="blockwise", dropout_p=0.5, dropout_seed=SEED)
    want, _ = explicit_dropout(*(t.flatten(1, 2) for t in (q, k, v)), pattern, SEED, 0.5)
    torch.testing.assert_close(got.double(), want.reshape(got.shape), atol=1e-5, rtol=1e-5)


def _probabilities(backend, p, pattern=None, seed=None):
    """``P * Z / (1 - p)`` as the backend computes it: one-hot values read the weights out."""
    torch.manual_seed(0)
    q = torch.randn(2, 64, 4, 8)
    k = torch.randn(2, 64, 4, 8)
    eye = torch.eye(64).expand(2, 4, 64, 64).transpose(1, 2)  # (B, Lk, H, Lk)
    weights = attention(q, k, eye, pattern, backend=backend, dropout_p=p, dropout_seed=seed)
    undropped = attention(q, k, eye, pattern, backend="reference")
    return weights.transpose(1, 2), undropped.transpose(1, 2)  # (B, H, Lq, Lk)


@pytest.mark.parametrize("backend", ["reference", "blockwise", "sdpa"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate_and_rescaling_on_the_probabilities(backend, p):
    seed = None if backend == "sdpa" else SEED
    weights, undropped = _probabilities(backend, p, P.causal(), seed)
    visible = undropped > 0
    kept = (weights != 0) & visible
    n = int(visible.sum())
    rate = float(kept.sum()) / n
    assert abs(rate - (1 - p)) <= 5 * (p * (1 - p) / n) ** 0.5, rate
    assert not (weights != 0)[~visible].any()  # hidden keys stay hidden
    torch.testing.assert_close(weights[kept], undropped[kept] / (1 - p))


def test_sdpa_draws_its_own_mask():
    """SDPA's mask is its own (torch's generator), not keep_mask: documented, and why sdpa
    refuses a dropout_seed."""
    torch.manual_seed(5)
    weights, _ = _probabilities("sdpa", 0.5)
    torch.manual_seed(5)
    again, _ = _probabilities("sdpa", 0.5)
    assert torch.equal(weights, again)
    ours, _ = _probabilities("blockwise", 0.5, seed=SEED)
    assert not torch.equal(weights != 0, ours != 0)


@pytest.mark.parametrize("backend", ["reference", "blockwise", "native", "sdpa"])
def test_manual_seed_fixes_the_mask_and_seeds_differ(backend):
    q, k, v = make_inputs(1, 9, 9, 2, 2, 4, torch.float32)

    def run(manual, seed=None):
        torch.manual_seed(manual)
        return attention(q, k, v, backend=backend, dropout_p=0.5, dropout_seed=seed)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    if backend != "sdpa":
        assert torch.equal(run(0, SEED), run(1, SEED))
        assert not torch.equal(run(0, SEED), run(0, SEED + 1))


@pytest.mark.parametrize("backend", ["reference", "blockwise", "sdpa", "native"])
def test_p_zero_is_bitwise_the_path_without_dropout_and_draws_nothing(backend):
    pattern = None if backend == "sdpa" else P.sliding_window(3)
    q, k, v = make_inputs(2, 13, 13, 4, 2, 8, torch.float32)
    if backend == "native" and explain(q, k, v, pattern, backend=("native",)).backend is None:
        pytest.skip("the native kernel is not available")
    plain = attention(q, k, v, pattern, backend=backend)
    state = torch.get_rng_state()
    zero = attention(q, k, v, pattern, backend=backend, dropout_p=0.0, dropout_seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(plain, zero)
    grads = [torch.autograd.grad(out.sum(), (q, k, v)) for out in (plain, zero)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-0.1, ValueError),
        (1.0, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        ("0.1", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_dropout_p_is_refused(value, error):
    q = torch.randn(1, 4, 1, 4)
    with pytest.raises(error, match="dropout_p"):
        attention(q, q, q, dropout_p=value)
    with pytest.raises(error, match="dropout_p"):
        attention_varlen(q[0], q[0], q[0], torch.tensor([0, 4]), dropout_p=value)


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1 << 64, ValueError), (1.0, TypeError)]
)
def test_bad_dropout_seed_is_refused(value, error):
    q = torch.randn(1, 4, 1, 4)
    with pytest.raises(error, match="dropout_seed"):
        attention(q, q, q, dropout_p=0.1, dropout_seed=value)


def test_backends_without_dropout_refuse_and_auto_skips_them():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="no attention dropout"):
        attention(q, q, q, P.sliding_window(2), backend="flex", dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_seed"):
        attention(q, q, q, backend="sdpa", dropout_p=0.1, dropout_seed=1)
    assert explain(q, q, q, P.causal(), dropout_p=0.1).backend == "sdpa"
    assert explain(q, q, q, P.causal(), dropout_p=0.1, dropout_seed=1).backend == "native"
    assert explain(q, q, q, P.sliding_window(2), dropout_p=0.1).backend == "native"


@pytest.mark.parametrize("backend", ["reference", "blockwise", "native"])
def test_non_finite_values_reach_only_the_rows_that_see_them(backend):
    """With dropout a bad value poisons the rows that see it (dropped or not) and no other: the
    other rows, and their gradients, are those of the same call with the bad value replaced."""
    q, k, v = make_inputs(1, 12, 12, 2, 2, 4, torch.float32)
    bad = v.detach().clone()
    bad[0, 6, 1, 2] = float("inf")
    bad.requires_grad_()
    fixed = v.detach().clone()
    fixed[0, 6, 1, 2] = 0.0
    fixed.requires_grad_()
    kwargs = dict(backend=backend, dropout_p=0.5, dropout_seed=SEED)
    got = attention(q, k, bad, P.causal(), **kwargs)
    want = attention(q, k, fixed, P.causal(), **kwargs)
    assert got[0, 6:, 1].isnan().all()
    assert torch.equal(got[0, :, 0], want[0, :, 0])
    assert torch.equal(got[0, :6, 1], want[0, :6, 1])
    d_got = torch.autograd.grad(got[0, :6].sum() + got[0, :, 0].sum(), (q, k))
    d_want = torch.autograd.grad(want[0, :6].sum() + want[0, :, 0].sum(), (q, k))
    for a, b in zip(d_got, d_want):
        torch.testing.assert_close(a, b)


def test_sdpa_on_cpu_draws_eager_attentions_mask():
    """No seed is drawn for ``sdpa``: its mask is the one ``F.dropout`` would draw in eager
    attention from the same generator state (what makes transformers' training reproducible)."""
    q, k, v = make_inputs(2, 9, 9, 4, 2, 8, torch.float32)
    torch.manual_seed(3)
    got = attention(q, k, v, P.causal(), backend="sdpa", dropout_p=0.4)
    torch.manual_seed(3)
    qh, kh, vh = q.transpose(1, 2), *(t.transpose(1, 2).repeat_interleave(2, 1) for t in (k, v))
    scores = (qh @ kh.transpose(-1, -2) * 8**-0.5).masked_fill(
        ~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf")
    )
    want = torch.nn.functional.dropout(torch.softmax(scores, -1), 0.4) @ vh
    torch.testing.assert_close(got, want.transpose(1, 2))
