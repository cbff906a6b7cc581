"""Sparsifiner: learned instance-dependent sparse attention.

Wei, Duke, Jiang, Aarabi, Taylor, Shkurti, "Sparsifiner: Learning Sparse Instance-Dependent
Attention for Efficient Vision Transformers" (CVPR 2023); official code lim142857/Sparsifiner
(``src/models/sparsifiner.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from headwise import patterns
from headwise._checks import check_bool, check_int, check_real
from headwise.layers._init import check_input, reset_submodules
from headwise.ops.attention import attention
from headwise.ops.attention.gather import gathered_attention
from headwise.types import Backend


class SparsifinerAttention(nn.Module):
    """Multi-head self-attention restricted to the keys a low-rank predictor ranks highest.

    For tokens ``x`` ``(B, N, C)`` (``N`` fixed at construction, CLS at index 0 if ``cls_token``),
    ``H`` heads of ``D = C / H`` channels, ``M = max(1, N // token_reduction)`` bases::

        q, k, v  = x W_qkv                                  (B, N, H, D) each
        q_r, k_r = q W_qr, k W_kr                           (B, N, H, D / channel_reduction)
        c        = softmax_M(q_r (k_r^T P_n) / sqrt(H))     (B, H, N, M)   P_n: (N, M)
        Ahat     = c U,   U = P_back^T                      (B, H, N, N)   P_back: (N, M)
        mask_i   = top-k_j(Ahat_ij), k = ceil(keep_rate N)  per non-CLS row; the CLS row is dense
        y        = W_o softmax(q k^T / sqrt(D) + (0 where mask else -inf)) v

    The predictor's logits are scaled by ``H^(-1/2)`` (the number of heads, as the official code
    does, not the head dim). ``W_qr``, ``W_kr``, ``P_n``, ``P_back`` are shared by the heads of
    the layer. The predictor is sparsified as in the paper: ``c`` keeps its ``basis_top_k``
    largest entries per row and ``U`` becomes ``|U|`` with entries ``<= basis_threshold``
    zeroed. As in the official code this holds whenever the reconstruction stage is off, in
    training too (the paper's 45-epoch sparse stage): only a training forward with
    ``dense=True`` (stage 1) uses the dense ``c U``, so train and eval choose the same keys.
    With ``causal=True`` (sequence port) ``Ahat`` is causally masked before the top-k, so row
    ``i`` keeps ``min(k, i + 1)`` keys.

    The mask is **detached**: the task loss never reaches the predictor, which learns only from
    a reconstruction loss between ``Ahat`` (``forward(..., return_approx=True)``) and a dense
    teacher's attention (stage 1 of the paper; use ``dense=True`` for its dense forward).

    The sparse path: the mask differs per batch element, which batch-agnostic
    :mod:`headwise.patterns` cannot express, so the kept keys go to
    :func:`headwise.ops.attention.gather.gathered_attention` as a ``(B, H, N, k)`` index: each
    non-CLS row computes ``k`` scores instead of ``N`` (the paper's FLOP saving). The dense CLS
    row runs through :func:`headwise.attention`.

    Args:
        embed_dim: ``C``; divisible by ``num_heads``.
        num_heads: ``H``.
        seq_len: ``N``; ``P_n`` and ``P_back`` have ``N`` rows, so inputs must have this length
            (pad to it).
        keep_rate: fraction of keys each non-CLS row keeps, in ``(0, 1]`` (paper: 0.25).
        channel_reduction: ``r_c`` (paper: 2).
        token_reduction: ``r_n`` (default config: 6, i.e. 32 bases for ``N = 197``).
        cls_token: token 0 is a CLS token with a dense attention row.
        causal: causal attention (not in the paper; for sequence models).
        basis_top_k, basis_threshold: eval-mode predictor sparsification (paper: 8, 0.02).
        qkv_bias: bias in the ``W_qkv`` projection.
        backend: passed to :func:`headwise.attention`.

    Shapes: ``forward(x: (B, N, C)) -> (B, N, C)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        seq_len: int,
        *,
        keep_rate: float = 0.25,
        channel_reduction: int = 2,
        token_reduction: int = 6,
        cls_token: bool = True,
        causal: bool = False,
        basis_top_k: int = 8,
        basis_threshold: float = 0.02,
        qkv_bias: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        num_heads = check_int("num_heads", num_heads, minimum=1)
        cls_token = check_bool("cls_token", cls_token)
        seq_len = check_int("seq_len", seq_len, minimum=2 if cls_token else 1)
        channel_reduction = check_int("channel_reduction", channel_reduction, minimum=1)
        token_reduction = check_int("token_reduction", token_reduction, minimum=1)
        basis_top_k = check_int("basis_top_k", basis_top_k, minimum=1)
        causal = check_bool("causal", causal)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        keep_rate = check_real("keep_rate", keep_rate)
        basis_threshold = check_real("basis_threshold", basis_threshold)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads; got {embed_dim} and {num_heads}"
            )
        head_dim = embed_dim // num_heads
        if head_dim % channel_reduction:
            raise ValueError(
                f"channel_reduction must divide the head dim {head_dim}; got {channel_reduction}"
            )
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1]; got {keep_rate!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.seq_len, self.keep_rate = seq_len, float(keep_rate)
        self.budget = math.ceil(keep_rate * seq_len)
        self.cls_token, self.causal, self.backend = cls_token, causal, backend
        self.basis_top_k, self.basis_threshold = basis_top_k, float(basis_threshold)
        n_bases = max(1, seq_len // token_reduction)
        reduced = head_dim // channel_reduction

        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.q_reduce = nn.Linear(head_dim, reduced)
        self.k_reduce = nn.Linear(head_dim, reduced)
        self.token_proj = nn.Parameter(torch.empty(seq_len, n_bases))  # P_n
        self.basis = nn.Parameter(torch.empty(seq_len, n_bases))  # P_back, U = P_back^T
        self._reset_bases()

    def _reset_bases(self) -> None:
        nn.init.trunc_normal_(self.token_proj, std=0.02)
        nn.init.trunc_normal_(self.basis, std=0.02)

    def reset_parameters(self) -> None:
        """Re-initialize: projections with PyTorch's ``nn.Linear`` default, ``P_n`` and
        ``P_back`` trunc-normal(std 0.02) (official)."""
        reset_submodules(self)
        self._reset_bases()

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, seq_len={self.seq_len}, "
            f"keep_rate={self.keep_rate}, budget={self.budget}, cls_token={self.cls_token}, "
            f"causal={self.causal}"
        )

    def approximate_attention(
        self, q: torch.Tensor, k: torch.Tensor, *, sparse: bool = True
    ) -> torch.Tensor:
        """The predictor's ``Ahat`` ``(B, H, N, N)`` from ``q``, ``k`` ``(B, N, H, D)``.

        ``sparse`` applies the top-k coefficients and the ``|U|`` threshold (every forward but a
        training one with ``dense=True``); ``sparse=False`` is the dense ``c U`` the
        reconstruction loss is taken on. The CLS row (if any) is zero: the official predictor
        drops it, its row is dense anyway.
        """
        q_r = self.q_reduce(q).transpose(1, 2)  # (B, H, N, D/r_c)
        k_r = self.k_reduce(k).transpose(1, 2)
        kt = k_r.transpose(-1, -2) @ self.token_proj  # (B, H, D/r_c, M)
        coeff = torch.softmax((q_r @ kt) * self.num_heads**-0.5, dim=-1)  # (B, H, N, M)
        basis = self.basis.t()  # (M, N)
        if check_bool("sparse", sparse):
            top = coeff.topk(min(self.basis_top_k, coeff.shape[-1]), dim=-1)
            coeff = torch.zeros_like(coeff).scatter(-1, top.indices, top.values)
            basis = basis.abs() * (basis.abs() > self.basis_threshold)
        approx = coeff @ basis
        if self.cls_token:
            approx = torch.cat((torch.zeros_like(approx[..., :1, :]), approx[..., 1:, :]), -2)
        return approx

    def connectivity_mask(self, approx: torch.Tensor) -> torch.Tensor:
        """Boolean ``(B, H, N, N)``: the top ``budget`` keys of each row of ``Ahat``.

        The CLS row is all ``True`` (causal: row 0 sees key 0). Computed without gradient.
        """
        with torch.no_grad():
            scores = approx.detach()
            n = scores.shape[-1]
            if self.causal:
                future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            top = scores.topk(self.budget, dim=-1).indices
            mask = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)
            if self.causal:
                # A row shorter than the budget picked -inf (future) keys in its top-k.
                mask &= ~future
            if self.cls_token:
                mask[..., 0, :] = True
        return mask

    def connectivity_index(self, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept keys as an index ``(B, H, N, budget)`` and its validity mask (causal rows
        shorter than the budget have invalid slots). Same keys as :meth:`connectivity_mask`."""
        with torch.no_grad():
            scores = approx.detach()
            if self.causal:
                n = scores.shape[-1]
                future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            index = scores.topk(self.budget, dim=-1).indices
            valid = torch.isfinite(scores.gather(-1, index))
        return index, valid

    def forward(
        self, x: torch.Tensor, *, dense: bool = False, return_approx: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``y`` ``(B, N, C)``; with ``return_approx`` also ``Ahat`` ``(B, H, N, N)``.

        ``dense=True`` skips the mask (stage 1 of the paper's training: dense forward, the
        predictor trained to reconstruct the attention, so in training ``Ahat`` is the dense one).
        """
        dense = check_bool("dense", dense)
        return_approx = check_bool("return_approx", return_approx)
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 3
            or x.shape[1:]
            != (
                self.seq_len,
                self.embed_dim,
            )
        ):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"x must be (B, N={self.seq_len}, C={self.embed_dim}) (pad to N); got {got}"
            )
        check_input("x", x, self)
        batch = x.shape[0]
        q, k, v = self.qkv(x).view(batch, self.seq_len, 3, self.num_heads, -1).unbind(2)
        # Official rule: the dense predictor only while training with the reconstruction loss.
        sparse = not (self.training and dense)
        approx = self.approximate_attention(q, k, sparse=sparse) if return_approx else None
        if dense:
            pattern = patterns.causal() if self.causal else None
            out = attention(q, k, v, pattern, backend=self.backend)
        else:
            if approx is None:
                with torch.no_grad():
                    index, valid = self.connectivity_index(self.approximate_attention(q, k))
            else:
                index, valid = self.connectivity_index(approx)
            start = 1 if self.cls_token else 0
            out = gathered_attention(
                q[:, start:], k, v, index[:, :, start:], valid=valid[:, :, start:]
            )
            if self.cls_token:
                # CLS row is dense: all keys (causal: position 0 sees only itself).
                keys = slice(0, 1) if self.causal else slice(None)
                cls = attention(q[:, :1], k[:, keys], v[:, keys], backend=self.backend)
                out = torch.cat((cls, out), dim=1)
        y = self.out_proj(out.reshape(batch, self.seq_len, self.embed_dim))
        return (y, approx) if return_approx else y


__all__ = ["SparsifinerAttention"]
