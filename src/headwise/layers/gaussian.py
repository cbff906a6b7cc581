"""GAAM: multi-head Gaussian adaptive attention (Ioannides, Chadha, Elkins, "Gaussian Adaptive
Attention is All You Need", arXiv 2401.11143, later "Density Adaptive Attention" (DAAM);
official code gioannides/Gaussian-Adaptive-Attention).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, check_int, check_real
from headwise.layers._init import check_input


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
        axis: the axis weighted and normalized (default 1: the sequence axis of ``(B, L, E)``).
        eps: variance floor and normalizer floor (official 1e-8).
        padding_value: positions of ``x`` equal to it are zeroed for the statistics ``mu`` and
            ``var`` (still counted in their denominators) and pass through unchanged. As in the
            official code the Gaussians are evaluated on the raw ``x``, padding included, so
            padding positions still count in the normalizer ``sum(w)`` (with a padding value far
            from the data, e.g. -1e9, their weight is 0).

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
        num_heads = check_int("num_heads", num_heads, minimum=1)
        num_gaussians = check_int("num_gaussians", num_gaussians, minimum=1)
        axis = check_int("axis", axis)
        eps = check_real("eps", eps, positive=True)
        if padding_value is not None and (
            isinstance(padding_value, bool) or not isinstance(padding_value, numbers.Real)
        ):
            raise ArgumentTypeError(
                f"padding_value must be a number or None; got {padding_value!r}"
            )
        if padding_value is not None and math.isnan(padding_value):
            raise ValueError("padding_value must not be NaN (NaN equals nothing); got nan")
        self.num_heads, self.num_gaussians = num_heads, num_gaussians
        self.axis, self.eps, self.padding_value = axis, eps, padding_value
        self.mean_offsets = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.scales = nn.Parameter(torch.empty(num_heads, num_gaussians))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``delta = 0``, ``c = exp(N(0, 1))`` (official init)."""
        with torch.no_grad():
            self.mean_offsets.zero_()
            self.scales.normal_().exp_()

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
        check_input("x", x, self)
        stats_x = x
        if self.padding_value is not None:
            stats_x = torch.where(x == self.padding_value, torch.zeros_like(x), x)
        out = []
        parts = zip(x.split(sizes, self.axis), stats_x.split(sizes, self.axis))
        for head, (part, stats) in enumerate(parts):
            mean = stats.mean(self.axis, keepdim=True)
            std = (stats.var(self.axis, keepdim=True) + self.eps).sqrt()
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
