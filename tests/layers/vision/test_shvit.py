"""SingleHeadAttention: the non-attended channels reach the projection untouched; zero at init;
equals the explicit formula; fast == reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headwise.layers.vision import SingleHeadAttention


def _randomise(m):
    with torch.no_grad():
        for bn in (m.qkv.bn, m.proj[1].bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)


def test_non_attended_channels_untouched():
    torch.manual_seed(0)
    m = SingleHeadAttention(16, partial_dim=4).double().eval()
    _randomise(m)
    seen = {}
    m.proj.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    m(x)
    first = seen["x"]
    torch.testing.assert_close(first[:, 4:], x.permute(0, 3, 1, 2)[:, 4:])
    changed = x.clone()
    changed[..., 4:] = torch.randn_like(changed[..., 4:])
    m(changed)
    # the attended part does not see the passed-through channels
    torch.testing.assert_close(seen["x"][:, :4], first[:, :4])


def test_zero_at_init():
    m = SingleHeadAttention(16)
    y = m(torch.randn(2, 4, 4, 16))
    assert y.abs().max() == 0


def test_equals_explicit_formula():
    torch.manual_seed(1)
    m = SingleHeadAttention(12, partial_dim=4, qk_dim=8).double().eval()
    _randomise(m)
    x = torch.randn(2, 3, 5, 12, dtype=torch.float64)
    img = x.permute(0, 3, 1, 2)
    x1, x2 = img[:, :4], img[:, 4:]
    qkv = m.qkv(F.group_norm(x1, 1, m.pre_norm.weight, m.pre_norm.bias)).flatten(2)
    q, k, v = qkv.split([8, 8, 4], dim=1)  # (B, ., N)
    attn = (q.transpose(1, 2) @ k * 8**-0.5).softmax(-1)
    o = (v @ attn.transpose(1, 2)).reshape(2, 4, 3, 5)
    expected = m.proj[1](torch.relu(torch.cat([o, x2], 1))).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), expected)


def test_odd_grid_fast_path_equals_reference():
    torch.manual_seed(2)
    m = SingleHeadAttention(16, partial_dim=4)
    with torch.no_grad():
        m.proj[1].bn.weight.fill_(1.0)
    x = torch.randn(2, 5, 7, 16)
    results = []
    for backend in ("auto", "reference"):
        m.backend = backend
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        results.append((y, xi.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="partial_dim"):
        SingleHeadAttention(8, partial_dim=9)
