"""HaloNet blocked local self-attention: each ``b x b`` query block attends to the block plus a
halo of ``r`` pixels around it, with factorised relative-position logits.

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones"
(CVPR 2021). No official code; timm ``halo_attn.py`` is an unofficial implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_int
from headwise.layers._init import TruncNormalLinear, check_input, reset_submodules
from headwise.layers.vision._common import check_divisible, check_positive, from_map, to_map
from headwise.layers.vision.windows import block_partition, block_reverse, pad_map
from headwise.ops.attention import attention
from headwise.ops.attention.dropout import check_dropout
from headwise.types import Backend


class HaloAttention(nn.Module):
    """Blocked local attention with halo.

    Queries are blocked into ``b x b`` blocks; keys/values of a block are the ``w x w`` window
    (``w = b + 2r``) around it, taken from the key/value map zero-padded by ``r`` (padded keys are
    zeros and are *not* masked: their logit is the position term alone). Per head, query ``i`` of
    the block and key ``j`` of the window::

        ℓ_ij = s·q_iᵀk_j + q_iᵀ( R_h[y_j - y_i + w - 1] + R_w[x_j - x_i + w - 1] )
        y_i  = Σ_j softmax_j(ℓ_ij) v_j

    with ``s = d_qk^-1/2``, in-block / in-window coordinates, and ``R_h, R_w: (2w-1, d_qk)``
    shared by all heads (timm's default ``scale_pos_embed=False``: the position term is not
    scaled). ``q = x W_q``, ``[k | v] = x W_kv`` per head, no biases (the paper's 1x1 convs); no
    output projection (the surrounding bottleneck's 1x1 conv follows). Sides that are not
    multiples of ``b`` are zero-padded like the halo and cropped after. Blocks are folded into the
    batch for one :func:`headwise.attention` call; the position logits enter as its ``bias``.
    Init: ``W_q, W_kv`` trunc-normal(std ``fan_in^-1/2``), ``R_h, R_w`` trunc-normal(std
    ``d_qk^-1/2``). Only query stride 1 is implemented.

    Args:
        dim: input channels ``C``.
        num_heads: ``h`` (8 in HaloNet).
        block_size: ``b`` (8 in HaloNet).
        halo_size: ``r`` (3 in HaloNet; 2 in timm's ``halonet26t``).
        dim_out: output channels ``h·d_v`` (default ``C``).
        dim_head: ``d_qk`` (default ``dim_out / h``).
        dropout: attention dropout on the probabilities in ``[0, 1)``, in training mode only
            (:func:`headwise.attention`'s ``dropout_p``).

    Shapes: ``(B, H, W, C) -> (B, H, W, dim_out)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        block_size: int = 8,
        halo_size: int = 3,
        dim_out: int | None = None,
        dim_head: int | None = None,
        backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        check_positive("block_size", block_size)
        check_int("halo_size", halo_size, minimum=0)
        dim_out = dim if dim_out is None else check_positive("dim_out", dim_out)
        check_divisible("dim_out", dim_out, "num_heads", num_heads)
        self.dim, self.dim_out, self.num_heads, self.backend = dim, dim_out, num_heads, backend
        self.dropout = check_dropout(dropout, "dropout")
        self.block_size, self.halo_size = block_size, halo_size
        self.window = block_size + 2 * halo_size
        self.dim_v = dim_out // num_heads
        self.dim_qk = self.dim_v if dim_head is None else check_positive("dim_head", dim_head)
        self.q = TruncNormalLinear(dim, num_heads * self.dim_qk, bias=False, std=dim**-0.5)
        kv_width = num_heads * (self.dim_qk + self.dim_v)
        self.kv = TruncNormalLinear(dim, kv_width, bias=False, std=dim**-0.5)
        span = 2 * self.window - 1
        self.height_rel = nn.Parameter(torch.empty(span, self.dim_qk))
        self.width_rel = nn.Parameter(torch.empty(span, self.dim_qk))
        index = torch.empty(block_size, self.window, dtype=torch.long)
        self.register_buffer("relative_index", index, persistent=False)
        self._reset_own()

    def reset_parameters(self) -> None:
        """The init above, and the ``(b, w)`` table of window offsets ``x_j - x_i + w - 1``."""
        reset_submodules(self)
        self._reset_own()

    def _reset_own(self) -> None:
        # the tensors this module owns; q and kv carry their own init
        nn.init.trunc_normal_(self.height_rel, std=self.dim_qk**-0.5)
        nn.init.trunc_normal_(self.width_rel, std=self.dim_qk**-0.5)
        device = self.relative_index.device
        window = torch.arange(self.window, device=device)
        offsets = window[None, :] - torch.arange(self.block_size, device=device)[:, None]
        with torch.no_grad():
            self.relative_index.copy_(offsets + self.window - 1)

    def _position_logits(self, q: torch.Tensor) -> torch.Tensor:
        """``q: (n, b, b, h, d)`` -> ``(n, h, b², w²)``: ``q_iᵀ(R_h[Δy] + R_w[Δx])``."""
        rel_h = self.height_rel[self.relative_index].to(q.dtype)  # (b, w, d)
        rel_w = self.width_rel[self.relative_index].to(q.dtype)
        logits_h = torch.einsum("nyxhd,ykd->nhyxk", q, rel_h)
        logits_w = torch.einsum("nyxhd,xkd->nhyxk", q, rel_w)
        logits = logits_h[..., :, None] + logits_w[..., None, :]
        b, w = self.block_size, self.window
        return logits.reshape(q.shape[0], self.num_heads, b * b, w * w)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        height, width = feature_map.shape[1:3]
        b, r, w, h = self.block_size, self.halo_size, self.window, self.num_heads
        padded = pad_map(feature_map, b, b)
        padded_h, padded_w = padded.shape[1:3]
        q = block_partition(self.q(padded), b).reshape(-1, b, b, h, self.dim_qk)
        kv = F.pad(self.kv(padded), (0, 0, r, r, r, r))
        # (B, nH, nW, h(d_qk + d_v), w, w): the block plus its halo, stride b
        kv = kv.unfold(1, w, b).unfold(2, w, b)
        kv = kv.permute(0, 1, 2, 4, 5, 3).reshape(-1, w * w, h, self.dim_qk + self.dim_v)
        k, v = kv.split([self.dim_qk, self.dim_v], dim=-1)
        o = attention(
            q.reshape(-1, b * b, h, self.dim_qk),
            k,
            v,
            scale=self.dim_qk**-0.5,
            bias=self._position_logits(q),
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = block_reverse(o.flatten(2), b, padded_h, padded_w)[:, :height, :width]
        return from_map(y, tokens)
