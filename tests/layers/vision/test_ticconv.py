"""MSAConv: equals an F.unfold formulation (unmasked zero-padded neighbours, softmax over window
slots), with dilation and rectangular kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headwise.layers.vision import MSAConv


def _oracle(m: MSAConv, x: torch.Tensor) -> torch.Tensor:
    b, height, width, c = x.shape
    h, d = m.num_heads, c // m.num_heads
    kh, kw = m.kernel
    img = x.permute(0, 3, 1, 2)
    q, k, v = m.qkv(img).chunk(3, 1)
    pad = (m.dilation * (kh // 2), m.dilation * (kw // 2))

    def unfold(t):
        cols = F.unfold(t, (kh, kw), dilation=m.dilation, padding=pad)
        return cols.reshape(b, h, d, kh * kw, height * width)

    logits = (q.reshape(b, h, d, 1, -1) * unfold(k)).sum(2) * d**-0.5
    o = (logits.softmax(2)[:, :, None] * unfold(v)).sum(3).reshape(b, c, height, width)
    return F.relu(m.mlp(o + img)).permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    ("kernel", "dilation", "heads", "depthwise"),
    [(3, 1, 1, False), ((5, 1), 2, 2, False), ((1, 3), 1, 1, True), (3, 2, 4, False)],
)
def test_equals_unfold_oracle(kernel, dilation, heads, depthwise):
    torch.manual_seed(0)
    m = MSAConv(8, kernel_size=kernel, dilation=dilation, num_heads=heads, depthwise=depthwise)
    m = m.double()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), _oracle(m, x))


def test_errors():
    with pytest.raises(ValueError, match="kernel_size"):
        MSAConv(8, kernel_size=4)
    with pytest.raises(ValueError, match="depthwise"):
        MSAConv(8, 16, depthwise=True)
