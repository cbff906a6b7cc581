"""S2-Attention: heterogeneous context sharding among attention heads (local-stride pattern).

Lin, Zhang et al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads"
(arXiv 2407.17678; first titled "Efficient LLM Training and Serving with Heterogeneous Context
Sharding among Attention Heads"). Official kernels: linxihui/dkernel (``get_sparse_attn_mask``,
``is_kv_cache_efficient``); production user: Phi-3-small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise._checks import check_bool, check_int
from headwise.layers.multihead import MultiHeadAttention
from headwise.patterns import EMPTY, Pattern, query_positions


@dataclass(frozen=True)
class S2Pattern(Pattern):
    """Per-head local-stride block pattern of S2-Attention (dkernel ``get_sparse_attn_mask``).

    Keys and queries are grouped in blocks of ``block`` tokens; ``i`` is the query's block (from
    its bottom-right-aligned position), ``j`` the key's block, ``g = h // (H / H_kv)`` the KV head
    that query head ``h`` reads. A sparse head keeps, in causal mode::

        M_g[i, j] = (j <= i) AND ((i - j < n_local) OR ((j + g*s + o) mod v == 0))

    and inside kept blocks the token-level causal mask (key position <= query position). The last
    ``num_dense_heads`` KV heads are plain causal. ``s`` (``head_step``) defaults to
    ``max(1, v // H)`` with ``H`` the number of *query* heads, as in dkernel's code; ``o`` is
    ``head_offset``. With ``homo_head`` every head uses ``g = 0`` (no heterogeneity).

    Bidirectional (``causal=False``): stripes are counted outward from the local window,
    ``d = max(0, (i - j) - n_local + 1) + max(0, (j - i) - n_right + 1)``; a block is kept iff
    ``d == 0`` (inside the window) or ``(d + g*s + o) mod v == 0``. The reference text gives this
    rule without the head term; we keep the head shift so that heads stay heterogeneous
    (``homo_head=True`` or ``g*s + o == 0`` gives the reference rule). Dense heads see everything.
    """

    heads: int
    num_kv_heads: int
    block: int
    n_local: int
    vert_stride: int
    head_step: int
    head_offset: int = 0
    num_dense_heads: int = 0
    homo_head: bool = False
    causal: bool = True
    n_right: int = 1

    @property
    def num_heads(self) -> int:  # type: ignore[override]
        return self.heads

    def __repr__(self) -> str:
        # the dataclass's text, written out: torch.compile traces it (auto's reasons name the
        # pattern), where the generated one is skipped and breaks the graph
        return (
            f"S2Pattern(heads={self.heads!r}, num_kv_heads={self.num_kv_heads!r}, "
            f"block={self.block!r}, n_local={self.n_local!r}, vert_stride={self.vert_stride!r}, "
            f"head_step={self.head_step!r}, head_offset={self.head_offset!r}, "
            f"num_dense_heads={self.num_dense_heads!r}, homo_head={self.homo_head!r}, "
            f"causal={self.causal!r}, n_right={self.n_right!r})"
        )

    def __post_init__(self) -> None:
        check_int("num_heads", self.heads, minimum=1)
        check_int("num_kv_heads", self.num_kv_heads, minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads; got num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}"
            )
        check_int("block", self.block, minimum=1)
        check_int("n_local", self.n_local, minimum=1)
        check_int("vert_stride", self.vert_stride, minimum=1)
        check_int("head_step", self.head_step, minimum=1)
        check_int("head_offset", self.head_offset, minimum=0)
        check_int("n_right", self.n_right, minimum=1)
        check_int("num_dense_heads", self.num_dense_heads)
        check_bool("homo_head", self.homo_head)
        check_bool("causal", self.causal)
        if not 0 <= self.num_dense_heads <= self.num_kv_heads:
            raise ValueError(
                f"num_dense_heads must be in [0, num_kv_heads={self.num_kv_heads}]; "
                f"got {self.num_dense_heads}"
            )
        if self.homo_head and self.num_dense_heads:
            raise ValueError("homo_head=True cannot have dense heads (every head is the same)")

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        kv_head = h // (self.num_heads // self.num_kv_heads)
        shift = torch.zeros_like(kv_head) if self.homo_head else kv_head * self.head_step
        shift = shift + self.head_offset
        dense = kv_head >= self.num_kv_heads - self.num_dense_heads
        if self.causal:
            pos = query_positions(q_idx, q_len, kv_len, "bottom_right")
            i, j = pos // self.block, kv_idx // self.block
            kept = (i - j < self.n_local) | ((j + shift) % self.vert_stride == 0)
            return (kv_idx <= pos) & (kept | dense)
        i, j = q_idx // self.block, kv_idx // self.block
        d = (i - j - self.n_local + 1).clamp_min(0) + (j - i - self.n_right + 1).clamp_min(0)
        return (d == 0) | ((d + shift) % self.vert_stride == 0) | dense

    def kv_cache_fraction(self, length: int) -> torch.Tensor:
        """``(H,)`` float: fraction of the ``length`` cached keys each query head still needs.

        For a KV-cache-efficient pattern (see :func:`is_kv_cache_efficient`) a key no longer
        visible to the newest query is never needed again, so the per-head cache is exactly the
        keys visible to the last position: its residue-class blocks plus the last ``n_local``
        blocks, about ``length / v + n_local * block`` tokens (§4.2). Dense heads need 1.
        """
        check_int("length", length, minimum=1)
        if not self.causal:
            raise ValueError(
                "kv_cache_fraction is for causal (decoding) patterns; got causal=False"
            )
        last = torch.tensor([length - 1])
        keys = torch.arange(length)
        return self.visible(last, keys, length, length)[:, 0].double().mean(-1)


def is_kv_cache_efficient(layout: torch.Tensor) -> bool:
    """Whether a causal block layout lets a decoder drop keys for good (dkernel's predicate).

    ``layout`` ``(n_q, n_k)`` or ``(H, n_q, n_k)``, bool or EMPTY/PARTIAL/FULL codes (as
    :meth:`Pattern.block_layout`), with equal query and key blocks. Efficient means: for every
    key block ``j`` and query blocks ``i >= j``, once ``j`` is unused by query block ``i`` it is
    unused by every later query block (a column of the lower triangle never switches from unused
    to used). Then a cache may evict a key block as soon as the newest query stops seeing it.
    """
    if not isinstance(layout, torch.Tensor) or layout.dim() not in (2, 3):
        got = tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__
        raise ValueError(f"layout must be (n_q, n_k) or (H, n_q, n_k); got {got}")
    used = (layout != EMPTY) if layout.dtype != torch.bool else layout
    used = used.reshape(-1, *used.shape[-2:]).to(torch.int8)
    n_q, n_k = used.shape[-2:]
    # Transitions from query block i to i + 1 only matter where key block j <= i (not future keys).
    past = torch.arange(n_q - 1)[:, None] >= torch.arange(n_k)[None, :]
    switched_on = (used[:, 1:] - used[:, :-1]) > 0
    return not bool((switched_on & past).any())


class S2Attention(MultiHeadAttention):
    """Multi-head attention with S2-Attention's per-head local-stride block sparsity.

    A :class:`MultiHeadAttention` (projections, GQA, qk-norm, RoPE, KV cache) whose pattern is an
    :class:`S2Pattern`: each KV head keeps the last ``local_blocks`` key blocks plus one block in
    every ``vert_stride``, at a head-dependent offset, so that the heads shard the context between
    them. When the number of sparse heads is at least ``vert_stride`` (``head_step = 1``) the union
    of the shards is the whole causal context; with fewer heads only their residues are covered.
    Shapes: ``forward(x: (B, L, E)) -> (B, L, E)``; heads ``(B, L, H, D)`` inside.

    Args:
        embed_dim, num_heads, num_kv_heads, **kwargs: as :class:`MultiHeadAttention`
            (``pattern`` and ``causal`` are set by this layer).
        block_size: sparse block ``b`` in tokens (dkernel default 64, minimum 16 there).
        local_blocks: ``n_local``, local window in blocks, counting the diagonal block.
        vert_stride: ``v``; one block of every ``v`` is kept beyond the local window.
        head_step: ``s``; default ``max(1, v // num_heads)``.
        head_offset: ``o``.
        num_dense_heads: the last this-many KV heads are dense (causal).
        homo_head: all heads use the same stripes.
        causal: ``False`` gives the bidirectional variant (stripes counted outward from the
            window of ``local_blocks`` back and ``right_blocks`` forward).
        right_blocks: forward extent of the bidirectional window, counting the diagonal block.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        block_size: int = 64,
        local_blocks: int = 16,
        vert_stride: int = 8,
        num_kv_heads: int | None = None,
        head_step: int | None = None,
        head_offset: int = 0,
        num_dense_heads: int = 0,
        homo_head: bool = False,
        causal: bool = True,
        right_blocks: int = 1,
        **kwargs,
    ) -> None:
        for name in ("pattern", "causal"):
            if name in kwargs:
                raise ValueError(f"S2Attention sets {name} itself; got {name}={kwargs[name]!r}")
        check_int("num_heads", num_heads, minimum=1)
        check_int("vert_stride", vert_stride, minimum=1)
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_int("num_kv_heads", kv_heads, minimum=1)
        s2 = S2Pattern(
            heads=num_heads,
            num_kv_heads=kv_heads,
            block=block_size,
            n_local=local_blocks,
            vert_stride=vert_stride,
            head_step=max(1, vert_stride // num_heads) if head_step is None else head_step,
            head_offset=head_offset,
            num_dense_heads=num_dense_heads,
            homo_head=homo_head,
            causal=causal,
            n_right=right_blocks,
        )
        super().__init__(embed_dim, num_heads, num_kv_heads=kv_heads, pattern=s2, **kwargs)

    def kv_cache_fraction(self, length: int) -> torch.Tensor:
        """``(H,)``: fraction of a ``length``-token KV cache each query head needs (§4.2)."""
        return self.pattern.kv_cache_fraction(length)


__all__ = ["S2Attention", "S2Pattern", "is_kv_cache_efficient"]
