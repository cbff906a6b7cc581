"""DaViT dual attention: channel group attention (global, linear in tokens) and spatial window
attention.

Ding et al., "DaViT: Dual Attention Vision Transformers" (ECCV 2022); official code dingmyu/davit,
ported in timm ``davit.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from headwise._checks import check_bool
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.vision._common import check_divisible, check_positive, from_map, to_map
from headwise.layers.vision.windows import windowed_attention
from headwise.ops.attention import attention
from headwise.ops.attention.dropout import check_dropout
from headwise.types import Backend


class ChannelAttention(nn.Module):
    """DaViT channel group attention: channels attend to channels, over all tokens.

    Channels split into ``h`` groups of ``C_g = C/h``; per group, with ``q, k, v: (N, C_g)``::

        A = softmax_row( C_g^-1/2 · kᵀ v )            (C_g x C_g, softmax over the last axis)
        y = W_o concat_groups( (A qᵀ)ᵀ )               (N x C_g per group)

    This is the role assignment of the official code and timm (the paper writes
    ``softmax(Qᵀ K) Vᵀ``: paper ``(Q, K, V)`` = code ``(k, v, q)``), so weights port without
    reordering. The scale is the group width ``C_g^-1/2``, not ``N^-1/2``. It runs through
    :func:`headwise.attention` with channels as the sequence axis and tokens as the head dim:
    cost ``O(N·C_g·C)``, linear in ``N``. Tokens are only summed over, so a permutation of the
    tokens permutes the output the same way.

    Args:
        dim: channels ``C``.
        num_heads: channel groups ``h`` (3/6/12/24 in DaViT-T).
        qkv_bias: bias in the qkv projection (True in DaViT).
        backend: passed to :func:`headwise.attention`.

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C) -> (B, N, C)`` (no grid needed).
    """

    def __init__(
        self, dim: int, num_heads: int = 8, *, qkv_bias: bool = True, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        check_divisible("dim", dim, "num_heads", num_heads)
        check_bool("qkv_bias", qkv_bias)
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.group_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init (DaViT's trunc-normal is applied by the whole model)."""
        reset_submodules(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("x", x, self)
        if x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must be (B, H, W, {self.dim}) or (B, N, {self.dim}); got {tuple(x.shape)}"
            )
        tokens = x.reshape(x.shape[0], -1, self.dim)
        batch, length, _ = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, self.group_dim)
        # (B, N, h, C_g) -> (B, C_g, h, N): channels become the sequence, tokens the head dim
        q, k, v = (t.permute(0, 3, 2, 1) for t in qkv.unbind(2))
        o = attention(k, v, q, scale=self.group_dim**-0.5, backend=self.backend)
        y = self.proj(o.permute(0, 3, 2, 1).reshape(batch, length, self.dim))
        return y.reshape(x.shape)


class WindowAttention(nn.Module):
    """DaViT spatial window attention: MHSA inside non-overlapping ``w x w`` windows.

    Per window, ``h`` heads of ``d = C/h``: ``y = W_o softmax(d^-1/2 Q Kᵀ) V`` with no relative
    position bias and no shift. Sides that are not multiples of ``w`` are zero-padded at the
    bottom/right and cropped after, without masking (as DaViT does: padded tokens carry the qkv
    bias). Windows are folded into the batch for one :func:`headwise.attention` call
    (:func:`~headwise.layers.vision.windows.windowed_attention`).

    Args:
        dim: channels ``C``.
        num_heads: ``h``.
        window_size: ``w`` (7 in DaViT).
        qkv_bias: bias in the qkv projection.
        backend: passed to :func:`headwise.attention`.
        dropout: attention dropout on the probabilities in ``[0, 1)``, in training mode only
            (:func:`headwise.attention`'s ``dropout_p``).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        window_size: int = 7,
        qkv_bias: bool = True,
        backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        check_positive("window_size", window_size)
        check_divisible("dim", dim, "num_heads", num_heads)
        check_bool("qkv_bias", qkv_bias)
        self.dim, self.num_heads, self.window_size, self.backend = (
            dim,
            num_heads,
            window_size,
            backend,
        )
        self.dropout = check_dropout(dropout, "dropout")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init."""
        reset_submodules(self)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        y = windowed_attention(
            feature_map,
            self.window_size,
            self.qkv,
            self.proj,
            self.num_heads,
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return from_map(y, tokens)
