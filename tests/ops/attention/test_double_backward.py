"""Second derivatives: correct (reference; sdpa on its math path) or a clear refusal (blockwise,
native, gathered; torch's own for SDPA's fused CPU kernel), never silently wrong."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from headwise._checks import Unsupported
from headwise.ops.attention import attention
from headwise.ops.attention.gather import gathered_attention


def inputs(dtype=torch.float64, length=6):
    # gradgradcheck differentiates numerically per entry: keep the problem tiny
    gen = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(1, length, heads, 3, generator=gen, dtype=dtype).requires_grad_()
        for heads in (2, 1, 1)
    )


def learnable_bias_mod():
    slopes = torch.tensor([0.5, -0.25], dtype=torch.float64, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    return score_mod


@pytest.mark.parametrize(
    "backend,pattern,extra",
    [
        ("reference", P.sliding_window(3), {}),
        ("reference", P.causal(), {"score_mod": "alibi"}),
        ("sdpa", P.causal(), {"bias": True}),
    ],
)
def test_backends_with_second_derivatives_pass_gradgradcheck(backend, pattern, extra):
    q, k, v = inputs()
    kwargs = {"backend": backend}
    if extra.get("score_mod"):
        kwargs["score_mod"] = learnable_bias_mod()
    tensors = [q, k, v]
    if extra.get("bias"):
        tensors.append(torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True))

    def fn(*args):
        bias = args[3] if len(args) > 3 else None
        return attention(*args[:3], pattern, bias=bias, **kwargs)

    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.parametrize(
    "backend,dtype,extra",
    [
        ("blockwise", torch.float64, {}),
        ("blockwise", torch.float32, {}),
        ("blockwise", torch.float64, {"score_mod": True}),
        ("blockwise", torch.float64, {"bias": True}),
        ("native", torch.float32, {}),
        ("auto", torch.float64, {}),  # auto picks blockwise for float64 sparse patterns
        ("auto", torch.float64, {"score_mod": True}),
    ],
)
def test_double_backward_is_refused_not_silently_wrong(backend, dtype, extra):
    q, k, v = inputs(dtype)
    bias = None
    if extra.get("bias"):
        bias = torch.randn(2, 6, 6, dtype=dtype, requires_grad=True)
    score_mod = learnable_bias_mod() if extra.get("score_mod") else None
    out = attention(q, k, v, P.sliding_window(3), bias=bias, score_mod=score_mod, backend=backend)
    # first derivatives still work
    torch.autograd.grad(out.square().sum(), (q, k, v), retain_graph=True)
    with pytest.raises(Unsupported, match="double backward"):
        (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        torch.autograd.grad(dq.sum(), k)


def test_auto_second_derivatives_are_right_or_refused():
    q, k, v = inputs()
    for pattern in (None, P.causal(), P.sliding_window(3), P.documents([2, 4])):
        try:
            ok = torch.autograd.gradgradcheck(
                lambda *t, p=pattern: attention(*t, p), (q, k, v), raise_exception=False
            )
        except (Unsupported, RuntimeError) as err:
            # headwise's refusal, or torch's own (SDPA's fused CPU kernel has no double backward)
            assert "double backward" in str(err) or "not implemented" in str(err)
            continue
        assert ok, f"auto gives wrong second derivatives for {pattern}"


def test_gathered_attention_refuses_double_backward():
    q, k, v = inputs()
    index = torch.arange(3).expand(1, 2, 6, 3).contiguous()
    out = gathered_attention(q, k, v, index)
    with pytest.raises(Unsupported, match="double backward"):
        (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        torch.autograd.grad(dq.sum(), k)
