"""Packed variable-length batches (cu_seqlens) == a loop over the sequences."""

from __future__ import annotations

import pytest
import torch

from headwise.ops.linear import linear_attention

LENGTHS = [0, 1, 7, 0, 12, 3]


def _packed(seed=0, dim=4, dim_v=3, heads=2):
    gen = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q, k = (torch.randn(total, heads, dim, generator=gen, dtype=torch.float64) * 0.5 for _ in "qk")
    v = torch.randn(total, heads, dim_v, generator=gen, dtype=torch.float64)
    s0 = torch.randn(len(LENGTHS), heads, dim, dim_v, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, s0, cu


@pytest.mark.parametrize("backend", ["chunk", "naive"])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("with_decay", [True, False])
def test_varlen_causal_equals_loop(backend, with_state, with_decay):
    q, k, v, s0, cu = _packed()
    lam = torch.tensor([0.6, 0.9], dtype=torch.float64, requires_grad=True) if with_decay else None
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    kwargs = {"decay": lam, "return_state": True, "backend": backend, "chunk_size": 4}
    o, state = linear_attention(
        *leaves[:3], cu_seqlens=cu, initial_state=leaves[3] if with_state else None, **kwargs
    )
    outs, states = [], []
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        init = leaves[3][n : n + 1] if with_state else None
        o_n, s_n = linear_attention(
            *(x[None, a:b] for x in leaves[:3]), initial_state=init, **kwargs
        )
        outs.append(o_n[0])
        states.append(s_n)
    torch.testing.assert_close(o, torch.cat(outs))
    torch.testing.assert_close(state, torch.cat(states))
    # gradients of the packed call == gradients of the loop
    params = leaves + ([lam] if with_decay else [])
    g_packed = torch.autograd.grad((o.sum() + state.square().sum()), params, allow_unused=True)
    loop_loss = torch.cat(outs).sum() + torch.cat(states).square().sum()
    g_loop = torch.autograd.grad(loop_loss, params, allow_unused=True)
    for a, b in zip(g_packed, g_loop, strict=True):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_decay", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_varlen_non_causal_equals_loop(with_decay, normalize):
    q, k, v, _, cu = _packed(seed=1)
    lam = torch.tensor([0.6, 0.9], dtype=torch.float64) if with_decay else None
    kwargs = {"decay": lam, "causal": False, "normalize": normalize, "feature_map": "elu+1"}
    o = linear_attention(q, k, v, cu_seqlens=cu, chunk_size=4, **kwargs)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = linear_attention(q[None, a:b], k[None, a:b], v[None, a:b], **kwargs)[0]
        torch.testing.assert_close(o[a:b], ref)


def test_varlen_all_empty():
    q = torch.zeros(0, 2, 4)
    o, s = linear_attention(
        q, q, torch.zeros(0, 2, 3), cu_seqlens=torch.tensor([0, 0, 0]), return_state=True
    )
    assert o.shape == (0, 2, 3)
    assert s.shape == (2, 2, 4, 3)
    assert not s.any()
