"""Shared helpers for the linear-attention tests: random inputs and a forward+backward runner."""

from __future__ import annotations

import torch

from headwise.ops.linear import linear_attention


def make_inputs(
    batch=2, length=37, heads=3, dim=8, dim_v=6, seed=0, state=True, decay=True, scale=0.5
):
    """Float64 ``q, k, v`` (scaled so sums over the length stay O(1)), decay and initial state."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k = rand(batch, length, heads, dim) * scale, rand(batch, length, heads, dim) * scale
    v = rand(batch, length, heads, dim_v)
    # Spread decays over (0.3, 1]: fast-forgetting heads and one head with no decay at all.
    lam = torch.linspace(0.3, 1.0, heads, dtype=torch.float64) if decay else None
    s0 = rand(batch, heads, dim, dim_v) if state else None
    return q, k, v, lam, s0


def run(inputs, dtype, backend, seed=1, **kwargs):
    """Forward and backward through ``linear_attention``: returns ``{name: tensor}``.

    q, k, v are cast to ``dtype``; decay and state to float32 (float64 for the oracle). Upstream
    gradients are fixed random tensors, so every backend sees the same ones.
    """
    q, k, v, lam, s0 = inputs
    side = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {
        "q": q.to(dtype).requires_grad_(),
        "k": k.to(dtype).requires_grad_(),
        "v": v.to(dtype).requires_grad_(),
    }
    if lam is not None:
        leaves["decay"] = lam.to(side).requires_grad_()
    if s0 is not None:
        leaves["initial_state"] = s0.to(side).requires_grad_()
    causal = kwargs.get("causal", True)
    call = {"decay": leaves.get("decay"), "backend": backend, **kwargs}
    if causal:
        call.update(initial_state=leaves.get("initial_state"), return_state=True)
    out = linear_attention(leaves["q"], leaves["k"], leaves["v"], **call)
    o, state = out if causal else (out, None)
    gen = torch.Generator().manual_seed(seed)
    grad_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    outputs, grads = [o], [grad_o]
    result = {"o": o}
    if state is not None:
        grad_s = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
        outputs.append(state)
        grads.append(grad_s)
        result["state"] = state
    names = list(leaves)
    dx = torch.autograd.grad(outputs, [leaves[n] for n in names], grads, allow_unused=True)
    result.update({f"d{n}": g for n, g in zip(names, dx, strict=True) if g is not None})
    return result
