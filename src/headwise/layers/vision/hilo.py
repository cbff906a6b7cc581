"""HiLo attention: high-frequency heads attend inside local windows, low-frequency heads attend
to average-pooled keys/values.

Pan, Cai, Zhuang, "Fast Vision Transformers with HiLo Attention" (LITv2, NeurIPS 2022); official
code ziplab/LITv2 (``hilo.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_bool, check_real
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.vision._common import check_divisible, check_positive, from_map, to_map
from headwise.layers.vision.windows import pad_map, windowed_attention
from headwise.ops.attention import attention
from headwise.ops.attention.dropout import check_dropout
from headwise.types import Backend


class HiLoAttention(nn.Module):
    """HiLo attention over a feature map.

    With ``h`` heads of ``d = C/h``, window ``s`` and ratio ``α``: ``h_lo = ⌊h·α⌋`` Lo-Fi heads
    (all ``h`` when ``s = 1``) and ``h_hi = h - h_lo`` Hi-Fi heads::

        Hi-Fi: Q, K, V = x W_hi  ->  MHSA inside each non-overlapping s x s window  ->  W_o,hi
        Lo-Fi: Q = x W_q,lo;  K, V = AvgPool_s(x) W_kv,lo  ->  global MHSA  ->  W_o,lo
        y = concat[Hi-Fi (h_hi·d), Lo-Fi (h_lo·d)]          (no joint output projection)

    Scale ``d^-1/2``. Keys/values of Lo-Fi come from the pooled *input*, not from pooled q/k.
    Special cases: ``s = 1`` is plain MHSA, ``α = 0`` pure window attention, ``α = 1`` pooled-KV
    global attention. A map whose sides are not multiples of ``s`` is zero-padded at the
    bottom/right before the projections and cropped after (the LITv2 detection code; padding is
    not masked). Both branches run through :func:`headwise.attention` with windows folded into
    the batch.

    Args:
        dim: channels ``C``.
        num_heads: ``h`` (``C % h == 0``).
        window_size: ``s`` (2 in the module default, 2 in LITv2 stage 3, 1 in stage 4).
        alpha: ``α`` in ``[0, 1]`` (0.9 in the LITv2 configs).
        qkv_bias: bias in the q/kv projections.
        backend: passed to :func:`headwise.attention`.
        dropout: attention dropout in ``[0, 1)`` on both branches' probabilities, in training
            mode only (:func:`headwise.attention`'s ``dropout_p``).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        window_size: int = 2,
        alpha: float = 0.5,
        qkv_bias: bool = False,
        backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        check_positive("window_size", window_size)
        check_divisible("dim", dim, "num_heads", num_heads)
        alpha = check_real("alpha", alpha, minimum=0.0)
        if alpha > 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        check_bool("qkv_bias", qkv_bias)
        self.dim, self.window_size, self.backend = dim, window_size, backend
        self.dropout = check_dropout(dropout, "dropout")
        self.head_dim = dim // num_heads
        self.lo_heads = num_heads if window_size == 1 else int(num_heads * alpha)
        self.hi_heads = num_heads - self.lo_heads
        hi_dim, lo_dim = self.hi_heads * self.head_dim, self.lo_heads * self.head_dim
        if self.hi_heads:
            self.h_qkv = nn.Linear(dim, 3 * hi_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(hi_dim, hi_dim)
        if self.lo_heads:
            self.l_q = nn.Linear(dim, lo_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * lo_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(lo_dim, lo_dim)

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init."""
        reset_submodules(self)

    def _hifi(self, x: torch.Tensor) -> torch.Tensor:
        return windowed_attention(
            x,
            self.window_size,
            self.h_qkv,
            self.h_proj,
            self.hi_heads,
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def _lofi(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        s, d = self.window_size, self.head_dim
        q = self.l_q(x).reshape(batch, -1, self.lo_heads, d)
        pooled = x
        if s > 1:
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
        k, v = self.l_kv(pooled).reshape(batch, -1, 2, self.lo_heads, d).unbind(2)
        p = self.dropout if self.training else 0.0
        o = attention(q, k, v, backend=self.backend, dropout_p=p).reshape(batch, height, width, -1)
        return self.l_proj(o)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        height, width = feature_map.shape[1:3]
        padded = pad_map(feature_map, self.window_size, self.window_size)
        parts = []
        if self.hi_heads:
            parts.append(self._hifi(padded))
        if self.lo_heads:
            parts.append(self._lofi(padded))
        y = torch.cat(parts, dim=-1)[:, :height, :width]
        return from_map(y, tokens)
