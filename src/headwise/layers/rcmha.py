"""RCMHA: Relative Convolutional Multi-Head Attention (Sugiharto, Aradea, Mubarok,
arXiv 2308.03429; official code hermansh-id/rcmha, on labml's Transformer-XL).

Shapes: activations ``(B, L, E)``, heads ``(B, L, H, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise import patterns
from headwise._checks import check_int
from headwise.layers._init import check_input, reset_submodules
from headwise.ops.attention import attention
from headwise.ops.attention.dropout import check_dropout
from headwise.types import Backend


class RelativeConvAttention(nn.Module):
    """Causal multi-head attention with depthwise-convolved Q, K, V and relative positions.

    ::

        Q, K, V = x W_q, x W_k, x W_v + b_v                         (B, L, H, D)
        Q, K, V <- causal depthwise conv over time (kernel k, D channels, shared by all heads;
                   output t sees inputs t-k+1..t), one conv each (Primer's MDHA)
        S_ij = (q_i + u) · k_j + q_i · r_{i-j} + b_{i-j}             (Transformer-XL relative form)
        y = softmax(S / sqrt(D), j <= i) V W_o

    ``u`` ``(H, D)``, ``r`` ``(max_len, H, D)`` and ``b`` ``(max_len, H)`` are learnable and
    zero-initialized (the official tables span ``2P`` offsets to cover Transformer-XL memory;
    without memory only the distances ``0..L-1`` are used, so the tables hold ``max_len``).

    The content term runs on :func:`headwise.attention` with a causal pattern; the relative term
    ``q_i · r_{i-j} + b_{i-j}`` depends on the query's content and is passed as the core's
    differentiable ``bias`` ``(B, H, L, L)``: one ``Q R^T`` product and a gather, as
    Transformer-XL's relative shift, not a Python loop.

    Args:
        embed_dim: ``E``.
        num_heads: ``H`` (``D = E / H``).
        kernel_size: ``k`` of the causal convolutions (official 3).
        max_len: longest sequence (size of the relative tables).
        backend: passed to :func:`headwise.attention`.
        dropout: attention dropout on the probabilities in ``[0, 1)``, in training mode only
            (:func:`headwise.attention`'s ``dropout_p``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kernel_size: int = 3,
        max_len: int = 512,
        backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("kernel_size", kernel_size),
            ("max_len", max_len),
        ):
            check_int(name, value, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(
                f"num_heads must divide embed_dim; got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kernel_size, self.max_len, self.backend = kernel_size, max_len, backend
        self.dropout = check_dropout(dropout, "dropout")
        d = self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.q_conv, self.k_conv, self.v_conv = (
            nn.Conv1d(d, d, kernel_size, groups=d) for _ in range(3)
        )
        self.content_bias = nn.Parameter(torch.zeros(num_heads, d))
        self.rel_key = nn.Parameter(torch.zeros(max_len, num_heads, d))
        self.rel_bias = nn.Parameter(torch.zeros(max_len, num_heads))

    def reset_parameters(self) -> None:
        """Projections and convolutions with PyTorch's defaults; ``u``, ``r``, ``b`` zero."""
        reset_submodules(self)
        with torch.no_grad():
            for p in (self.content_bias, self.rel_key, self.rel_bias):
                p.zero_()

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"kernel_size={self.kernel_size}, max_len={self.max_len}"
        )

    def _conv(self, conv: nn.Conv1d, t: torch.Tensor) -> torch.Tensor:
        b, length, h, d = t.shape
        # Left padding only: output t sees inputs t-k+1..t, never the future.
        seq = t.permute(0, 2, 3, 1).reshape(b * h, d, length)
        seq = conv(F.pad(seq, (self.kernel_size - 1, 0)))
        return seq.view(b, h, d, length).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, E)`` with ``L <= max_len`` → ``(B, L, E)``; causal."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, L, E={self.embed_dim}); got {got}")
        b, length, _ = x.shape
        if length > self.max_len:
            raise ValueError(f"x is longer than max_len={self.max_len}; got {tuple(x.shape)}")
        check_input("x", x, self)
        heads = (b, length, self.num_heads, self.head_dim)
        q = self._conv(self.q_conv, self.q_proj(x).view(heads))
        k = self._conv(self.k_conv, self.k_proj(x).view(heads))
        v = self._conv(self.v_conv, self.v_proj(x).view(heads))
        # rel[b, h, i, m] = q_i · r_m + b_m for distance m; bias[.., i, j] = rel[.., i, i - j].
        rel = torch.einsum("bihd,mhd->bhim", q, self.rel_key[:length])
        rel = rel + self.rel_bias[:length].T[None, :, None, :]
        pos = torch.arange(length, device=x.device)
        distance = (pos[:, None] - pos[None, :]).clamp_min(0)
        bias = rel.gather(-1, distance.expand(b, self.num_heads, length, length))
        scale = self.head_dim**-0.5
        out = attention(
            q + self.content_bias,
            k,
            v,
            patterns.causal(),
            scale=scale,
            bias=bias * scale,
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.reshape(b, length, self.embed_dim))


__all__ = ["RelativeConvAttention"]
