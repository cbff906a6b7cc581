"""AggregatedAttention: equals a per-query loop (window with validity flags, λ, local and pooled
logits with the continuous bias, one softmax, learnable-token term); ConvGLU formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from headwise.layers.vision import AggregatedAttention, ConvGLU
from headwise.layers.vision.windows import neighborhood_windows


def _cpb(m, dy, dx, pre_h, pre_w):
    z = torch.stack([dy * 8 / (pre_h - 1), dx * 8 / (pre_w - 1)], -1)
    z = torch.sign(z) * torch.log2(1 + z.abs()) / 3
    return m.cpb_fc2(torch.relu(m.cpb_fc1(z)))  # (..., h)


def _oracle(m: AggregatedAttention, x: torch.Tensor) -> torch.Tensor:
    _, height, width, c = x.shape
    h, d, k = m.num_heads, m.head_dim, m.window_size
    hp, wp = m.pool_size(height, width)
    q = m.q(x[0]).reshape(height, width, h, d)
    kv = m.kv(x[0]).reshape(height, width, 2, h, d)
    reduced = F.gelu(m.sr(x.permute(0, 3, 1, 2)))
    pooled = m.norm(F.adaptive_avg_pool2d(reduced, (hp, wp))[0].flatten(1).T)
    kp, vp = m.kv(pooled).reshape(-1, 2, h, d).unbind(1)
    kp = F.normalize(kp, dim=-1)
    cy = F.adaptive_avg_pool1d(torch.arange(height, dtype=x.dtype)[None, None], hp)[0, 0]
    cx = F.adaptive_avg_pool1d(torch.arange(width, dtype=x.dtype)[None, None], wp)[0, 0]
    centres = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 2)
    out = torch.zeros(height, width, h, d, dtype=x.dtype)
    for y in range(height):
        for xx in range(width):
            qh = F.normalize(q[y, xx], dim=-1)  # (h, d)
            keys, values, valid = [], [], []
            for ty in range(k):
                for tx in range(k):
                    yy, xj = y + ty - k // 2, xx + tx - k // 2
                    ok = 0 <= yy < height and 0 <= xj < width
                    valid.append(ok)
                    keys.append(F.normalize(kv[yy, xj, 0], dim=-1) if ok else torch.zeros(h, d))
                    values.append(kv[yy, xj, 1] if ok else torch.zeros(h, d))
            keys, values = torch.stack(keys, 1), torch.stack(values, 1)  # (h, k², d)
            lam = math.log(sum(valid) + hp * wp)
            qs = (qh + m.query_embedding) * F.softplus(m.temperature)[:, None] * lam
            local = torch.einsum("hd,hjd->hj", qs, keys) + m.relative_pos_bias_local
            local[:, [not v for v in valid]] = float("-inf")
            bias = _cpb(m, y - centres[:, 0], xx - centres[:, 1], height, width).T  # (h, P)
            far = torch.einsum("hd,mhd->hm", qs, kp) + bias
            weights = torch.cat([local, far], -1).softmax(-1)
            a_loc, a_far = weights[:, : k * k], weights[:, k * k :]
            a_loc = a_loc + torch.einsum("hd,hdj->hj", qh, m.learnable_tokens) + m.learnable_bias
            out[y, xx] = torch.einsum("hj,hjd->hd", a_loc, values) + torch.einsum(
                "hm,mhd->hd", a_far, vp
            )
    return m.proj(out.reshape(1, height, width, c))


def _randomise(m):
    with torch.no_grad():
        m.learnable_bias.normal_(std=0.1)
        m.relative_pos_bias_local.normal_(std=0.3)
        m.cpb_fc2.weight.normal_(std=0.3)


def test_equals_per_query_loop():
    torch.manual_seed(0)
    m = AggregatedAttention(8, 2, window_size=3, sr_ratio=2).double()
    _randomise(m)
    x = torch.randn(1, 5, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), _oracle(m, x))


def test_weights_sum_to_one_without_learnable_tokens():
    torch.manual_seed(1)
    m = AggregatedAttention(8, 2, sr_ratio=2).double()
    _randomise(m)
    with torch.no_grad():
        m.learnable_tokens.zero_()
        m.learnable_bias.zero_()
        m.kv.weight[8:].zero_()  # every value (local and pooled) is the bias vector
        m.kv.bias[8:] = torch.arange(8.0)
        m.proj.weight.copy_(torch.eye(8))
        m.proj.bias.zero_()
    y = m(torch.randn(1, 5, 7, 8, dtype=torch.float64))
    torch.testing.assert_close(y, torch.arange(8.0, dtype=y.dtype).expand_as(y))


def test_length_scale_differs_at_corners():
    m = AggregatedAttention(8, 2, sr_ratio=2)
    _, valid = neighborhood_windows(torch.zeros(1, 5, 6, 1), (3, 3))
    counts = valid.sum(-1)
    assert counts[0, 0] == 4 and counts[0, 3] == 6 and counts[2, 2] == 9
    assert m.pool_size(5, 6) == (2, 3)


def test_odd_grid_forward_backward():
    torch.manual_seed(3)
    m = AggregatedAttention(16, 4, sr_ratio=4, pretrain_size=(14, 14))
    x = torch.randn(2, 9, 7, 16, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert m.query_embedding.grad is not None and m.learnable_tokens.grad is not None


def test_conv_glu_formula():
    torch.manual_seed(4)
    m = ConvGLU(6, 12).double()
    assert m.fc2.in_features == 8  # ⌊2·12/3⌋
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    gate, value = m.fc1(x).chunk(2, -1)
    conv = F.conv2d(gate.permute(0, 3, 1, 2), m.dwconv.weight, m.dwconv.bias, padding=1, groups=8)
    expected = m.fc2(F.gelu(conv.permute(0, 2, 3, 1)) * value)
    torch.testing.assert_close(m(x), expected)


def test_errors():
    with pytest.raises(ValueError, match="window_size"):
        AggregatedAttention(8, 2, window_size=4)
