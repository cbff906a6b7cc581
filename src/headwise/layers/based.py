"""Based: Taylor linear attention plus a small sliding-window softmax attention.

Arora et al., "Simple linear attention language models balance the recall-throughput tradeoff"
(ICML 2024, arXiv 2402.18668); official code HazyResearch/zoology (``mixers/based.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from headwise import patterns
from headwise._checks import check_int
from headwise.layers._init import check_input, reset_submodules
from headwise.ops.attention import attention
from headwise.ops.linear import linear_attention
from headwise.types import Backend


class BasedAttention(nn.Module):
    """Causal Based token mixer: global Taylor linear attention + local softmax attention.

    For ``x: (B, L, d)``, ``H`` heads, feature dim ``d'`` and value head dim ``d/H``::

        q, k = x W_q, x W_k                  (B, L, H, d'),  v = x W_v   (B, L, H, d/H)
        phi(x) . phi(y) = 1 + z + z^2/2,    z = x . y / sqrt(d')       (second-order Taylor)
        lin_i = sum_{j<=i} (phi(q_i).phi(k_j)) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + 1e-12)
        win_i = softmax over keys j in [i - w, i] of the window branch's own q, k, v
        y     = W_o concat_heads(lin + win)

    The Based paper interleaves linear-attention, sliding-window and short-convolution layers;
    here the two attention branches are summed inside one mixer (``window_size=0`` leaves only
    the linear branch, which is exactly Based's ``mixers/based.py``). The short convolution is not
    part of this module. Projections are bias-free, as in zoology.

    Args:
        embed_dim: ``d`` (divisible by ``num_heads``).
        num_heads: ``H``.
        feature_dim: ``d'`` before the Taylor map (16 in Based; features have ``1 + d' + d'^2``).
        window_size: ``w``; every query sees its ``w`` previous tokens and itself (0 disables).
        chunk_size, backend: passed to :func:`headwise.ops.linear.linear_attention`.

    Shapes: ``forward(x: (B, L, d)) -> (B, L, d)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        feature_dim: int = 16,
        window_size: int = 64,
        chunk_size: int | None = None,
        backend: Backend = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("feature_dim", feature_dim),
        ):
            check_int(name, value, minimum=1)
        check_int("window_size", window_size, minimum=0)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads; got {embed_dim} and {num_heads}"
            )
        self.embed_dim, self.num_heads, self.feature_dim = embed_dim, num_heads, feature_dim
        self.head_dim = embed_dim // num_heads
        self.window_size, self.chunk_size, self.backend = window_size, chunk_size, backend
        factory = {"device": device, "dtype": dtype, "bias": False}
        self.q_proj = nn.Linear(embed_dim, num_heads * feature_dim, **factory)
        self.k_proj = nn.Linear(embed_dim, num_heads * feature_dim, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.window_qkv = nn.Linear(embed_dim, 3 * embed_dim, **factory) if window_size else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, **factory)

    def reset_parameters(self) -> None:
        """Re-initialize the projections (PyTorch's ``nn.Linear`` default, as zoology)."""
        reset_submodules(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, {self.embed_dim}); got {tuple(x.shape)}")
        check_input("x", x, self)
        batch, length, _ = x.shape
        features = (batch, length, self.num_heads, self.feature_dim)
        heads = (batch, length, self.num_heads, self.head_dim)
        out = linear_attention(
            self.q_proj(x).view(features),
            self.k_proj(x).view(features),
            self.v_proj(x).view(heads),
            feature_map="taylor",
            normalize=True,
            eps=1e-12,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        if self.window_qkv is not None:
            q, k, v = self.window_qkv(x).view(batch, length, 3, *heads[2:]).unbind(2)
            # A window that reaches back to token 0 from the last query is plain causal attention,
            # which dense kernels (SDPA) serve much faster than a sparse pattern.
            window = (
                patterns.causal()
                if length <= self.window_size + 1
                else patterns.sliding_window(self.window_size)
            )
            out = out + attention(q, k, v, pattern=window)
        return self.out_proj(out.flatten(-2))
