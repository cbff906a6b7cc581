"""SHViT single-head self-attention: one head over a partial set of channels; the rest pass by.

Yun, Ro, "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design" (CVPR 2024);
official code ysj9909/SHViT, ported in timm ``shvit.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from headwise.layers._init import check_input, reset_submodules
from headwise.layers.vision._common import (
    BatchNorm2d,
    check_positive,
    from_map,
    to_map,
)
from headwise.ops.attention import attention
from headwise.ops.attention.dropout import check_dropout
from headwise.types import Backend


class _ConvBN(nn.Sequential):
    """1x1 conv (default init, no bias) then BatchNorm with initial weight ``bn_weight``."""

    def __init__(self, dim_in: int, dim_out: int, bn_weight: float = 1.0) -> None:
        super().__init__()
        self.c = nn.Conv2d(dim_in, dim_out, 1, bias=False)
        self.bn = BatchNorm2d(dim_out, weight_init=bn_weight)


class SingleHeadAttention(nn.Module):
    """SHViT single-head attention (SHSA).

    Split the channels ``x = [x₁ (C_p), x₂ (C - C_p)]``; only ``x₁`` attends::

        x₁'      = GroupNorm(1, C_p)(x₁)                       (LayerNorm over C_p, H, W)
        q, k, v  = split(BN(Conv1x1(x₁')), [d_qk, d_qk, C_p])
        x₁''     = softmax(d_qk^-1/2 · q kᵀ) v                 one head, all N tokens
        y        = BN(Conv1x1(ReLU(concat[x₁'', x₂])))        (BN weight initialized to 0)

    ``x₂`` reaches the output projection raw (no norm, no mixing), and the mixer outputs 0 at
    init (the block's residual is added outside). Attention runs through
    :func:`headwise.attention` with one head.

    Args:
        dim: channels ``C``.
        partial_dim: ``C_p`` (default ``C // 4``; SHViT-S4 uses 48/72/96 for 224/336/448).
        qk_dim: ``d_qk`` (16 in SHViT).
        backend: passed to :func:`headwise.attention`.
        dropout: attention dropout on the probabilities in ``[0, 1)``, in training mode only
            (:func:`headwise.attention`'s ``dropout_p``).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        partial_dim: int | None = None,
        qk_dim: int = 16,
        backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("qk_dim", qk_dim)
        partial = max(1, dim // 4) if partial_dim is None else partial_dim
        check_positive("partial_dim", partial)
        if partial > dim:
            raise ValueError(f"partial_dim must be at most dim {dim}; got {partial}")
        self.dim, self.partial_dim, self.qk_dim, self.backend = dim, partial, qk_dim, backend
        self.dropout = check_dropout(dropout, "dropout")
        self.pre_norm = nn.GroupNorm(1, partial)
        self.qkv = _ConvBN(partial, 2 * qk_dim + partial)
        self.proj = nn.Sequential(nn.ReLU(), _ConvBN(dim, dim, bn_weight=0.0))

    def reset_parameters(self) -> None:
        """The init above: GroupNorm (1, 0), default convs, output BN weight 0."""
        reset_submodules(self)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        batch, height, width, _ = feature_map.shape
        image = feature_map.permute(0, 3, 1, 2)
        attended, passed = image.split([self.partial_dim, self.dim - self.partial_dim], dim=1)
        # torch 2.13's CPU GroupNorm backward segfaults on a channel slice of a channels-last
        # tensor; a contiguous copy of the C_p channels avoids it. The tokens are read out by a
        # contiguous reshape, so q/k/v have a contiguous last axis (what fast kernels expect).
        qkv = self.qkv(self.pre_norm(attended.contiguous()))
        qkv = qkv.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.partial_dim], dim=-1)
        o = attention(
            q[:, :, None],
            k[:, :, None],
            v[:, :, None],
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
        )
        o = o.reshape(batch, height, width, self.partial_dim).permute(0, 3, 1, 2)
        y = self.proj(torch.cat([o, passed], dim=1)).permute(0, 2, 3, 1)
        return from_map(y, tokens)
