"""Multi-head attention with GQA/MQA, qk-norm, rotary embeddings, packed batches and a KV cache.

Shapes follow the library convention: activations ``(B, L, E)``, heads ``(B, L, H, D)``, packed
batches ``(T, E)`` / ``(T, H, D)`` with ``cu_seqlens``.
"""

from __future__ import annotations

import torch

from headwise._checks import check_int
from headwise.layers._attention import QKNorm, SequenceAttention, apply_rotary, packed_positions
from headwise.layers._init import check_input
from headwise.ops.attention.varlen import seqlens_from_cu


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


class KVCache:
    """Keys and values of the tokens decoded so far, for incremental self-attention.

    Buffers ``k`` and ``v`` ``(B, max_len, H_kv, D)`` are preallocated; the first ``length``
    positions are filled. Keys are stored after qk-norm and rotary, so a decoding step transforms
    only its new tokens. Meant for inference (``torch.no_grad()``): each step writes into the
    buffers in place, which autograd would reject on a later backward.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        shape = tuple(
            check_int(name, value, minimum=1)
            for name, value in (
                ("batch", batch),
                ("max_len", max_len),
                ("num_kv_heads", num_kv_heads),
                ("head_dim", head_dim),
            )
        )
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ``(B, L_new, H_kv, D)``; return all keys and values so far."""
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[0] != self.batch or t.shape[2:] != self.k.shape[2:]:
                raise ValueError(
                    f"{name} must be (B, L_new, H_kv, D) = ({self.batch}, L_new, "
                    f"{self.k.shape[2]}, {self.k.shape[3]}) to fit the cache; got {_shape(t)}"
                )
            if t.dtype != self.k.dtype or t.device != self.k.device:
                raise ValueError(
                    f"{name} must match the cache's {self.k.dtype} on {self.k.device}; got "
                    f"{t.dtype} on {t.device}"
                )
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"cache holds max_len={self.max_len} tokens; {self.length} cached + "
                f"{k.shape[1]} new = {end}"
            )
        self.k[:, self.length : end] = k
        self.v[:, self.length : end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def reset(self) -> None:
        """Forget the cached tokens (the buffers are reused)."""
        self.length = 0


class MultiHeadAttention(SequenceAttention):
    """Multi-head softmax attention (Vaswani et al. 2017, "Attention Is All You Need").

    For input ``x`` ``(B, Lq, E)`` and context ``c`` (``x`` itself for self-attention)::

        Q = x W_q + b_q                (B, Lq, H, D)
        K = c W_k + b_k,  V = c W_v + b_v   (B, Lk, H_kv, D)
        Q, K <- norm(Q), norm(K)       per head over D, if qk_norm
        Q, K <- rot(Q, p_q), rot(K, p_k)    if rotary (see :func:`apply_rotary`)
        O_h = softmax(scale * Q_h K_g^T, hidden where the pattern says no) V_g,  g = h // (H/H_kv)
        y = concat_h(O_h) W_o + b_o    (B, Lq, E)

    ``H_kv < H`` is grouped-query attention (GQA, Ainslie et al. 2023): ``H / H_kv`` query heads
    share one key/value head; ``H_kv = 1`` is multi-query attention.

    Args:
        embed_dim: ``E``, width of ``x`` and of the output.
        num_heads: ``H`` query heads.
        num_kv_heads: ``H_kv`` key/value heads, dividing ``H`` (default ``H``).
        head_dim: ``D`` (default ``E // H``, which then must divide exactly).
        kv_dim: width of ``context`` for cross-attention (default ``E``).
        bias: biases in the four projections.
        qk_norm: ``None``, ``"rms"`` (RMSNorm, as Qwen3 / Gemma 3) or ``"layer"`` (LayerNorm, as
            ViT-22B) over each head's ``D`` channels of ``Q`` and ``K``, one learnt scale shared
            by all heads, applied before rotary. Keeps logits bounded at large scale.
        rotary: rotary position embeddings (RoFormer, Su et al. 2021), self-attention only. Query
            and key positions are token indices: offset by the cache length when decoding, and
            restarting at 0 for each sequence of a packed batch.
        rope_base: rotary base frequency.
        pattern: a :mod:`headwise.patterns` object, bottom-right aligned (``None`` = full).
        causal: shortcut for ``patterns.causal()``, intersected with ``pattern`` if both given.
        scale: score scale (default ``1 / sqrt(D)``).
        backend: passed to :func:`headwise.ops.attention.attention`.
        dropout: attention dropout on the probabilities in ``[0, 1)``, in training mode only
            (``nn.MultiheadAttention``'s ``dropout``; :func:`headwise.attention`'s
            ``dropout_p``).

    Call as ``mha(x)``, ``mha(x, context)``, ``mha(x_packed, cu_seqlens=cu)`` with ``x_packed``
    ``(T, E)``, or step by step with ``cache = mha.new_cache(B, max_len)`` then
    ``y = mha(x_new, cache=cache)``: the cache is updated in place, and step outputs equal the
    full-sequence ones for causal patterns (by bottom-right alignment).

    The steps and the hook points (``hook_q`` ... ``hook_result``, to read or patch activations)
    are those of :class:`~headwise.layers._attention.SequenceAttention`.
    """

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, kv_dim={self.kv_dim}, "
            f"rotary={self.rotary}, pattern={self.pattern}, causal={self.causal}, "
            f"dropout={self.dropout}"
        )

    def new_cache(
        self,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty :class:`KVCache` for this layer, on the parameters' dtype and device."""
        weight = self.k_proj.weight
        return KVCache(
            batch,
            max_len,
            self.num_kv_heads,
            self.head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVCache | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to ``context`` (default ``x``).

        Args:
            x: ``(B, Lq, E)``, or packed ``(T, E)`` with ``cu_seqlens``.
            context: ``(B, Lk, kv_dim)`` for cross-attention.
            cu_seqlens: ``(N + 1,)`` int offsets of the sequences in a packed ``x``; each
                sequence attends only to itself. The layer's pattern is evaluated in packed
                positions (as :func:`attention_varlen` does), so relative patterns such as
                causal or sliding windows apply per sequence, absolute ones (sinks) do not.
            cache: a :class:`KVCache` of earlier tokens (self-attention); updated in place.
            bias: additive scores broadcastable to ``(B, H, Lq, Lk)`` (key padding, ALiBi),
                ``Lk`` counting cached tokens; not with ``cu_seqlens``.

        Returns:
            ``(B, Lq, E)``, or ``(T, E)`` for packed input.
        """
        if cu_seqlens is not None:
            return self._forward_packed(x, context, cu_seqlens, cache, bias)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            hint = "; packed (T, E) input needs cu_seqlens" if _is_rank(x, 2) else ""
            raise ValueError(f"x must be (B, L, E={self.embed_dim}); got {_shape(x)}{hint}")
        check_input("x", x, self)
        batch = x.shape[0]
        if cache is not None and (not isinstance(cache, KVCache) or cache.batch != batch):
            got = f"batch {cache.batch}" if isinstance(cache, KVCache) else type(cache).__name__
            raise ValueError(f"cache must be a KVCache for batch B={batch}; got {got}")
        if context is not None:
            self._check_context(context, batch, cache)
        q, k, v = self.project(x, context)
        q, k = self.position(q, k, 0 if cache is None else cache.length)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.merge(self.attend(q, k, v, self.effective_pattern(), bias=bias))

    def _forward_packed(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        cache: KVCache | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"with cu_seqlens, x must be packed (T, E={self.embed_dim}); got {_shape(x)}"
            )
        check_input("x", x, self)
        for name, value in (("context", context), ("cache", cache), ("bias", bias)):
            if value is not None:
                raise ValueError(f"cu_seqlens (packed self-attention) takes no {name}")
        lengths = seqlens_from_cu("cu_seqlens", cu_seqlens, x.shape[0])
        q, k, v = self.project(x)
        q, k = self.position(q, k, packed_positions(cu_seqlens, lengths, x.device))
        return self.merge(self.attend_packed(q, k, v, cu_seqlens))

    def _check_context(self, context: torch.Tensor, batch: int, cache: KVCache | None) -> None:
        if (
            not isinstance(context, torch.Tensor)
            or context.dim() != 3
            or context.shape[0] != batch
            or context.shape[-1] != self.kv_dim
        ):
            raise ValueError(
                f"context must be (B={batch}, Lk, kv_dim={self.kv_dim}); got {_shape(context)}"
            )
        check_input("context", context, self)
        if cache is not None:
            raise ValueError("cache is for self-attention; got a context as well")
        if self.rotary:
            raise ValueError(
                "rotary relates positions within one sequence and applies to self-attention "
                "only; got a context"
            )


def _is_rank(x: object, rank: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == rank


__all__ = ["KVCache", "MultiHeadAttention", "QKNorm", "apply_rotary"]
