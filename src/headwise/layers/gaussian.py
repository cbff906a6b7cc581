"""GAAM: multi-head Gaussian adaptive attention (Ioannides, Chadha, Elkins, "Gaussian Adaptive
Attention is All You Need", arXiv 2401.11143, later "Density Adaptive Attention" (DAAM);
official code gioannides/Gaussian-Adaptive-Attention).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianAdaptiveAttention(nn.Module):
    """Re-weights features by a learnable product of Gaussians of their standardised values.

    ``x`` is split along ``axis`` into ``H`` contiguous chunks (heads; the last one takes the
    remainder). For a chunk with ``G`` Gaussians, mean offsets ``delta`` ``(G,)`` and scales ``c``
    ``(G,)``, with statistics along ``axis``::

        mu = mean(x),  var = var(x) + eps                 (unbiased variance, as the official code)
        g_i = exp(-((x - mu - delta_i) / sqrt(var))^2 / (2 c_i^2)) / sqrt(2 pi c_i^2)
        w = prod_i g_i,   w <- w / max(sum(w), eps)       (sums to 1 along axis)
        y = x ⊙ w

    The official code calls ``prod_i g_i`` a mixture; it is a product (itself one Gaussian in the
    standardised value), and that is what is implemented. There is no Q·K product, so the layer
    does not go through :func:`headwise.attention`.

    Args:
        num_heads: ``H`` chunks along ``axis``; each must hold at least 2 positions (unbiased
            variance).
        num_gaussians: ``G`` per head.
        axis: the axis weighted and normalised (default 1: the sequence axis of ``(B, L, E)``).
        eps: variance floor and normaliser floor (official 1e-8).
        padding_value: positions of ``x`` equal to it are zeroed for the statistics (still
            counted in the mean/variance denominators, as the official code) and pass through
            unchanged.

    Parameters: ``mean_offsets`` ``(H, G)`` (init 0), ``scales`` ``(H, G)`` (init ``exp(N(0,1))``).
    Input of any rank > ``axis``; output has the same shape.
    """

    def __init__(
        self,
        num_heads: int,
        num_gaussians: int,
        *,
        axis: int = 1,
        eps: float = 1e-8,
        padding_value: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_heads", num_heads), ("num_gaussians", num_gaussians)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        self.num_heads, self.num_gaussians = num_heads, num_gaussians
        self.axis, self.eps, self.padding_value = axis, eps, padding_value
        self.mean_offsets = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.scales = nn.Parameter(torch.randn(num_heads, num_gaussians).exp())

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_gaussians={self.num_gaussians}, axis={self.axis}"

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weights ``w`` (same shape as ``x``), each head's chunk summing to 1 along axis."""
        if not isinstance(x, torch.Tensor) or not -x.dim() <= self.axis < x.dim():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have an axis {self.axis}; got {got}")
        size = x.shape[self.axis]
        chunk = size // self.num_heads
        sizes = [chunk] * (self.num_heads - 1) + [size - chunk * (self.num_heads - 1)]
        if min(sizes) < 2:
            raise ValueError(
                f"every head needs >= 2 positions along axis {self.axis} (unbiased variance); "
                f"got {size} positions for num_heads={self.num_heads}: chunks {sizes}"
            )
        real = None if self.padding_value is None else x != self.padding_value
        stats_x = x if real is None else x * real
        out = []
        for head, part in enumerate(stats_x.split(sizes, self.axis)):
            mean = part.mean(self.axis, keepdim=True)
            std = (part.var(self.axis, keepdim=True) + self.eps).sqrt()
            w = torch.ones_like(part)
            for delta, c in zip(self.mean_offsets[head], self.scales[head]):
                y = (part - mean - delta) / std
                w = w * torch.exp(-(y**2) / (2 * c**2)) / torch.sqrt(2 * math.pi * c**2)
            out.append(w / w.sum(self.axis, keepdim=True).clamp_min(self.eps))
        return torch.cat(out, self.axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` re-weighted by :meth:`weights`; padding positions pass through unchanged."""
        y = x * self.weights(x)
        if self.padding_value is None:
            return y
        return torch.where(x == self.padding_value, x, y)


__all__ = ["GaussianAdaptiveAttention"]
