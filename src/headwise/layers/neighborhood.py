"""Neighborhood attention modules (NAT / DiNAT), channels-last, with a learnable relative
positional bias whose gradient is computed.

    [q, k, v] = x W_qkv (+ b)
    o_i = sum_{j in N(i)} softmax_j(q_i . k_j / sqrt(D) + rpb[h, j - i]) v_j
    y = o W_proj + b_proj

``N(i)`` is the NATTEN window (border shift, dilation groups, per-axis causal, stride); see
:func:`headwise.patterns.neighborhood`. Papers: Hassani et al., "Neighborhood Attention
Transformer" (CVPR 2023); Hassani & Shi, "Dilated Neighborhood Attention Transformer" (2022);
Hassani et al., "Faster Neighborhood Attention" (NeurIPS 2024). ``dropout`` (default 0) is
attention dropout on the probabilities in training mode (NAT's ``attn_drop``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, check_bool, check_int, check_real
from headwise.layers._init import check_input, reset_submodules
from headwise.ops.attention import neighborhood_attention
from headwise.ops.attention.dropout import check_dropout
from headwise.types import Backend


def _per_axis(name: str, value: object, rank: int, check: Callable[[str, Any], Any]) -> tuple:
    """``value`` for every axis, or a sequence of ``rank`` values, each through ``check``."""
    if isinstance(value, tuple | list):
        if len(value) != rank:
            raise ValueError(f"{name} must have {rank} entries; got {value!r}")
        return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))
    if hasattr(value, "__iter__"):
        raise ArgumentTypeError(f"{name} must be a value or a tuple of {rank}; got {value!r}")
    return (check(name, value),) * rank


def _positive(name: str, value: object) -> int:
    return check_int(name, value, minimum=1)


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
        backend: Backend = "auto",
        dropout: float = 0.0,
    ):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(
                f"dim must be divisible by num_heads; got dim={dim}, num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.kernel_size = _per_axis("kernel_size", kernel_size, self.rank, _positive)
        self.dilation = _per_axis("dilation", dilation, self.rank, _positive)
        self.stride = _per_axis("stride", stride, self.rank, _positive)
        self.causal = _per_axis("causal", causal, self.rank, check_bool)
        check_bool("rel_pos_bias", rel_pos_bias)
        check_bool("qkv_bias", qkv_bias)
        self.scale = None if scale is None else check_real("scale", scale)
        self.backend = backend
        self.dropout = check_dropout(dropout, "dropout")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rpb = None
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(num_heads, *(2 * k - 1 for k in self.kernel_size)))
        self._reset_own()

    def reset_parameters(self) -> None:
        """Default Linear init; ``rpb`` truncated normal, std 0.02 (NAT/DiNAT)."""
        reset_submodules(self)
        self._reset_own()

    def _reset_own(self) -> None:
        # the tensor this module owns (the Linears hold their own init)
        if self.rpb is not None:
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, *spatial, C)`` -> ``(B, *spatial, C)``."""
        check_input("x", x, self)
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
            dropout_p=self.dropout if self.training else 0.0,
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
