"""Selective Multi-Head Attention (SMHA) from "Union of Experts: Adapting Hierarchical Routing to
Equivalently Decomposed Transformer" (Yang et al., arXiv 2503.02495; official code
YujiaoYang-work/UoE, language-model ``SMHA_v3``).

Shapes: activations ``(B, L, E)``, heads ``(B, L, H, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise import patterns
from headwise._checks import check_bool, check_int, check_real
from headwise.layers._init import check_input, head_dim_of, reset_submodules
from headwise.ops.attention import attention
from headwise.ops.attention.dropout import check_dropout
from headwise.types import Backend

# built once, outside any traced forward: a pattern made while torch.compile traces breaks the
# graph at the attention operators' key
_CAUSAL = patterns.causal()


class SelectiveMultiHeadAttention(nn.Module):
    """Heads as experts: each head attends over, and writes back to, only the tokens routed to it.

    ::

        p_t = softmax(W_g x_t + b_g)                     (H scores per token)
        S_h = {t : h in top-k(p_t)}                      (tokens routed to head h, per sequence)
        for each head h, on the tokens of S_h in their original order (so causal stays exact):
            O_h = softmax(Q_h K_h^T / sqrt(D), causal over S_h) V_h       Q_h = x_{S_h} W_q^h ...
        y_t = sum_{h : t in S_h} O_{h,t} W_o^h + b_o

    A token not routed to head ``h`` neither queries, nor is a key/value of, nor receives output
    from head ``h``; the attention work of each head scales with ``|S_h|``. As in the official
    code, router scores only select (they do not weight outputs), so the router receives no
    gradient through this layer.

    Compaction: per (sequence, head) the selected positions are sorted ascending and padded to
    ``T = max |S_h|``; all (sequence, head) pairs then run as one batch of single-head problems
    through :func:`headwise.attention` (a causal pattern keeps padding behind every real query;
    bidirectionally a ``-inf`` key bias hides it). Every token is projected by all heads in one
    product (``q, k, v`` stacked head by head), one gather of (token, head) rows of ``3 D``
    values compacts all three, and one index copy puts each head's outputs back (zero where a
    token is not routed) before a single output projection: the same sums as projecting only
    the selected rows. The dense products do ``H / top_k`` times those rows' multiply-adds (2x
    by default) and still cost less than per-head batched products on gathered ``E``-wide rows.
    ``T`` depends on the routing: ``torch.compile`` breaks the graph where it is read, unless
    ``torch._dynamo.config.capture_scalar_outputs = True``, which keeps ``T`` a symbol (one
    graph for every routing, ``fullgraph=True`` included).

    Differences from the official code: selection ranks tokens by their router probability within
    the sequence; the official code first divides scores by their sum over the *batch* (so one
    sample's selection depends on the others) and pads every head to ``T`` with extra
    lowest-score tokens, which here are padding that no one sees. No RoPE / Transformer-XL memory.
    The block's residual and LayerNorm are the caller's.

    Args:
        embed_dim: ``E``.
        num_heads: ``H``.
        top_k: heads per token (default ``H // 2``, the official ``attn_topk``).
        causal: autoregressive (default, as the language model) or bidirectional.
        head_dim: ``D`` (default ``E // H``).
        bias: biases in the projections.
        scale: logit scale (default ``1 / sqrt(D)``).
        backend: passed to :func:`headwise.attention`.
        dropout: attention dropout on the probabilities in ``[0, 1)``, in training mode only
            (:func:`headwise.attention`'s ``dropout_p``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        top_k: int | None = None,
        causal: bool = True,
        head_dim: int | None = None,
        bias: bool = True,
        scale: float | None = None,
        backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            check_int(name, value, minimum=1)
        causal, bias = check_bool("causal", causal), check_bool("bias", bias)
        scale = None if scale is None else check_real("scale", scale)
        head_dim = head_dim_of("embed_dim", embed_dim, num_heads, head_dim)
        top_k = max(1, num_heads // 2) if top_k is None else check_int("top_k", top_k)
        if not 1 <= top_k <= num_heads:
            raise ValueError(f"top_k must be in [1, num_heads={num_heads}]; got {top_k!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.top_k, self.causal, self.scale, self.backend = top_k, causal, scale, backend
        self.dropout = check_dropout(dropout, "dropout")
        inner = num_heads * head_dim
        self.router = nn.Linear(embed_dim, num_heads)
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def reset_parameters(self) -> None:
        """Re-initialize the router and projections (PyTorch's ``nn.Linear`` default)."""
        reset_submodules(self)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, top_k={self.top_k}, "
            f"causal={self.causal}"
        )

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Which heads each token is routed to: bool ``(B, L, H)``, ``top_k`` per token."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, L, E={self.embed_dim}); got {got}")
        check_input("x", x, self)
        scores = torch.softmax(self.router(x), -1)
        chosen = scores.topk(self.top_k, -1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """All heads' queries, keys and values of every token in one product: ``(B, L, H, 3, D)``.

        The three projections' weights are stacked head by head, so one (token, head) row holds
        that head's ``q, k, v`` side by side and a single gather of rows compacts all three."""
        h, d, e = self.num_heads, self.head_dim, self.embed_dim
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.stack([p.weight.view(h, d, e) for p in projs], 1).view(h * 3 * d, e)
        bias = None
        if self.q_proj.bias is not None:
            bias = torch.stack([p.bias.view(h, d) for p in projs], 1).flatten()
        return F.linear(x, weight, bias).view(*x.shape[:2], h, 3, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, E)`` → ``(B, L, E)``."""
        selected = self.route(x)
        b, length, _ = x.shape
        h, d = self.num_heads, self.head_dim
        counts = selected.sum(1)  # (B, H)
        slots = int(counts.max()) if counts.numel() else 0
        # always true (every token picks top_k >= 1 heads); with capture_scalar_outputs,
        # torch.compile keeps this data-dependent length symbolic in one graph on these bounds
        torch._check(slots >= min(1, b * length))
        torch._check(slots <= length)
        position = torch.arange(length, device=x.device)
        # Selected positions first, in order; then the others (padding slots no one sees).
        order = torch.where(selected, position[:, None], position[:, None] + length)
        idx = order.transpose(1, 2).sort(-1).values[..., :slots] % length  # (B, H, T)
        valid = torch.arange(slots, device=x.device) < counts[..., None]  # (B, H, T)
        # Row (b, idx, h) of the (B·L·H) token-head rows; distinct within each (b, h).
        batch = torch.arange(b, device=x.device)[:, None, None] * length
        rows = ((batch + idx) * h + torch.arange(h, device=x.device)[:, None]).flatten()
        picked = self._qkv(x).view(b * length * h, 3, d).index_select(0, rows)
        q, k, v = picked.view(b * h, slots, 3, 1, d).unbind(2)
        bias = None
        if not self.causal:
            hidden = torch.zeros(valid.shape, dtype=q.dtype, device=x.device)
            bias = hidden.masked_fill(~valid, float("-inf")).view(b * h, 1, 1, slots)
        out = attention(
            q,
            k,
            v,
            _CAUSAL if self.causal else None,
            scale=self.scale,
            bias=bias,
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
        )
        # Each head's outputs back at their tokens (zero where a token is not routed), then one
        # output projection: sum_h O_{h,t} W_o^h over the heads that hold t.
        out = out.reshape(b * h * slots, d) * valid.reshape(-1, 1)
        merged = out.new_zeros(b * length * h, d).index_copy(0, rows, out)
        return self.out_proj(merged.view(b, length, h * d))


__all__ = ["SelectiveMultiHeadAttention"]
