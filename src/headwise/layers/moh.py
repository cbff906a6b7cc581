"""MoH: Multi-Head Attention as Mixture-of-Head attention (Jin, Zhu, Yuan, Yan; ICML 2025,
arXiv 2410.11842; official code SkyworkAI/MoH).

Shapes: activations ``(B, L, E)`` (or packed ``(T, E)`` with ``cu_seqlens``), heads
``(B, L, H, D)``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from headwise._checks import check_choice, check_int, check_real
from headwise.layers._attention import QKNorm, SequenceAttention, packed_positions
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.multihead import MultiHeadAttention
from headwise.ops.attention.varlen import seqlens_from_cu
from headwise.patterns import Pattern
from headwise.types import Backend

Router = Literal["learned", "query_norm"]


class MoHOutput(NamedTuple):
    """``output`` ``(B, L, E)`` / ``(T, E)``; ``load_balance_loss`` (scalar, routed heads only;
    0 without routed heads); ``gates`` ``(B, L, H)`` / ``(T, H)``, the weight of every head."""

    output: torch.Tensor
    load_balance_loss: torch.Tensor
    gates: torch.Tensor


class MoHAttention(SequenceAttention):
    """Mixture-of-Head attention: every token uses the shared heads and its top-k routed heads.

    Per token ``t``, with head outputs ``o_{t,h}`` of ordinary softmax attention::

        y_t = sum_h g_{t,h} o_{t,h} W_O^h + b_O              (W_O^h: head h's rows of W_O)

    Heads ``0..h_s-1`` are shared, heads ``h_s..H-1`` routed (``h_r = H - h_s``); ``g`` is 0 for
    routed heads outside the token's top-``k``. Two gate rules, as in the official variants:

    ``router="learned"`` (MoH-ViT / MoH-DiT): bias-free linear routers on the layer input ``x_t``::

        p   = softmax(W_r x_t)                      (h_r routed scores)
        g_r = k * p ⊙ m / max(sum(p ⊙ m), eps)      (m: multi-hot top-k of p)
        g_s = h_s * softmax(W_s x_t)                (g_s = 1 when h_s = 1)
        w   = 2 * softmax(W_h x_t);  g_s *= w_0,  g_r *= w_1    (when h_s > 0 and h_r > 0)

    ``g_s`` is learned also when every head is shared (``h_s = H``, no routing: the early
    MoH-ViT stages and 19 of the 28 MoH-DiT-XL/2 layers), so such a layer is multi-head
    attention with per-token head weights, not plain MHA. Every router built is used.

    The count factors (``k``, ``h_s``, 2) make every active gate 1 for uniform routers, so with
    zero routers and ``k = h_r`` MoH is exactly multi-head attention.

    ``router="query_norm"`` (MoH-LLaMA3, parameter-free): the score of routed head ``i`` is
    ``||q_{t,i}||_2`` of the raw ``q_proj`` output (before qk-norm and rotary), divided by its
    unbiased standard deviation over the routed heads, softmaxed into ``p``; the gate is binary:
    1 for shared heads and the top-``k`` routed heads, 0 otherwise.

    Load-balance loss (Switch style, routed heads): ``L_b = h_r * sum_i f_i P_i`` with ``f_i`` the
    fraction of tokens whose top-k holds head ``i`` and ``P_i`` the mean of ``p_i``; it equals
    ``k`` for perfectly balanced routing. The papers add ``0.01 * L_b`` (mean over layers).

    All heads are computed by the core attention and gated afterwards, as the official code does;
    skipping unselected (token, head) pairs would need a kernel that does not exist yet.

    Args:
        embed_dim, num_heads, num_kv_heads, head_dim, bias, qk_norm, rotary, rope_base, pattern,
        causal, scale, backend, dropout: as :class:`headwise.layers.MultiHeadAttention`
            (self-attention; ``dropout`` acts on the probabilities, before the gates).
        num_shared: ``h_s`` always-active heads (the first ones), ``0 <= h_s <= H``.
        top_k: ``k`` routed heads per token, ``1 <= k <= h_r`` (ignored when ``h_s = H``).
        router: ``"learned"`` or ``"query_norm"`` (needs ``h_r >= 2`` for the std).
        eps: floor of the renormalization denominator.

    ``forward(x)`` or ``forward(x_packed, cu_seqlens=cu)`` returns a :class:`MoHOutput`. The
    steps and hook points are those of :class:`~headwise.layers._attention.SequenceAttention`;
    ``hook_z`` holds the head outputs before gating (the gates act in the merge step).
    :meth:`from_mha` converts a trained :class:`MultiHeadAttention`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_shared: int,
        top_k: int,
        router: Router = "learned",
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        qk_norm: QKNorm | None = None,
        rotary: bool = False,
        rope_base: float = 10000.0,
        pattern: Pattern | None = None,
        causal: bool = False,
        scale: float | None = None,
        backend: Backend = "auto",
        dropout: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            bias=bias,
            qk_norm=qk_norm,
            rotary=rotary,
            rope_base=rope_base,
            pattern=pattern,
            causal=causal,
            scale=scale,
            backend=backend,
            dropout=dropout,
        )
        check_choice("router", router, ("learned", "query_norm"))
        num_shared = check_int("num_shared", num_shared)
        if not 0 <= num_shared <= num_heads:
            raise ValueError(f"num_shared must be in [0, num_heads={num_heads}]; got {num_shared}")
        routed = num_heads - num_shared
        top_k = check_int("top_k", top_k)
        if routed and not 1 <= top_k <= routed:
            raise ValueError(
                f"top_k must be in [1, num_heads - num_shared = {routed}]; got {top_k!r}"
            )
        if router == "query_norm" and routed == 1:
            raise ValueError(
                "router='query_norm' standardises scores over the routed heads and needs at "
                "least 2 of them; got num_heads - num_shared = 1"
            )
        self.num_shared, self.num_routed = num_shared, routed
        self.top_k = top_k if routed else 0
        self.router = router
        self.eps = check_real("eps", eps, positive=True)
        learned = router == "learned"
        self.routed_router = (
            nn.Linear(embed_dim, routed, bias=False) if learned and routed else None
        )
        self.shared_router = (
            nn.Linear(embed_dim, num_shared, bias=False) if learned and num_shared > 1 else None
        )
        self.group_router = (
            nn.Linear(embed_dim, 2, bias=False) if learned and num_shared and routed else None
        )

    def reset_parameters(self) -> None:
        """Re-initialize the projections and qk-norms as :class:`MultiHeadAttention` does and the
        routers with PyTorch's ``nn.Linear`` default (Kaiming-uniform), as the official code."""
        reset_submodules(self)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_shared="
            f"{self.num_shared}, top_k={self.top_k}, router={self.router!r}"
        )

    @classmethod
    def from_mha(
        cls, mha: MultiHeadAttention, *, num_shared: int, top_k: int, router: Router = "learned"
    ) -> MoHAttention:
        """An MoH layer with ``mha``'s weights and zero routers.

        With ``top_k = num_heads - num_shared`` every gate is exactly 1 and the outputs equal
        ``mha``'s. With a smaller ``top_k`` zero learned routers tie, so the initial choice is
        implementation-defined until the routers are trained.
        """
        if not isinstance(mha, MultiHeadAttention):
            raise ValueError(f"mha must be a MultiHeadAttention; got {type(mha).__name__}")
        if mha.kv_dim != mha.embed_dim:
            raise ValueError(
                f"MoH is self-attention; got a cross-attention layer (kv_dim={mha.kv_dim}, "
                f"embed_dim={mha.embed_dim})"
            )
        norm = {nn.RMSNorm: "rms", nn.LayerNorm: "layer"}.get(type(mha.q_norm))
        weight = mha.q_proj.weight
        moh = cls(
            mha.embed_dim,
            mha.num_heads,
            num_shared=num_shared,
            top_k=top_k,
            router=router,
            num_kv_heads=mha.num_kv_heads,
            head_dim=mha.head_dim,
            bias=mha.q_proj.bias is not None,
            qk_norm=norm,
            rotary=mha.rotary,
            rope_base=mha.rope_base,
            pattern=mha.pattern,
            causal=mha.causal,
            scale=mha.scale,
            backend=mha.backend,
            dropout=mha.dropout,
        ).to(dtype=weight.dtype, device=weight.device)
        missing, unexpected = moh.load_state_dict(mha.state_dict(), strict=False)
        if unexpected or any(not k.endswith("router.weight") for k in missing):
            raise ValueError(f"cannot convert: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for r in (moh.routed_router, moh.shared_router, moh.group_router):
                if r is not None:
                    r.weight.zero_()
        return moh

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> MoHOutput:
        """``x`` ``(B, L, E)``, or packed ``(T, E)`` with ``cu_seqlens`` (one attention each)."""
        packed = cu_seqlens is not None
        rank = 2 if packed else 3
        if not isinstance(x, torch.Tensor) or x.dim() != rank or x.shape[-1] != self.embed_dim:
            want = "packed (T, E" if packed else "(B, L, E"
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be {want}={self.embed_dim}); got {got}")
        check_input("x", x, self)
        q_raw = self.q_proj(x).view(*x.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = self.project(x, q_raw=q_raw)
        if packed:
            lengths = seqlens_from_cu("cu_seqlens", cu_seqlens, x.shape[0])
            q, k = self.position(q, k, packed_positions(cu_seqlens, lengths, x.device))
            heads = self.attend_packed(q, k, v, cu_seqlens)
        else:
            q, k = self.position(q, k)
            heads = self.attend(q, k, v, self.effective_pattern())
        gates, loss = self._gates(x, q_raw)
        out = self.merge(heads * gates[..., None].to(heads.dtype))
        return MoHOutput(out, loss, gates)

    def _gates(self, x: torch.Tensor, q_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        shared = x.new_ones(*lead, self.num_shared)
        if self.shared_router is not None:
            shared = torch.softmax(self.shared_router(x), -1) * self.num_shared
        if not self.num_routed:
            return shared, x.new_zeros(())
        if self.router == "query_norm":
            scores = q_raw[..., self.num_shared :, :].norm(dim=-1)
            probs = torch.softmax(scores / scores.std(-1, keepdim=True), -1)
        else:
            probs = torch.softmax(self.routed_router(x), -1)
        chosen = probs.topk(self.top_k, -1).indices
        mask = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
        if self.router == "query_norm":
            routed = mask
        else:
            kept = probs * mask
            routed = kept / kept.sum(-1, keepdim=True).clamp_min(self.eps) * self.top_k
            if self.group_router is not None:
                balance = torch.softmax(self.group_router(x), -1) * 2
                shared, routed = shared * balance[..., :1], routed * balance[..., 1:]
        flat_mask = mask.reshape(-1, self.num_routed)
        flat_probs = probs.reshape(-1, self.num_routed)
        loss = self.num_routed * (flat_mask.mean(0) * flat_probs.mean(0)).sum()
        return torch.cat((shared, routed), -1), loss


__all__ = ["MoHAttention", "MoHOutput"]
