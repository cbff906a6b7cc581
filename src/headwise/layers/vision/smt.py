"""SMT scale-aware modulation: multi-head mixed convolution (one kernel size per head), a
scale-aware aggregation across heads, and modulation of a value projection.

Lin et al., "Scale-Aware Modulation Meet Transformer" (ICCV 2023); official code AFeng-x/SMT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_bool
from headwise.layers._init import (
    FanOutConv2d,
    TruncNormalLinear,
    check_input,
    reset_submodules,
)
from headwise.layers.vision._common import (
    BatchNorm2d,
    check_divisible,
    check_positive,
    from_map,
    to_map,
)


class ScaleAwareModulation(nn.Module):
    """SMT's SAM mixer (the ``ca_attention = 1`` branch).

    With ``h_c`` heads of ``C/h_c`` channels::

        v, s = x W_v, x W_s
        MHMC:  head i of s -> depthwise conv k_i x k_i, k_i = 3 + 2i (3, 5, 7, 9)
        SAA:   interleave heads (channel j·h_c + i = channel j of head i), then
               M = Conv1x1(GELU(BN(Conv1x1_{groups = C/h_c}(s, C -> e·C))), e·C -> C)
        y      = W_o (M ⊙ v)

    The interleave puts one channel of every head (every scale) into each group of the grouped
    1x1 conv; without it each group would see a single scale. Init: Linear trunc-normal(0.02),
    convs normal(std ``√(2/fan_out)``).

    Args:
        dim: channels ``C`` (``C % h_c == 0``).
        ca_num_heads: ``h_c`` (4 in SMT).
        expand_ratio: ``e`` (2 in SMT).
        qkv_bias: bias in the v/s projections (True in the SMT configs).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(
        self, dim: int, ca_num_heads: int = 4, *, expand_ratio: int = 2, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("ca_num_heads", ca_num_heads)
        check_positive("expand_ratio", expand_ratio)
        check_divisible("dim", dim, "ca_num_heads", ca_num_heads)
        check_bool("qkv_bias", qkv_bias)
        self.dim, self.heads = dim, ca_num_heads
        split = dim // ca_num_heads
        self.v = TruncNormalLinear(dim, dim, bias=qkv_bias)
        self.s = TruncNormalLinear(dim, dim, bias=qkv_bias)
        self.local_conv = nn.ModuleList(
            FanOutConv2d(split, split, 3 + 2 * i, padding=1 + i, groups=split)
            for i in range(ca_num_heads)
        )
        self.proj0 = FanOutConv2d(dim, dim * expand_ratio, 1, groups=split)
        self.bn = BatchNorm2d(dim * expand_ratio)
        self.proj1 = FanOutConv2d(dim * expand_ratio, dim, 1)
        self.proj = TruncNormalLinear(dim, dim)

    def reset_parameters(self) -> None:
        """The init above (BatchNorm at its default)."""
        reset_submodules(self)

    def modulator(self, s: torch.Tensor) -> torch.Tensor:
        """``M`` for the channels-first ``s: (B, C, H, W)``."""
        batch, _, height, width = s.shape
        heads = s.chunk(self.heads, dim=1)
        mixed = torch.stack([conv(t) for conv, t in zip(self.local_conv, heads)], dim=2)
        # (B, C/h_c, h_c, H, W): channel j of head i lands at j·h_c + i
        mixed = mixed.reshape(batch, self.dim, height, width)
        return self.proj1(F.gelu(self.bn(self.proj0(mixed))))

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        s = self.s(feature_map).permute(0, 3, 1, 2)
        modulator = self.modulator(s).permute(0, 2, 3, 1)
        return from_map(self.proj(modulator * self.v(feature_map)), tokens)
