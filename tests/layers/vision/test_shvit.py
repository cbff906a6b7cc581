"""SingleHeadAttention: the non-attended channels reach the projection untouched; zero at init;
equals the explicit formula."""

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


def test_errors():
    with pytest.raises(ValueError, match="partial_dim"):
        SingleHeadAttention(8, partial_dim=9)


def _shsa_reference(m, x, training):
    """timm's SHSA (``shvit.py``) in plain tensor ops, channels-first: no BatchNorm/GroupNorm
    module and no layout-dependent kernel in the graph, so its gradients are autograd's own."""

    def batch_norm(t, conv_bn):
        bn = conv_bn.bn
        if training:
            mean = t.mean(dim=(0, 2, 3), keepdim=True)
            var = t.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        else:
            mean, var = (s[None, :, None, None] for s in (bn.running_mean, bn.running_var))
        scale = (bn.weight / (var.flatten() + bn.eps).sqrt())[None, :, None, None]
        return (t - mean) * scale + bn.bias[None, :, None, None]

    def conv_norm(t, conv_bn):
        return batch_norm(torch.einsum("oi,bihw->bohw", conv_bn.c.weight[:, :, 0, 0], t), conv_bn)

    batch, height, width, dim = x.shape
    img = x.permute(0, 3, 1, 2)
    x1, x2 = img.split([m.partial_dim, dim - m.partial_dim], dim=1)
    mean = x1.mean(dim=(1, 2, 3), keepdim=True)
    var = x1.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    weight, bias = (t[:, None, None] for t in (m.pre_norm.weight, m.pre_norm.bias))
    x1 = (x1 - mean) / (var + m.pre_norm.eps).sqrt() * weight + bias
    q, k, v = conv_norm(x1, m.qkv).flatten(2).split([m.qk_dim, m.qk_dim, m.partial_dim], dim=1)
    attn = (q.transpose(-2, -1) @ k * m.qk_dim**-0.5).softmax(dim=-1)
    x1 = (v @ attn.transpose(-2, -1)).reshape(batch, m.partial_dim, height, width)
    return conv_norm(torch.relu(torch.cat([x1, x2], dim=1)), m.proj[1]).permute(0, 2, 3, 1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batch", [1, 2])
def test_gradients_equal_shsa_math(batch, dtype, training):
    # issue 13 item 3: at batch 1, BatchNorm's CPU backward got a gradient with a
    # channels-last, size-1-batch stride and computed it wrongly (input, pre_norm, qkv ~100% off)
    torch.manual_seed(3)
    m = SingleHeadAttention(12, partial_dim=4, qk_dim=8).to(dtype).train(training)
    _randomise(m)
    with torch.no_grad():
        m.pre_norm.weight.uniform_(0.5, 1.5)
        m.pre_norm.bias.normal_()
    x = torch.randn(batch, 3, 5, 12, dtype=dtype, requires_grad=True)
    target = torch.randn(batch, 3, 5, 12, dtype=dtype)
    leaves = [x, *m.parameters()]
    got = torch.autograd.grad((m(x) * target).sum(), leaves)
    expected_out = _shsa_reference(m, x, training)
    expected = torch.autograd.grad((expected_out * target).sum(), leaves)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    names = ["x", *(name for name, _ in m.named_parameters())]
    torch.testing.assert_close(m(x), expected_out, **tol)
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b, **tol, msg=lambda msg, name=name: f"{name}: {msg}")
