"""SpectFormer spectral gating: a learnable filter multiplied into the 2-D Fourier spectrum
(GFNet-style global filter), the frequency-domain token mixer of SpectFormer's first blocks.

Patro, Namboodiri, Agneeswaran, "SpectFormer: Frequency and Attention is what you need in a
Vision Transformer" (WACV 2025); official code badripatro/SpectFormers.
"""

from __future__ import annotations

import torch
from torch import nn

from headwise.layers.vision._common import check_pair, check_positive, from_map, to_map


class SpectralGating(nn.Module):
    """Spectral gating network, size-locked to one ``(H, W)``::

        X = rfft2(x, norm="ortho")                (B, H, ⌊W/2⌋+1, C), complex
        y = irfft2(X ⊙ K, s=(H, W), norm="ortho")  K ∈ ℂ^{H x (⌊W/2⌋+1) x C}, learnable

    Equivalently a per-channel *circular* convolution over the whole map with the spatial kernel
    ``irfft2(K, s=(H, W))`` (torch's default normalization). ``K`` is stored as a real
    ``(H, ⌊W/2⌋+1, C, 2)`` tensor, both parts initialized ``0.02·randn``. The FFT runs in at
    least float32 (AMP safety) and the output is cast back to the input dtype.

    Args:
        dim: channels ``C``.
        size: ``(H, W)`` of the feature map the filter is locked to (SpectFormer: 14x14 vanilla;
            56x56 and 28x28 in hierarchical stages 1-2 at 224²).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(self, dim: int, size: tuple[int, int]) -> None:
        super().__init__()
        check_positive("dim", dim)
        if isinstance(size, int):
            raise ValueError(f"size must be (H, W); got {size!r}")
        height, width = check_pair("size", size)
        self.dim, self.size = dim, (height, width)
        self.complex_weight = nn.Parameter(torch.empty(height, width // 2 + 1, dim, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Both parts of ``K`` ``0.02·randn``."""
        nn.init.normal_(self.complex_weight, std=0.02)

    def spatial_kernel(self) -> torch.Tensor:
        """The equivalent circular-convolution kernel ``(H, W, C)``."""
        weight = torch.view_as_complex(self.complex_weight)
        return torch.fft.irfft2(weight, s=self.size, dim=(0, 1))

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(x, size, self.dim)
        if tuple(feature_map.shape[1:3]) != self.size:
            raise ValueError(
                f"x must be a {self.size[0]}x{self.size[1]} map (the filter is size-locked); "
                f"got {tuple(x.shape)}"
            )
        compute = torch.promote_types(feature_map.dtype, torch.float32)
        spectrum = torch.fft.rfft2(feature_map.to(compute), dim=(1, 2), norm="ortho")
        spectrum = spectrum * torch.view_as_complex(self.complex_weight)
        y = torch.fft.irfft2(spectrum, s=self.size, dim=(1, 2), norm="ortho")
        return from_map(y.to(x.dtype), tokens)
