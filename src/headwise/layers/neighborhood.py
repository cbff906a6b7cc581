"""Neighborhood attention modules (NAT / DiNAT), channels-last, with a learnable relative
positional bias whose gradient is computed.

    [q, k, v] = x W_qkv (+ b)
    o_i = sum_{j in N(i)} softmax_j(q_i . k_j / sqrt(D) + rpb[h, j - i]) v_j
    y = o W_proj + b_proj

``N(i)`` is the NATTEN window (border shift, dilation groups, per-axis causal, stride); see
:func:`headwise.patterns.neighborhood`. Papers: Hassani et al., "Neighborhood Attention
Transformer" (CVPR 2023); Hassani & Shi, "Dilated Neighborhood Attention Transformer" (2022);
Hassani et al., "Faster Neighborhood Attention" (NeurIPS 2024).
"""

from __future__ import annotations

import torch
from torch import nn

from headwise.ops.attention import neighborhood_attention


class _NeighborhoodAttention(nn.Module):
    rank = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | tuple[int, ...],
        *,
        dilation: int | tuple[int, ...] = 1,
        stride: int | tuple[int, ...] = 1,
        causal: bool | tuple[bool, ...] = False,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        scale: float | None = None,
        backend: str | tuple[str, ...] = "auto",
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"dim must be divisible by num_heads; got dim={dim}, num_heads={num_heads}"
            )
        kernels = (kernel_size,) * self.rank if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(kernels) != self.rank:
            raise ValueError(f"kernel_size must have {self.rank} entries; got {kernel_size!r}")
        self.num_heads = num_heads
        self.kernel_size = kernels
        self.dilation = dilation
        self.stride = stride
        self.causal = causal
        self.scale = scale
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rpb = None
        if rel_pos_bias:
            # NAT/DiNAT initialisation: truncated normal, std 0.02.
            table = torch.empty(num_heads, *(2 * k - 1 for k in kernels))
            self.rpb = nn.Parameter(nn.init.trunc_normal_(table, std=0.02, a=-2.0, b=2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, *spatial, C)`` -> ``(B, *spatial, C)``."""
        if x.dim() != self.rank + 2 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(
                f"x must be (B, {self.rank} spatial axes, C={self.qkv.in_features}); "
                f"got {tuple(x.shape)}"
            )
        head_dim = x.shape[-1] // self.num_heads
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, head_dim)).unbind(-3)
        out = neighborhood_attention(
            q,
            k,
            v,
            self.kernel_size,
            dilation=self.dilation,
            stride=self.stride,
            causal=self.causal,
            rpb=self.rpb,
            scale=self.scale,
            backend=self.backend,
        )
        return self.proj(out.flatten(-2))


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """Neighborhood attention over ``(B, L, C)`` sequences."""

    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """Neighborhood attention over ``(B, H, W, C)`` feature maps."""

    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """Neighborhood attention over ``(B, X, Y, Z, C)`` volumes (e.g. video: time, height, width)."""

    rank = 3
