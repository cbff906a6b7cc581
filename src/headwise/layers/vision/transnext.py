"""TransNeXt aggregated attention (pixel-focused local window ∪ pooled global keys under one
softmax) and the Convolutional GLU channel mixer.

Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (CVPR 2024); official
code DaiShiResearch/TransNeXt (``attention_native.py``).
"""

from __future__ import annotations

import math

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
    check_divisible,
    check_pair,
    check_positive,
    from_map,
    to_map,
)
from headwise.layers.vision.windows import neighborhood_windows
from headwise.ops.attention import attention
from headwise.types import Backend


def _log_coords(delta: torch.Tensor) -> torch.Tensor:
    # log-spaced coordinates, as Swin-V2's continuous position bias: φ(z) = sign(z) log2(1+|z|)/3
    return torch.sign(delta) * torch.log2(1 + delta.abs()) / math.log2(8)


class AggregatedAttention(nn.Module):
    """TransNeXt aggregated attention over a feature map.

    Per head, ``q̂ = L2norm(q)``, ``k̂ = L2norm(k)``, pooled grid ``P = ⌊H/sr⌋·⌊W/sr⌋`` cells,
    ``n_i`` = in-image slots of query ``i``'s centred ``k x k`` window::

        q*_i  = (q̂_i + e_q) · softplus(τ) · ln(n_i + P)
        ℓ^loc = q*_iᵀ k̂_{n_j(i)} + B_loc[j]          (out-of-image slots: -inf)
        ℓ^pool= q*_iᵀ k̂p_m + B_cpb[i, m]
        [a^loc, a^pool] = softmax over the k² + P logits together
        y_i   = W_o( Σ_j (a^loc_ij + q̂_iᵀ T[:, j] + β_j) v_{n_j(i)} + Σ_m a^pool_im vp_m )

    ``[k, v] = x W_kv`` and ``[kp, vp] = x_p W_kv`` share one projection, with
    ``x_p = LN(AdaptiveAvgPool(GELU(Conv1x1(x))))``. ``B_cpb = MLP(2→512→h)(φ(Δ_im))`` with
    ``Δ = ((y_i - ȳ_m)·8/(H_pre - 1), (x_i - x̄_m)·8/(W_pre - 1))`` (``ȳ, x̄``: pooled-cell centres;
    ``φ(z) = sign(z)·log2(1+|z|)/3``). The learnable-token term ``q̂ᵀT + β`` uses ``q̂`` without
    ``e_q`` or scale and is added *after* the softmax. ``sr_ratio = 1`` is the last stage's full
    attention ``softmax((q̂ + e_q)·softplus(τ)·ln(N)·k̂ᵀ + B_cpb) V`` (run by
    :func:`headwise.attention`). Masks, ``λ`` and the bias are computed from ``(H, W)`` at run
    time. The local+pooled softmax is computed explicitly (``N x (k² + P)`` logits: each query
    has its own window, so no shared key set exists for one attention call; nothing is ``N x N``).

    Init: ``e_q, T`` trunc-normal(0.02), ``B_loc`` trunc-normal(4e-4), ``β = 0``,
    ``softplus(τ) = 1/0.24``; Linear layers trunc-normal(0.02), biases 0.

    Args:
        dim: channels ``C``.
        num_heads: ``h``.
        window_size: ``k`` (odd; 3 in TransNeXt).
        sr_ratio: pooling ratio ``sr`` (8/4/2 in stages 1-3; 1 = full attention in stage 4).
        qkv_bias: bias in the q/kv projections (True in TransNeXt).
        pretrain_size: ``(H_pre, W_pre)`` normalizing the bias coordinates; default the input's.
        backend: passed to :func:`headwise.attention` (``sr_ratio = 1``).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        window_size: int = 3,
        sr_ratio: int = 8,
        qkv_bias: bool = True,
        pretrain_size: tuple[int, int] | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        check_positive("window_size", window_size)
        check_positive("sr_ratio", sr_ratio)
        check_divisible("dim", dim, "num_heads", num_heads)
        if window_size % 2 == 0:
            raise ValueError(f"window_size must be odd; got {window_size}")
        check_bool("qkv_bias", qkv_bias)
        if pretrain_size is not None:
            pretrain_size = check_pair("pretrain_size", pretrain_size)
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.head_dim = dim // num_heads
        self.window_size, self.sr_ratio, self.pretrain_size = window_size, sr_ratio, pretrain_size
        h, d, slots = num_heads, self.head_dim, window_size * window_size
        self.q = TruncNormalLinear(dim, dim, bias=qkv_bias)
        self.kv = TruncNormalLinear(dim, 2 * dim, bias=qkv_bias)
        self.proj = TruncNormalLinear(dim, dim)
        self.query_embedding = nn.Parameter(torch.empty(h, d))
        self.temperature = nn.Parameter(torch.empty(h))
        self.cpb_fc1 = TruncNormalLinear(2, 512)
        self.cpb_fc2 = TruncNormalLinear(512, h)
        if sr_ratio > 1:
            self.sr = FanOutConv2d(dim, dim, 1)
            self.norm = nn.LayerNorm(dim)
            self.relative_pos_bias_local = nn.Parameter(torch.empty(h, slots))
            self.learnable_tokens = nn.Parameter(torch.empty(h, d, slots))
            self.learnable_bias = nn.Parameter(torch.empty(h, slots))
        self._reset_own()

    def reset_parameters(self) -> None:
        """The init above (LayerNorm at its default)."""
        reset_submodules(self)
        self._reset_own()

    def _reset_own(self) -> None:
        # the tensors this module owns; each submodule carries its own init
        nn.init.trunc_normal_(self.query_embedding, std=0.02)
        nn.init.constant_(self.temperature, math.log(math.expm1(1 / 0.24)))
        if self.sr_ratio > 1:
            nn.init.trunc_normal_(self.relative_pos_bias_local, std=4e-4)
            nn.init.trunc_normal_(self.learnable_tokens, std=0.02)
            nn.init.zeros_(self.learnable_bias)

    def pool_size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, height // self.sr_ratio), max(1, width // self.sr_ratio)

    def position_bias(self, height: int, width: int, pool: tuple[int, int]) -> torch.Tensor:
        """``B_cpb: (h, H·W, P)``, the MLP evaluated once per distinct ``(Δy, Δx)`` pair."""
        pre_h, pre_w = self.pretrain_size or (height, width)
        device, dtype = self.cpb_fc1.weight.device, self.cpb_fc1.weight.dtype

        def axis(n: int, cells: int, pre: int) -> tuple[torch.Tensor, torch.Tensor]:
            # coordinates depend on the sizes only: computed on the CPU in float64 (torch.unique
            # has no meta kernel), so the layer also runs on the meta device
            idx = torch.arange(n, dtype=torch.float64, device="cpu")
            centres = F.adaptive_avg_pool1d(idx[None, None], cells)[0, 0]
            delta = (idx[:, None] - centres[None, :]) * 8 / max(pre - 1, 1)
            values, inverse = torch.unique(delta, return_inverse=True)
            values = _log_coords(values).to(device=device, dtype=dtype)
            return values, inverse.to(device)  # inverse: (n, cells)

        uy, iy = axis(height, pool[0], pre_h)
        ux, ix = axis(width, pool[1], pre_w)
        grid = torch.stack(torch.meshgrid(uy, ux, indexing="ij"), dim=-1)
        table = self.cpb_fc2(torch.relu(self.cpb_fc1(grid)))  # (|uy|, |ux|, h)
        bias = table[iy[:, None, :, None], ix[None, :, None, :]]  # (H, W, Hp, Wp, h)
        return bias.reshape(height * width, pool[0] * pool[1], -1).permute(2, 0, 1)

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        heads = (batch, height * width, self.num_heads, self.head_dim)
        q = F.normalize(self.q(x).reshape(heads), dim=-1)
        k, v = self.kv(x).reshape(*heads[:2], 2, *heads[2:]).unbind(2)
        scale = F.softplus(self.temperature)[:, None] * math.log(height * width)
        q = (q + self.query_embedding) * scale
        bias = self.position_bias(height, width, (height, width)).to(x.dtype)
        o = attention(q, F.normalize(k, dim=-1), v, scale=1.0, bias=bias, backend=self.backend)
        return o.reshape(batch, height, width, self.dim)

    def _aggregated(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        h, d, tokens = self.num_heads, self.head_dim, height * width
        pool = self.pool_size(height, width)
        cells = pool[0] * pool[1]
        q_hat = F.normalize(self.q(x).reshape(batch, height, width, h, d), dim=-1)
        k, v = self.kv(x).reshape(batch, height, width, 2, h, d).unbind(3)
        window = (self.window_size, self.window_size)
        k_loc, valid = neighborhood_windows(F.normalize(k, dim=-1).flatten(3), window)
        v_loc, _ = neighborhood_windows(v.flatten(3), window)
        k_loc = k_loc.reshape(batch, tokens, -1, h, d)
        v_loc = v_loc.reshape(batch, tokens, -1, h, d)
        valid = valid.reshape(tokens, -1)

        reduced = F.gelu(self.sr(x.permute(0, 3, 1, 2)))
        pooled = self.norm(F.adaptive_avg_pool2d(reduced, pool).flatten(2).transpose(1, 2))
        k_pool, v_pool = self.kv(pooled).reshape(batch, cells, 2, h, d).unbind(2)
        k_pool = F.normalize(k_pool, dim=-1)

        length_scale = torch.log(valid.sum(-1).to(x.dtype) + cells)  # λ_i, (N,)
        q_hat = q_hat.reshape(batch, tokens, h, d)
        q_star = (q_hat + self.query_embedding) * F.softplus(self.temperature)[:, None]
        q_star = q_star * length_scale[:, None, None]
        local = torch.einsum("bnhd,bnjhd->bhnj", q_star, k_loc) + self.relative_pos_bias_local[
            :, None
        ].to(x.dtype)
        local = local.masked_fill(~valid, float("-inf"))
        far = torch.einsum("bnhd,bmhd->bhnm", q_star, k_pool)
        far = far + self.position_bias(height, width, pool).to(x.dtype)
        weights = torch.softmax(torch.cat([local, far], dim=-1), dim=-1)
        a_local, a_far = weights.split([local.shape[-1], cells], dim=-1)
        tokens_term = torch.einsum("bnhd,hdj->bhnj", q_hat, self.learnable_tokens.to(x.dtype))
        a_local = a_local + tokens_term + self.learnable_bias[:, None].to(x.dtype)
        o = torch.einsum("bhnj,bnjhd->bnhd", a_local, v_loc)
        o = o + torch.einsum("bhnm,bmhd->bnhd", a_far, v_pool)
        return o.reshape(batch, height, width, self.dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        mixed = self._full(feature_map) if self.sr_ratio == 1 else self._aggregated(feature_map)
        return from_map(self.proj(mixed), tokens)


class ConvGLU(nn.Module):
    """Convolutional GLU, TransNeXt's channel mixer::

        [x_g, v] = split(x W_1)                       (2 x hidden' channels, first half gates)
        y        = W_2( GELU(DWConv3x3(x_g)) ⊙ v )

    ``hidden' = ⌊2·hidden/3⌋`` so the parameter count matches an MLP of width ``hidden``.

    Args:
        dim: channels ``C``.
        hidden_dim: ``hidden`` (default ``4·C``; TransNeXt uses ratios 8/8/4/4).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        check_positive("dim", dim)
        hidden = 4 * dim if hidden_dim is None else check_positive("hidden_dim", hidden_dim)
        hidden = max(1, 2 * hidden // 3)
        self.dim = dim
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def reset_parameters(self) -> None:
        """PyTorch's default Linear and conv init."""
        reset_submodules(self)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        gate, value = self.fc1(feature_map).chunk(2, dim=-1)
        gate = self.dwconv(gate.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return from_map(self.fc2(F.gelu(gate) * value), tokens)
