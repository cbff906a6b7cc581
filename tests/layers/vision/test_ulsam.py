"""SubspaceAttention: output is F·(1 + A) with one spatial softmax map per subspace."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headwise.layers.vision import SubspaceAttention


def _per_group_maps(m: SubspaceAttention, img: torch.Tensor) -> torch.Tensor:
    """Each subspace with its own parameters, as in the paper (eval mode)."""
    g, width = m.num_splits, m.dim // m.num_splits
    maps = []
    for n in range(g):
        sl = slice(n * width, (n + 1) * width)
        a = F.conv2d(img[:, sl], m.dwconv.weight[sl], m.dwconv.bias[sl], groups=width)
        a = F.relu(F.batch_norm(a, m.bn_dw.running_mean[sl], m.bn_dw.running_var[sl],
                                m.bn_dw.weight[sl], m.bn_dw.bias[sl], eps=m.bn_dw.eps))  # fmt: skip
        a = F.max_pool2d(a, 3, 1, 1)
        a = F.conv2d(a, m.pwconv.weight[n : n + 1], m.pwconv.bias[n : n + 1])
        a = F.relu(F.batch_norm(a, m.bn_pw.running_mean[n : n + 1], m.bn_pw.running_var[n : n + 1],
                                m.bn_pw.weight[n : n + 1], m.bn_pw.bias[n : n + 1],
                                eps=m.bn_pw.eps))  # fmt: skip
        maps.append(a.flatten(1).softmax(-1).reshape(a.shape))
    return torch.cat(maps, 1)


def test_output_is_f_times_one_plus_a():
    torch.manual_seed(0)
    m = SubspaceAttention(12, 3).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        m.bn_pw.running_mean.normal_()
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    img = x.permute(0, 3, 1, 2)
    maps = _per_group_maps(m, img)
    torch.testing.assert_close(m.attention_maps(img), maps)
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(2, 3, dtype=torch.float64))
    expected = img * (1 + maps.repeat_interleave(4, dim=1))
    torch.testing.assert_close(m(x), expected.permute(0, 2, 3, 1))


def test_constant_logits_give_uniform_map():
    m = SubspaceAttention(8, 2)  # training mode: a constant map normalises to 0 -> uniform
    with torch.no_grad():
        m.pwconv.weight.zero_()
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, x * (1 + 1 / 15))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert m.bn_dw.momentum == 0.9  # the official (PyTorch-semantics) value
