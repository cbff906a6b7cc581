"""GaussianAdaptiveAttention: weights follow the product-of-Gaussians formula element by element."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.layers.gaussian import GaussianAdaptiveAttention


def _weight_by_hand(column, deltas, scales, eps=1e-8):
    """One head's chunk along the axis, scalar by scalar."""
    n = len(column)
    mean = sum(column) / n
    var = sum((c - mean) ** 2 for c in column) / (n - 1) + eps
    w = []
    for value in column:
        p = 1.0
        for delta, c in zip(deltas, scales):
            y = (value - mean - delta) / math.sqrt(var)
            p *= math.exp(-(y**2) / (2 * c**2)) / math.sqrt(2 * math.pi * c**2)
        w.append(p)
    total = max(sum(w), eps)
    return [p / total for p in w]


def test_weights_follow_gaussian_formula_with_remainder_chunk():
    torch.manual_seed(0)
    m = GaussianAdaptiveAttention(num_heads=2, num_gaussians=3).double()
    with torch.no_grad():
        m.mean_offsets.normal_(0, 0.3)
        # Narrow Gaussians can push sum(w) under eps, where the official floor stops the sum at 1.
        m.scales.uniform_(0.8, 1.5)
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)  # chunks of 3 and 4
    w = m.weights(x)
    for b in range(2):
        for e in range(3):
            col = x[b, :, e].tolist()
            expected = _weight_by_hand(col[:3], m.mean_offsets[0].tolist(), m.scales[0].tolist())
            expected += _weight_by_hand(col[3:], m.mean_offsets[1].tolist(), m.scales[1].tolist())
            torch.testing.assert_close(w[b, :, e], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(w[:, :3].sum(1), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(m(x), x * w)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.scales.grad).all()


def test_standard_normal_special_case_and_axis():
    m = GaussianAdaptiveAttention(num_heads=1, num_gaussians=1, axis=-1).double()
    with torch.no_grad():
        m.scales.fill_(1.0)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    z = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-8).sqrt()
    density = torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(m.weights(x), density / density.sum(-1, keepdim=True))


def test_padding_passes_through():
    torch.manual_seed(1)
    m = GaussianAdaptiveAttention(num_heads=1, num_gaussians=2, padding_value=0.0).double()
    x = torch.randn(1, 6, 2, dtype=torch.float64)
    x[0, 4:] = 0.0
    out = m(x)
    assert (out[0, 4:] == 0).all()
    # statistics: padding zeroed yet still counted, so the real rows use the length-6 mean/var
    plain = GaussianAdaptiveAttention(num_heads=1, num_gaussians=2).double()
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(out[0, :4], plain(x)[0, :4])


def test_errors():
    m = GaussianAdaptiveAttention(num_heads=4, num_gaussians=1)
    with pytest.raises(ValueError, match=r"every head needs >= 2 positions.*chunks \[1, 1, 1, 2\]"):
        m(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match=r"x must have an axis 1; got \(5,\)"):
        m(torch.randn(5))


def _official_multihead(x, layer):
    """gioannides/Gaussian-Adaptive-Attention ``MultiHeadGaussianAdaptiveAttention.forward``
    (``GaussianBlock.py``), rewritten on this layer's parameters."""
    axis, heads = layer.axis, layer.num_heads
    chunk_size = x.shape[axis] // heads
    outputs = []
    for i in range(heads):
        start = i * chunk_size
        end = start + chunk_size if i < heads - 1 else x.shape[axis]
        chunk = x.narrow(axis, start, end - start)
        mask = chunk != layer.padding_value
        masked = torch.where(mask, chunk, torch.zeros_like(chunk))
        mean = masked.mean(dim=axis, keepdim=True)
        var = masked.var(dim=axis, keepdim=True) + layer.eps
        mixture = 1
        for delta, c in zip(layer.mean_offsets[i], layer.scales[i]):
            y_norm = (chunk - (mean + delta)) / torch.sqrt(var)
            mixture = (
                mixture * torch.exp(-(y_norm**2) / (2.0 * c**2)) / torch.sqrt(2 * torch.pi * c**2)
            )
        mixture = mixture / mixture.sum(dim=axis, keepdim=True).clamp(min=layer.eps)
        outputs.append(torch.where(mask, chunk * mixture, chunk))
    return torch.cat(outputs, dim=axis)


@pytest.mark.parametrize("padding_value", [0.0, 0.5, -1e9])
def test_padding_matches_the_official_code(padding_value):
    """Issue 13: with padding_value set, the Gaussians must be evaluated on the raw x (official)
    with statistics from the zeroed x; headwise evaluated them on the zeroed x, which changed
    the normaliser of the real positions."""
    torch.manual_seed(2)
    m = GaussianAdaptiveAttention(num_heads=2, num_gaussians=2, padding_value=padding_value)
    with torch.no_grad():
        m.mean_offsets.normal_(0, 0.3)
    m = m.double()
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    x[0, 3:5] = padding_value
    x[1, 8:] = padding_value
    x[2, 0, 1] = padding_value
    torch.testing.assert_close(m(x), _official_multihead(x, m))
