"""SpectralGating: equals a circular depthwise convolution with the inverse-FFT kernel."""

from __future__ import annotations

import pytest
import torch

from headwise.layers.vision import SpectralGating


@pytest.mark.parametrize("size", [(5, 7), (4, 6)])
def test_equals_circular_depthwise_convolution(size):
    torch.manual_seed(0)
    height, width = size
    m = SpectralGating(3, size).double()
    with torch.no_grad():
        m.complex_weight.normal_()
    x = torch.randn(2, height, width, 3, dtype=torch.float64)
    kernel = m.spatial_kernel()  # (H, W, C)
    expected = torch.zeros_like(x)
    for u in range(height):
        for v in range(width):
            expected += kernel[u, v] * torch.roll(x, shifts=(u, v), dims=(1, 2))
    torch.testing.assert_close(m(x), expected)


def test_hermitian_half_of_even_width_edge_column_is_inert():
    torch.manual_seed(1)
    m = SpectralGating(2, (4, 6)).double()
    x = torch.randn(1, 4, 6, 2, dtype=torch.float64)
    y = m(x)
    with torch.no_grad():
        w = torch.view_as_complex(m.complex_weight)
        mirror = -torch.arange(4) % 4  # frequency -u along H
        for col in (0, 3):  # w = 0 and w = W/2: only the Hermitian part along H matters
            w[:, col] = 0.5 * (w[:, col] + w[mirror, col].conj())
    torch.testing.assert_close(m(x), y)


def test_tokens_backward_and_errors():
    m = SpectralGating(4, (3, 5))
    x = torch.randn(2, 15, 4, requires_grad=True)
    m(x, size=(3, 5)).square().sum().backward()
    assert torch.isfinite(x.grad).all() and m.complex_weight.grad is not None
    with pytest.raises(ValueError, match="size-locked"):
        m(torch.randn(2, 5, 3, 4))
