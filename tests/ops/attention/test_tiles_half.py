"""The native kernel on bfloat16 and float16 inputs, read as they are (no float32 copy): it is
the float32 kernel on the widened inputs, bit for bit, with ``out`` rounded to nearest even (the
gradients are float32), and against the float64 oracle it errs no more than the half-precision
reference does, forward and backward, on odd shapes, GQA and strided inputs."""

from __future__ import annotations

import pytest
import torch
from test_attention import make_inputs

import headwise.patterns as P
from headwise.ops.attention import attention
from headwise.ops.attention.mods import relative_position_bias
from headwise.ops.attention.native import (
    available,
    native_attention,
    tiles_backward,
    tiles_forward,
)
from headwise.ops.attention.reference import reference_attention

pytestmark = pytest.mark.skipif(not available(), reason="native tile kernel not built")

HALF = [torch.bfloat16, torch.float16]
# name: (pattern, q_len, kv_len, heads, kv_heads, dim, dim_v)
CASES = {
    "neighborhood_2d_gqa": (P.neighborhood((7, 9), 5), 63, 63, 4, 2, 16, 16),
    "window_odd_dims": (P.sliding_window(5) | P.sinks(1), 37, 37, 3, 1, 5, 3),
    "causal_long_rows": (P.causal(), 9, 1100, 2, 2, 8, 4),  # tiles seeing > 1024 keys
    "per_head_groups": (
        P.per_head([P.sliding_window(3), P.causal(), P.full(), P.sliding_window(9)]),
        29,
        29,
        4,
        4,
        8,
        8,
    ),
}


def _inputs(case, dtype, seed=0, magnitude=1.0):
    pattern, q_len, kv_len, heads, kv_heads, dim, dim_v = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_len, heads, dim, generator=gen).to(dtype)
    k = torch.randn(2, kv_len, kv_heads, dim, generator=gen).to(dtype)
    v = (torch.randn(2, kv_len, kv_heads, dim_v, generator=gen) * magnitude).to(dtype)
    return pattern, q, k, v


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES)
def test_half_precision_is_the_float32_kernel_on_widened_inputs(case, dtype):
    pattern, q, k, v = _inputs(case, dtype)
    wide = [t.float() for t in (q, k, v)]
    out, lse = tiles_forward(q, k, v, pattern, 0.3)
    out32, lse32 = tiles_forward(*wide, pattern, 0.3)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(_bits(out), _bits(out32.to(dtype))), "out is rounded to nearest even"
    assert torch.equal(lse, lse32)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = [torch.zeros(t.shape) for t in (q, k, v)]
    grads32 = [torch.zeros(t.shape) for t in (q, k, v)]
    tiles_backward(grad_out, None, q, k, v, out, lse, pattern, 0.3, grads)
    tiles_backward(grad_out.float(), None, *wide, out.float(), lse, pattern, 0.3, grads32)
    for name, a, b in zip("qkv", grads, grads32):
        assert torch.equal(a, b), f"d{name}"
    # gradients of the inputs' dtype: dQ rounded as written, dK and dV summed in float32 per
    # K/V head and rounded once, so they are the float32 gradients rounded
    rounded = [torch.zeros(t.shape, dtype=dtype) for t in (q, k, v)]
    tiles_backward(grad_out, None, q, k, v, out, lse, pattern, 0.3, rounded)
    for name, a, b in zip("qkv", rounded, grads32):
        assert torch.equal(_bits(a), _bits(b.to(dtype))), f"d{name} in {dtype}"
    # ... and added to what the buffers hold
    start = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) for t in (k, v)]
    added = [rounded[0], *(t.to(dtype) for t in start)]
    tiles_backward(grad_out, None, q, k, v, out, lse, pattern, 0.3, added)
    for name, a, b, c in zip("kv", added[1:], start, grads32[1:]):
        expected = (b.to(dtype).float() + c).to(dtype)
        assert torch.equal(_bits(a), _bits(expected)), f"d{name} added in {dtype}"


@pytest.mark.parametrize("magnitude", [1e-6, 3e-5, 6e4])
def test_float16_subnormals_and_large_values_round_like_torch(magnitude):
    # v's magnitude puts out among float16's subnormals (below 6.1e-5) or near its largest
    # finite value (65504): widening and rounding both cross those ranges
    pattern, q, k, v = _inputs("window_odd_dims", torch.float16, magnitude=magnitude)
    out, _ = tiles_forward(q, k, v, pattern, 0.3)
    out32, _ = tiles_forward(q.float(), k.float(), v.float(), pattern, 0.3)
    assert torch.equal(_bits(out), _bits(out32.to(torch.float16)))


@pytest.mark.parametrize("dim", [16, 32, 20])
def test_bfloat16_rows_round_ties_and_specials_like_torch(dim):
    # q = 0: each query weighs the two keys of its document alike, so out = (v1 + v2) / 2, a tie
    # between two bfloat16 numbers when v2 is v1's neighbour; plus inf, NaN, the largest finite
    # and subnormal values (rows of 16 or 32 are written a vector at once, 20 a vector and a
    # tail)
    pairs = torch.randn(40, dim, generator=torch.Generator().manual_seed(4)).bfloat16()
    neighbour = (pairs.view(torch.int16) + 1).view(torch.bfloat16)
    v = torch.stack([pairs, neighbour], 1).view(1, 80, 1, dim)
    specials = [float("inf"), float("-inf"), float("nan"), 3.3895e38, -3.3895e38, 1e-40]
    for row, value in enumerate(specials):
        v[0, 2 * row, 0, row % dim] = value
    q = torch.zeros(1, 80, 1, dim, dtype=torch.bfloat16)
    k = torch.randn(1, 80, 1, dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    pattern = P.documents([2] * 40, causal=False)
    out, _ = tiles_forward(q, k, v, pattern, 0.3)
    out32, _ = tiles_forward(q.float(), k.float(), v.float(), pattern, 0.3)
    nan = out.isnan()  # (a tile's hidden inf weighs 0 * inf in its other lanes; NaN bits vary)
    assert torch.equal(nan, out32.isnan()) and nan.sum() < nan.numel() / 4
    assert torch.equal(_bits(out[~nan]), _bits(out32[~nan].bfloat16()))
    ties = (_bits(out32[~nan]) & 0xFFFF) == 0x8000
    assert out.isinf().sum() >= 2 and ties.sum() > 100


def _oracle_error(backend_out, oracle):
    return [(a.double() - b).abs().max().item() for a, b in zip(backend_out, oracle)]


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_errs_no_more_than_the_half_reference(dtype):
    # a 2-D neighborhood with its relative-position table, GQA, odd sizes: out and every
    # gradient (table included) against the float64 oracle on the same half-precision inputs,
    # within 2x the reference's own error in that dtype (the kernel rounds only out)
    pattern = P.neighborhood((7, 9), (5, 3))
    q, k, v = make_inputs(q_len=63, kv_len=63, heads=4, kv_heads=2, dim=12, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    table = (torch.randn(4, 9, 5, generator=gen) * 0.5).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 63, 4, 12, generator=gen).to(dtype)

    def run(fn, tensors, tab):
        out, _ = fn(*tensors, pattern, scale=0.3, score_mod=relative_position_bias(pattern, tab))
        return out, *torch.autograd.grad(out, (*tensors, tab), grad_out.to(out.dtype))

    oracle = run(
        reference_attention,
        [t.detach().double().requires_grad_() for t in (q, k, v)],
        table.detach().double().requires_grad_(),
    )
    native = run(native_attention, (q, k, v), table)
    assert all(t.dtype == dtype for t in native)
    half_reference = run(reference_attention, (q, k, v), table)
    for name, mine, theirs in zip(
        ("out", "dq", "dk", "dv", "d table"),
        _oracle_error(native, oracle),
        _oracle_error(half_reference, oracle),
    ):
        assert mine <= 2 * theirs + 1e-6, f"{name}: {mine} vs the half reference's {theirs}"


def test_strided_half_inputs():
    # q, k, v as views of one fused projection (no stride is contiguous but the last), and a
    # last dim that is strided (copied by the wrapper): the same bits as the contiguous call
    pattern = P.neighborhood((6, 7), 3) | P.sinks(1)
    gen = torch.Generator().manual_seed(2)
    fused = torch.randn(2, 42, 3, 4, 8, generator=gen).to(torch.bfloat16)
    q, k, v = fused.unbind(2)
    expected, lse = tiles_forward(*(t.contiguous() for t in (q, k, v)), pattern, 0.25)
    out, lse_strided = tiles_forward(q, k, v, pattern, 0.25)
    assert torch.equal(_bits(out), _bits(expected)) and torch.equal(lse, lse_strided)
    transposed = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    out, _ = tiles_forward(q, k, transposed, pattern, 0.25)
    assert torch.equal(_bits(out), _bits(expected))
    into = torch.zeros(2, 42, 8, 4, dtype=torch.bfloat16).transpose(-1, -2)  # strided out
    tiles_forward(q, k, v, pattern, 0.25, out=(into, torch.empty(2, 4, 42)))
    assert torch.equal(_bits(into), _bits(expected))


def test_the_backend_keeps_the_dtype_and_mixed_dtypes_are_refused():
    q, k, v = make_inputs(dtype=torch.bfloat16)
    out = attention(q, k, v, P.sliding_window(5), backend="native")
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"k must be a bfloat16 CPU tensor; got torch.float32"):
        tiles_forward(q.detach(), k.detach().float(), v.detach(), P.sliding_window(5), 0.25)
    with pytest.raises(ValueError, match=r"q must be a float32, bfloat16 or float16 CPU tensor"):
        tiles_forward(q.detach().double(), k, v, P.sliding_window(5), 0.25)
