"""LightningAttention: equals a hand-written TransNormerLLM loop; causal; step == forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headwise.layers.lightning import LightningAttention, srms_norm
from headwise.ops.linear import tnl_decay


def _layer(**kwargs):
    torch.manual_seed(0)
    return LightningAttention(16, 4, layer_idx=1, num_layers=4, **kwargs).double()


def test_layer_equals_hand_written_loop():
    layer = _layer(chunk_size=4)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    w_q, w_k, w_v, w_u = layer.qkvu_proj.weight.chunk(4, dim=0)
    lam = tnl_decay(4, 1, 4).double()
    q, k = F.silu(x @ w_q.T).view(2, 11, 4, 4), F.silu(x @ w_k.T).view(2, 11, 4, 4)
    v, u = (x @ w_v.T).view(2, 11, 4, 4), x @ w_u.T
    state = torch.zeros(2, 4, 4, 4, dtype=torch.float64)
    outs = []
    for t in range(11):
        state = lam[:, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t], state).reshape(2, 16))
    o = torch.stack(outs, dim=1)
    o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + 1e-6)
    expected = (u * o) @ layer.out_proj.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_causal_and_step_decoding_equals_forward():
    layer = _layer()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(layer(x2)[:, :6], y[:, :6])
    y_pre, state = layer(x[:, :4], return_state=True)
    outs = [y_pre]
    for t in range(4, 9):
        y_t, state = layer.step(x[:, t], state)
        outs.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(outs, dim=1), y)


def test_decay_schedule_and_srms_norm():
    layer = _layer().bfloat16()
    # the decay buffer stays float32 (half precision would round late-layer decays to 1)
    torch.testing.assert_close(layer.decay, tnl_decay(4, 1, 4))
    assert bool((layer.decay > 0).all() and (layer.decay < 1).all())
    x = torch.randn(3, 8)
    torch.testing.assert_close(srms_norm(x).square().mean(-1), torch.ones(3), atol=1e-5, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        LightningAttention(10, 4)
    with pytest.raises(ValueError, match=r"num_heads must be an integer >= 1; got 0"):
        LightningAttention(16, 0)
    layer = _layer()
    with pytest.raises(ValueError, match=r"x must be \(B, L, 16\); got \(2, 5, 8\)"):
        layer(torch.randn(2, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be \(B, 16\)"):
        layer.step(torch.randn(2, 1, 16, dtype=torch.float64))
