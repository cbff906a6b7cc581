"""Every backend against the float64 oracle (FA3 rule) for every pattern: out, LSE and grads."""

from __future__ import annotations

import math

import pytest
import torch

import headwise.patterns as P
from conftest import assert_fa3_close, naive_attention
from headwise.ops.attention import REFERENCE_AUTO_LIMIT, attention, explain
from headwise.ops.attention.plan_cache import PlanCache
from headwise.ops.attention.reference import reference_attention

DTYPES = [torch.float32, torch.bfloat16]


def softcap(score, b, h, q_idx, kv_idx):
    return 5.0 * torch.tanh(score / 5.0)


def make_inputs(
    batch=2, q_len=37, kv_len=37, heads=4, kv_heads=2, dim=16, dtype=torch.float32, seed=0
):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    return (
        rand(batch, q_len, heads, dim),
        rand(batch, kv_len, kv_heads, dim),
        rand(batch, kv_len, kv_heads, dim),
    )


def check_against_oracle(backend, q, k, v, pattern=None, bias=None, score_mod=None, grads=True):
    """Run ``backend`` and compare out, LSE and grads of q, k, v (and bias) with the oracle."""
    dtype = q.dtype
    q_len, kv_len = q.shape[1], k.shape[1]
    lse_wanted = backend in ("blockwise", "reference", "native")
    result = attention(
        q, k, v, pattern, bias=bias, score_mod=score_mod, backend=backend, return_lse=lse_wanted
    )
    out, lse = result if lse_wanted else (result, None)
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    d64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    bias64 = bias.detach().double().requires_grad_(bias.requires_grad) if bias is not None else None
    oracle, oracle_lse = reference_attention(*d64, pattern, bias=bias64, score_mod=score_mod)
    mask = pattern.dense_mask(q_len, kv_len) if pattern is not None else None
    naive, naive_lse = naive_attention(q, k, v, mask, bias=bias, score_mod=score_mod)
    assert out.shape == (q.shape[0], q_len, q.shape[2], v.shape[3])
    assert out.dtype == dtype
    assert_fa3_close(out, naive, oracle, dtype, f"{backend} out")
    if lse is not None:
        assert_fa3_close(lse, naive_lse, oracle_lse, dtype, f"{backend} lse")
    if not grads:
        return
    grad = torch.randn_like(oracle)
    fast_grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    naive_grads = torch.autograd.grad(naive, leaves, grad.to(dtype))
    oracle_leaves = [t for t in (*d64, bias64) if t is not None and t.requires_grad]
    oracle_grads = torch.autograd.grad(oracle, oracle_leaves, grad)
    for name, f, n, o in zip("qkvb", fast_grads, naive_grads, oracle_grads):
        assert_fa3_close(f, n, o, dtype, f"{backend} d{name}", factor=3.0)


PATTERNS = {
    "none": None,
    "causal": P.causal(),
    "causal_top_left": P.causal("top_left"),
    "window": P.sliding_window(5),
    "window_bidir": P.sliding_window(4, 3),
    "window_sinks": P.sliding_window(6) | P.sinks(2),
    "strided_causal": P.strided(3, 1) & P.causal(),
    "documents": P.documents([10, 0, 1, 26], causal=True),
    "modality": P.modality_mutual([((3, 12), (12, 20))]),
    "block_sparse": P.block_sparse(torch.rand(3, 3) > 0.4, 16),
    "per_head": P.per_head(
        [P.causal(), P.sliding_window(3, 3), P.strided(4) | P.sinks(1), P.full()]
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("backend", ["blockwise", "native", "reference", "sdpa"])
def test_backend_matches_oracle(backend, name, dtype):
    pattern = PATTERNS[name]
    q, k, v = make_inputs(dtype=dtype)
    if backend == "sdpa" and name not in ("none", "causal", "causal_top_left"):
        with pytest.raises(ValueError, match="not full or plain causal"):
            attention(q, k, v, pattern, backend="sdpa")
        return
    check_against_oracle(backend, q, k, v, pattern)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "name", ["causal", "window_sinks", "documents", "per_head", "block_sparse"]
)
def test_blockwise_step_by_step_path_matches_oracle(monkeypatch, name, dtype):
    # On CPU blockwise runs PyTorch's fused kernel per query group; its step-by-step softmax
    # (used for score_mod, bias gradients, other devices) must agree on its own.
    import headwise.ops.attention.blockwise.fused as fused

    monkeypatch.setattr(fused, "FUSED", None)
    q, k, v = make_inputs(dtype=dtype)
    check_against_oracle("blockwise", q, k, v, PATTERNS[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["blockwise", "sdpa"])
@pytest.mark.parametrize("bias_shape", [(1, 4, 37, 37), (2, 1, 1, 37), (37, 37)])
def test_bias_and_its_gradient(backend, bias_shape, dtype):
    q, k, v = make_inputs(dtype=dtype)
    bias = torch.randn(bias_shape).to(dtype)
    bias[..., 3] = float("-inf")  # a key hidden by the bias
    bias.requires_grad_()
    check_against_oracle(
        backend, q, k, v, P.causal() if backend == "sdpa" else P.sliding_window(9), bias=bias
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_shape", [(1, 4, 37, 37), (2, 1, 1, 37), (37, 37), (2, 4, 1, 37)])
def test_native_takes_a_bias_without_gradient(bias_shape, dtype):
    q, k, v = make_inputs(dtype=dtype)
    bias = torch.randn(bias_shape).to(dtype)
    bias[..., 3] = float("-inf")  # a key hidden by the bias
    check_against_oracle("native", q, k, v, P.sliding_window(9) | P.sinks(2), bias=bias)


def test_native_bias_rows_of_large_negatives_are_uniform_like_pytorch():
    # transformers masks with finfo.min, not -inf: a row that is all finfo.min is a uniform
    # softmax in PyTorch (and the reference); -inf everywhere is an empty row (zeros)
    q, k, v = (t.detach() for t in make_inputs(batch=1))
    bias = torch.zeros(1, 1, 37, 37)
    bias[..., 5, :] = torch.finfo(torch.float32).min
    bias[..., 6, :] = float("-inf")
    out = attention(q, k, v, P.causal(), bias=bias, backend="native")
    ref = attention(q, k, v, P.causal(), bias=bias, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, 6] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_mod_softcap(dtype):
    q, k, v = make_inputs(dtype=dtype)
    check_against_oracle("blockwise", q, k, v, P.causal(), score_mod=softcap)


@pytest.mark.parametrize(
    "q_len,kv_len", [(1, 1), (1, 50), (50, 1), (65, 64), (64, 65), (129, 200), (200, 129)]
)
@pytest.mark.parametrize("backend", ["blockwise", "native", "sdpa"])
def test_odd_lengths_and_cross_attention(backend, q_len, kv_len):
    q, k, v = make_inputs(batch=1, q_len=q_len, kv_len=kv_len)
    check_against_oracle(backend, q, k, v, P.causal())
    if backend != "sdpa":
        check_against_oracle(backend, q, k, v, P.sliding_window(7, 2))


@pytest.mark.parametrize("dim", [8, 24, 64, 100, 128, 256])
def test_head_dims(dim):
    q, k, v = make_inputs(batch=1, q_len=33, kv_len=33, dim=dim)
    check_against_oracle("blockwise", q, k, v, P.sliding_window(8))
    check_against_oracle("native", q, k, v, P.sliding_window(8))
    check_against_oracle("sdpa", q, k, v, P.causal())


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios(group):
    q, k, v = make_inputs(heads=8, kv_heads=8 // group)
    per_head = P.per_head([P.causal(), P.sliding_window(2)] * 4)
    check_against_oracle("blockwise", q, k, v, per_head)
    check_against_oracle("native", q, k, v, per_head)
    check_against_oracle("sdpa", q, k, v, P.causal())


def test_value_dim_differs_from_head_dim():
    q, k, _ = make_inputs()
    v = torch.randn(2, 37, 2, 24, requires_grad=True)
    check_against_oracle("blockwise", q, k, v, P.causal())
    check_against_oracle("native", q, k, v, P.sliding_window(5))
    check_against_oracle("sdpa", q, k, v)


@pytest.mark.parametrize("backend", ["blockwise", "native", "reference", "sdpa"])
def test_rows_without_keys_are_zero_not_nan(backend):
    # bottom-right causal with Lq > Lk: the first Lq - Lk rows see nothing
    q, k, v = make_inputs(batch=1, q_len=20, kv_len=8)
    lse_wanted = backend != "sdpa"
    result = attention(q, k, v, P.causal(), backend=backend, return_lse=lse_wanted)
    out = result[0] if lse_wanted else result
    assert torch.all(out[:, :12] == 0) and not torch.isnan(out).any()
    if lse_wanted:
        assert torch.isneginf(result[1][:, :, :12]).all()
        assert torch.isfinite(result[1][:, :, 12:]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][:, :12] == 0)


def test_lse_gradient_flows():
    q, k, v = make_inputs()
    out, lse = attention(q, k, v, P.sliding_window(4), backend="blockwise", return_lse=True)
    ref_out, ref_lse = attention(q, k, v, P.sliding_window(4), backend="reference", return_lse=True)
    g_fast = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref_out.sum() + ref_lse.sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["blockwise", "native", "reference"])
@pytest.mark.parametrize("name", ["window_sinks", "documents", "per_head", "block_sparse"])
def test_masked_keys_cannot_influence_output(backend, name):
    pattern = PATTERNS[name]
    q, k, v = make_inputs()
    out = attention(q, k, v, pattern, backend=backend)
    mask = pattern.dense_mask(37, 37)  # (Hp, Lq, Lk)
    # A key hidden from every query of a head group can be changed freely.
    group = q.shape[2] // k.shape[2]
    seen = mask.expand(q.shape[2], -1, -1).reshape(k.shape[2], group, 37, 37).any(1).any(1)
    k2, v2 = k.detach().clone(), v.detach().clone()
    for h in range(k.shape[2]):
        hidden = ~seen[h]
        k2[:, hidden, h] = 1e4
        v2[:, hidden, h] = -1e4
    out2 = attention(q, k2, v2, pattern, backend=backend)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    # and gradients never reach keys no query sees
    grads = torch.autograd.grad(out.square().sum(), (k, v))
    for g in grads:
        for h in range(k.shape[2]):
            assert torch.all(g[:, ~seen[h], h] == 0)


@pytest.mark.parametrize("name", [n for n in PATTERNS if n != "none"])
def test_flex_forward_on_cpu_matches_oracle(name):
    # One compilation per pattern (a few seconds each on CPU): float32 only, no backward on CPU.
    q, k, v = make_inputs()
    with torch.no_grad():
        check_against_oracle("flex", q, k, v, PATTERNS[name], grads=False)


def test_flex_with_bias_and_score_mod_on_cpu():
    q, k, v = make_inputs(q_len=150, kv_len=150)
    bias = torch.randn(1, 4, 150, 150)
    with torch.no_grad():
        check_against_oracle("flex", q, k, v, P.documents([60, 0, 1, 89]), bias=bias, grads=False)
        check_against_oracle("flex", q, k, v, P.causal(), score_mod=softcap, grads=False)


def test_flex_call_returns_lse_like_the_reference():
    # The compiled kernel returns no LSE on CPU; the same call path through eager FlexAttention
    # checks how the LSE is requested and unpacked (what CUDA uses).
    from torch.nn.attention.flex_attention import flex_attention

    from headwise.ops.attention.backends import flex_call

    q, k, v = (t.detach() for t in make_inputs())
    pattern = P.sliding_window(5) | P.sinks(2)
    out, lse = flex_call(
        flex_attention, q, k, v, pattern, None, None, None, want_lse=True, block_size=16
    )
    ref_out, ref_lse = attention(q, k, v, pattern, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_flex_explains_its_cpu_limits():
    q, k, v = make_inputs()
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q, k, v, P.causal(), backend="flex")
    with torch.no_grad(), pytest.raises(ValueError, match="LSE"):
        attention(q, k, v, P.causal(), backend="flex", return_lse=True)


def test_score_mod_captured_tensors_get_gradients():
    q, k, v = make_inputs(batch=1, q_len=70, kv_len=70)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)
    table = torch.randn(4, 2 * 70 - 1, requires_grad=True)  # learnable relative-position bias

    def alibi_and_table(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs() + table[h, kv_idx - q_idx + 69]

    grads = {}
    for backend in ("blockwise", "reference"):
        out = attention(q, k, v, P.sliding_window(9), score_mod=alibi_and_table, backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), (slopes, table, q))
    assert torch.all(grads["reference"][0] != 0)
    for fast, ref in zip(grads["blockwise"], grads["reference"]):
        # slope gradients sum ~20k float32 terms: accumulation order shows at 1e-5
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------- the auto rule
def test_auto_picks_sdpa_for_dense_native_or_blockwise_for_sparse():
    q, k, v = make_inputs()
    assert explain(q, k, v).backend == "sdpa"
    assert explain(q, k, v, P.causal()).backend == "sdpa"
    choice = explain(q, k, v, P.sliding_window(4))
    assert choice.backend == "native"  # float32 on CPU, the kernel compiled (test_tiles.py)
    assert "not full or plain causal" in choice.reasons["sdpa"][0]
    choice = explain(q, k, v, P.causal(), return_lse=True)
    assert choice.backend == "native" and "log-sum-exp" in choice.reasons["sdpa"][0]
    assert "native" in str(choice)
    # what the native kernel does not take goes to blockwise, with the reason named
    bias = torch.randn(37, 37)
    assert explain(q, k, v, P.sliding_window(4), bias=bias).backend == "native"
    choice = explain(q, k, v, P.sliding_window(4), bias=bias.requires_grad_())
    assert choice.backend == "blockwise" and "bias gradient" in choice.reasons["native"][0]
    double = [t.detach().double() for t in (q, k, v)]
    choice = explain(*double, P.sliding_window(4))
    assert choice.backend == "blockwise" and "float32" in choice.reasons["native"][0]


def test_auto_never_silently_falls_back_to_reference_for_large_problems():
    side = math.isqrt(REFERENCE_AUTO_LIMIT) + 1
    q = torch.randn(1, side, 1, 8)
    with pytest.raises(ValueError, match="auto limit"):
        attention(q, q, q, P.sliding_window(3), backend=("sdpa", "reference"))
    small = torch.randn(1, 16, 1, 8)
    out = attention(small, small, small, P.sliding_window(3), backend=("sdpa", "reference"))
    assert out.shape == small.shape


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (
            ((2, 8, 64), (2, 8, 4, 16), (2, 8, 4, 16)),
            {},
            r"q must be \(B, L, H, D\); got shape \(2, 8, 64\)",
        ),
        (((2, 8, 4, 16), (3, 8, 4, 16), (3, 8, 4, 16)), {}, "batch size"),
        (((2, 8, 4, 16), (2, 8, 3, 16), (2, 8, 3, 16)), {}, "multiple of k/v heads"),
        (((2, 8, 4, 16), (2, 8, 4, 32), (2, 8, 4, 16)), {}, "head_dim"),
        (((2, 8, 4, 16), (2, 8, 4, 16), (2, 9, 4, 16)), {}, "length and heads"),
        (((2, 0, 4, 16), (2, 8, 4, 16), (2, 8, 4, 16)), {}, "empty"),
        (
            ((2, 8, 4, 16), (2, 8, 4, 16), (2, 8, 4, 16)),
            {"pattern": P.documents([3, 4])},
            "covers 7",
        ),
        (
            ((2, 8, 4, 16), (2, 8, 4, 16), (2, 8, 4, 16)),
            {"pattern": P.per_head([P.full()] * 2)},
            "per-head for 2",
        ),
        (
            ((2, 8, 4, 16), (2, 8, 4, 16), (2, 8, 4, 16)),
            {"bias": torch.zeros(3, 8, 8)},
            "broadcast",
        ),
        (((2, 8, 4, 16), (2, 8, 4, 16), (2, 8, 4, 16)), {"backend": "magic"}, "backend must be"),
    ],
)
def test_bad_input_raises_value_error(args, kwargs, match):
    q, k, v = (torch.randn(s) for s in args)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_dtype_and_device_mismatch_raise():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="one device"):
        attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="bias must be on"):
        attention(q, q, q, bias=torch.zeros(4, 4, device="meta"))


# ----------------------------------------------------------------- per-head heterogeneous
HETEROGENEOUS = P.per_head(
    [
        P.sliding_window(16),
        P.sliding_window(16) | P.sinks(4),
        P.strided(4, 1, block=64) & P.causal(),
        P.neighborhood((12, 25), (3, 5)),
        P.sliding_window(16),
        P.documents([100, 0, 200], causal=True),
        P.causal(),
        P.sliding_window(40, 40),
    ]
)


def test_heads_with_different_patterns_are_processed_separately():
    from headwise.ops.attention.blockwise import DEFAULT_BLOCK
    from headwise.ops.attention.blockwise.heads import group_heads

    groups = group_heads(HETEROGENEOUS, 300, 300, DEFAULT_BLOCK)
    assert groups is not None and len(groups) == 7
    assert groups[0][1] == (0, 4)


def test_each_head_equals_a_single_head_call_with_its_pattern():
    q, k, v = make_inputs(batch=1, q_len=300, kv_len=300, heads=8, kv_heads=4)
    out = attention(q, k, v, HETEROGENEOUS, backend="blockwise")
    for h, pattern in enumerate(HETEROGENEOUS.head_patterns()):
        kv = h // 2
        single = attention(
            q[:, :, h : h + 1],
            k[:, :, kv : kv + 1],
            v[:, :, kv : kv + 1],
            pattern,
            backend="reference",
        )
        torch.testing.assert_close(out[:, :, h : h + 1], single, atol=1e-5, rtol=1e-5)


def test_grouped_heads_keep_bias_score_mod_and_gradients_per_head():
    q, k, v = make_inputs(batch=1, q_len=300, kv_len=300, heads=8, kv_heads=4)
    bias = torch.randn(1, 8, 1, 300, requires_grad=True)
    slopes = torch.linspace(0.1, 0.8, 8, requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    results = {}
    for backend in ("blockwise", "reference"):
        out, lse = attention(
            q, k, v, HETEROGENEOUS, bias=bias, score_mod=alibi, backend=backend, return_lse=True
        )
        grads = torch.autograd.grad((out.square().sum() + lse.sum()), (q, k, v, bias, slopes))
        results[backend] = (out, lse, *grads)
    for fast, ref in zip(results["blockwise"], results["reference"]):
        torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)


def test_densities_of_a_per_head_stack_are_the_mean_of_its_heads():
    heads = HETEROGENEOUS.head_patterns()
    expected = sum(p.density(300, 300) for p in heads) / len(heads)
    assert HETEROGENEOUS.density(300, 300) == pytest.approx(expected)


# ----------------------------------------------------------------- batched runs and key panels
RUN_PATTERNS = {
    # (pattern, length, what the CPU plan must contain)
    "window": (P.sliding_window(20, 9), 203, "runs"),
    "causal_window": (P.sliding_window(24) & P.causal(), 150, "runs"),
    "neighborhood_2d_dilated": (
        P.neighborhood((12, 44), (5, 7), dilation=(1, 2)),
        528,
        "panels+runs",
    ),
    "neighborhood_3d_causal": (
        P.neighborhood((5, 6, 7), 3, causal=(True, False, False)),
        210,
        "panels+runs",
    ),
    "neighborhood_and_window": (P.neighborhood((16, 16), 5) & P.sliding_window(40), 256, "panels"),
    # rows with scattered key blocks: gathered back to back, equal counts batched
    "block_sparse_scattered": (
        P.block_sparse(torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.4, 32),
        256,
        "panels+runs",
    ),
    # a union may see keys outside a part's panel: it must not borrow the neighborhood's panels
    "neighborhood_or_sinks": (P.neighborhood((16, 16), 5) | P.sinks(3), 256, "no own panels"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", RUN_PATTERNS)
def test_batched_runs_and_gathered_panels_match_oracle(name, dtype):
    from headwise.ops.attention.blockwise import DEFAULT_BLOCK
    from headwise.ops.attention.blockwise.plan import Run, plan_for

    pattern, length, expected = RUN_PATTERNS[name]
    plan = plan_for(pattern, length, length, DEFAULT_BLOCK, "cpu")
    runs = [run for panel in plan for run in panel.runs if isinstance(run, Run)]
    gathered = [panel for panel in plan if panel.keys is not None]
    if expected == "runs":
        assert runs, "the plan should batch same-shaped groups"
    elif expected.startswith("panels"):
        assert gathered, "the plan should read tiles from gathered panels"
        assert runs or expected == "panels", "the plan should batch same-shaped tiles"
    else:  # the pattern itself names no panel (scattered key sets may still be gathered)
        assert all(keys is None for keys, _ in pattern.key_panels(length, length, DEFAULT_BLOCK))
    q, k, v = make_inputs(batch=2, q_len=length, kv_len=length, dtype=dtype)
    check_against_oracle("blockwise", q, k, v, pattern)
    if dtype == torch.float32:
        check_against_oracle("native", q, k, v, pattern)


def test_heads_not_evenly_spaced_are_copied_not_viewed():
    # heads [0, 1, 3] share a pattern: no strided view selects them, so they are index-copied
    pattern = P.per_head([P.sliding_window(2)] * 2 + [P.full(), P.sliding_window(2)])
    q, k, v = make_inputs(batch=2, q_len=200, kv_len=200, heads=4, kv_heads=2)
    from headwise.ops.attention.blockwise import DEFAULT_BLOCK
    from headwise.ops.attention.blockwise.heads import group_heads

    assert [heads for _, heads in group_heads(pattern, 200, 200, DEFAULT_BLOCK)] == [
        (0, 1, 3),
        (2,),
    ]
    check_against_oracle("blockwise", q, k, v, pattern)


@pytest.mark.parametrize("name", ["neighborhood_2d_dilated", "neighborhood_3d_causal"])
def test_step_by_step_path_reads_panel_keys_in_panel_order(monkeypatch, name):
    import headwise.ops.attention.blockwise.fused as fused

    monkeypatch.setattr(fused, "FUSED", None)
    pattern, length, _ = RUN_PATTERNS[name]
    q, k, v = make_inputs(batch=1, q_len=length, kv_len=length)
    check_against_oracle("blockwise", q, k, v, pattern)


SPLIT_HEADS = P.per_head([P.sliding_window(3), P.sliding_window(3), P.full(), P.causal()])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_shape", [None, (2, 4, 90, 90), (1, 1, 90, 90)])
def test_heads_split_by_pattern_with_bias_and_gqa(bias_shape, dtype):
    # heads 0 and 1 share a pattern and a K/V head (GQA 2:1): their dK, dV must add up
    from headwise.ops.attention.blockwise import DEFAULT_BLOCK
    from headwise.ops.attention.blockwise.heads import group_heads

    assert group_heads(SPLIT_HEADS, 90, 90, DEFAULT_BLOCK) is not None
    q, k, v = make_inputs(q_len=90, kv_len=90, dtype=dtype)
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape).to(dtype).requires_grad_()
    check_against_oracle("blockwise", q, k, v, SPLIT_HEADS, bias=bias)


def test_heads_split_by_pattern_renumber_score_mod_heads():
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    q, k, v = make_inputs(q_len=90, kv_len=90)
    out = attention(q, k, v, SPLIT_HEADS, score_mod=alibi, backend="blockwise")
    expected = attention(q, k, v, SPLIT_HEADS, score_mod=alibi, backend="reference")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (got,) = torch.autograd.grad(out.square().sum(), slopes)
    (want,) = torch.autograd.grad(expected.square().sum(), slopes)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_plans_stay_cached_for_many_patterns_within_the_mask_budget(monkeypatch):
    import headwise.ops.attention.blockwise.plan as blockwise

    cache = PlanCache(blockwise.PLANS.max_plans, blockwise.PLANS.max_size, blockwise.PLANS.size)
    monkeypatch.setattr(blockwise, "PLANS", cache)
    windows = [P.sliding_window(w) for w in range(1, 41)]  # 40 layers' worth of patterns
    first = [blockwise.plan_for(p, 100, 100, 32, "cpu") for p in windows]
    assert all(blockwise.plan_for(p, 100, 100, 32, "cpu") is f for p, f in zip(windows, first))
    # masks beyond the budget: the least recently used plans go first, the newest stays
    monkeypatch.setattr(cache, "max_size", 1)
    newest = blockwise.plan_for(P.sliding_window(50), 100, 100, 32, "cpu")
    assert list(cache) == [(P.sliding_window(50), 100, 100, 32, "cpu")]
    assert blockwise.plan_for(P.sliding_window(50), 100, 100, 32, "cpu") is newest
