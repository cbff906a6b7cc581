"""ConViT gated positional self-attention (GPSA): content and positional attention mixed by a
learnable per-head gate, with a locality initialization that makes every head a convolution tap.

d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases"
(ICML 2021); official code facebookresearch/convit, ported in timm ``convit.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from headwise._checks import check_bool, check_real
from headwise.layers._init import TruncNormalLinear, check_input, reset_submodules
from headwise.layers.vision._common import (
    check_divisible,
    check_positive,
    from_map,
    to_map,
)
from headwise.ops.attention import attention
from headwise.types import Backend


def relative_indices(height: int, width: int) -> torch.Tensor:
    """``r: (N, N, 3)`` with ``r_ij = (Δx, Δy, Δx² + Δy²)``, ``Δ = position(j) - position(i)``."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    dx = xs.flatten()[None, :] - xs.flatten()[:, None]
    dy = ys.flatten()[None, :] - ys.flatten()[:, None]
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1).float()


class _IdentityLinear(nn.Linear):
    """GPSA's value projection: ``W_v = I`` (square), bias 0."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.out_features, self.in_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _LocalityProjection(nn.Linear):
    """GPSA's ``pos_proj: Linear(3, h)`` with the locality init: with ``K = ⌊√h⌋``,
    ``c = (K-1)/2``, row ``p = h₁ + K·h₂ < K²`` is ``α·(2(h₂ - c), 2(h₁ - c), -1)``; rows beyond
    ``K²`` (``h`` not a square) trunc-normal(0.02)·α; bias 0."""

    def __init__(self, num_heads: int, locality_strength: float) -> None:
        self.locality_strength = locality_strength  # read by the reset of nn.Linear.__init__
        super().__init__(3, num_heads)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        side = math.isqrt(self.out_features)
        center = (side - 1) / 2
        for h1 in range(side):
            for h2 in range(side):
                p = h1 + side * h2
                self.weight[p] = torch.tensor([2 * (h2 - center), 2 * (h1 - center), -1])
        self.weight.mul_(self.locality_strength)


class GatedPositionalSelfAttention(nn.Module):
    """GPSA over a feature map (no class token inside; ConViT adds it after the GPSA layers).

    Per head ``h`` with ``s = d^-1/2``, gate ``g_h = σ(λ_h)``, ``r_ij`` from
    :func:`relative_indices`::

        A^h = (1 - g_h) · softmax_j(s · q_iᵀ k_j)  +  g_h · softmax_j(w_hᵀ r_ij + b_h)
        y   = W_o concat_h(A^h V^h)

    ``q, k = x W_qk`` (no bias), ``v = x W_v`` (no bias), ``w_h, b_h`` = ``pos_proj: Linear(3, h)``;
    positional scores are not scaled by ``s``. The content term runs through
    :func:`headwise.attention`. The positional term is computed without the ``N x N`` map:
    ``w_hᵀ r_ij = (w₀Δx + w₂Δx²) + (w₁Δy + w₂Δy²)`` separates over the axes, so its softmax is
    the product of a row and a column softmax, applied as a ``W x W`` then an ``H x H`` mixing.

    Locality init (``local_init``): ``W_v = I``; with ``K = ⌊√h⌋``, ``c = (K-1)/2``, head
    ``p = h₁ + K·h₂`` gets ``w_p = α·(2(h₂ - c), 2(h₁ - c), -1)``, so its positional score is
    ``-α‖Δ - (h₂ - c, h₁ - c)‖² + const``: a soft convolution tap at that offset. ``λ_h = 1``
    (``σ(1) ≈ 0.73`` of the weight starts on position); other weights trunc-normal(0.02).

    Args:
        dim: channels ``C``.
        num_heads: ``h`` (4/9/16 in ConViT-Ti/S/B).
        qkv_bias: bias in the q/k/v projections (False in ConViT).
        locality_strength: ``α`` (1 in ConViT).
        backend: passed to :func:`headwise.attention`.

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 9,
        *,
        qkv_bias: bool = False,
        locality_strength: float = 1.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        check_divisible("dim", dim, "num_heads", num_heads)
        check_bool("qkv_bias", qkv_bias)
        self.locality_strength = check_real("locality_strength", locality_strength)
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.head_dim = dim // num_heads
        # each child carries its init (see headwise.layers._init): any reset order gives it
        self.qk = TruncNormalLinear(dim, 2 * dim, bias=qkv_bias)
        self.v = _IdentityLinear(dim, dim, bias=qkv_bias)
        self.proj = TruncNormalLinear(dim, dim)
        self.pos_proj = _LocalityProjection(num_heads, self.locality_strength)
        self.gating_param = nn.Parameter(torch.ones(num_heads))

    def reset_parameters(self) -> None:
        """The locality init above (``W_v = I``, conv-tap ``w_h``, ``λ = 1``, trunc-normal)."""
        reset_submodules(self)
        nn.init.ones_(self.gating_param)

    def local_init(self, locality_strength: float = 1.0) -> None:
        """Re-initialize ``v`` and ``pos_proj`` as above with strength ``locality_strength`` (kept
        for later resets): ``W_v = I``, head ``p`` prefers offset ``(h₂ - c, h₁ - c)``. The other
        parameters keep their values."""
        self.locality_strength = check_real("locality_strength", locality_strength)
        self.pos_proj.locality_strength = self.locality_strength
        self.v.reset_parameters()
        self.pos_proj.reset_parameters()

    def positional_attention(self, height: int, width: int) -> torch.Tensor:
        """The dense positional map ``softmax_j(w_hᵀ r_ij + b_h)``: ``(h, N, N)``."""
        weight = self.pos_proj.weight
        rel = relative_indices(height, width).to(weight)
        return torch.softmax(self.pos_proj(rel).permute(2, 0, 1), dim=-1)

    def _positional(self, v: torch.Tensor) -> torch.Tensor:
        """``softmax(w_hᵀ r + b_h) V`` for ``v: (B, H, W, h, d)``, as two 1-D mixings."""
        height, width = v.shape[1], v.shape[2]
        weight = self.pos_proj.weight.to(v.dtype)  # (h, 3); b_h is constant over keys

        def axis_softmax(n: int, linear: torch.Tensor) -> torch.Tensor:
            idx = torch.arange(n, device=v.device, dtype=v.dtype)
            delta = idx[None, :] - idx[:, None]  # key - query
            logits = linear[:, None, None] * delta + weight[:, 2, None, None] * delta**2
            return torch.softmax(logits, dim=-1)

        along_x = axis_softmax(width, weight[:, 0])  # (h, W, W)
        along_y = axis_softmax(height, weight[:, 1])  # (h, H, H)
        mixed = torch.einsum("hxj,byjhd->byxhd", along_x, v)
        return torch.einsum("hyi,bixhd->byxhd", along_y, mixed)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        batch, height, width, _ = feature_map.shape
        heads = (batch, height * width, self.num_heads, self.head_dim)
        q, k = self.qk(feature_map).reshape(batch, -1, 2, *heads[2:]).unbind(2)
        v = self.v(feature_map)
        content = attention(q, k, v.reshape(heads), backend=self.backend)
        positional = self._positional(v.reshape(batch, height, width, *heads[2:]))
        gate = torch.sigmoid(self.gating_param).to(x.dtype)[:, None]
        mixed = (1 - gate) * content + gate * positional.reshape(heads)
        y = self.proj(mixed.reshape(batch, height, width, self.dim))
        return from_map(y, tokens)
