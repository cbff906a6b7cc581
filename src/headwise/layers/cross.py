"""Cross-attention family: queries from one stream, keys and values from another.

* :class:`CrossAttention` — multi-head cross-attention with a key-padding mask and any
  :mod:`headwise.patterns` pattern (e.g. AKI's ``modality_mutual`` on a joint sequence).
* :class:`ParameterFreeCrossAttention` — ADEM-VL's ``silu(x) silu(v)^T v`` fusion with adaptive
  dropping of low-score visual tokens.
* :class:`GlobalLocalCrossAttention` and :class:`PairwiseCrossAttention` — DCAL's GLCA (top-R
  queries by attention rollout, see :func:`attention_rollout`) and PWCA (a distractor image's
  keys/values appended, training only).
* :class:`ConditionalCrossAttention` — learned condition embeddings as queries over image tokens.

Shapes: activations ``(B, L, E)``; the softmax variants run on :func:`headwise.attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_int, check_real
from headwise.layers._init import check_input
from headwise.layers.multihead import KVCache, MultiHeadAttention
from headwise.ops.attention.rollout import attention_rollout


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_tokens(name: str, t: object, batch: int | None, width: int) -> torch.Tensor:
    ok = isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == width
    if not ok or (batch is not None and t.shape[0] != batch):
        b = "B" if batch is None else f"B={batch}"
        raise ValueError(f"{name} must be ({b}, L, {width}); got {_shape(t)}")
    return t


class CrossAttention(MultiHeadAttention):
    """Multi-head cross-attention (Vaswani et al. 2017): ``x`` attends ``context``.

    ``Q = x W_q`` ``(B, Lq, H, D)``, ``K, V = c W_k, c W_v`` ``(B, Lk, H_kv, D)``;
    ``y = softmax(Q K^T / sqrt(D) + mask) V W_o``. Everything of
    :class:`~headwise.layers.MultiHeadAttention` applies (GQA, qk-norm, patterns, ``kv_dim`` for a
    context of another width); in addition ``context_mask`` ``(B, Lk)`` (True = real) hides padded
    context tokens, and ``context=None`` attends ``x`` itself.

    Multimodal use: for a joint ``[text; image; question; answer]`` sequence, AKI's
    modality-mutual attention (Wang et al. 2025, arXiv 2503.02597) is
    ``CrossAttention(E, H, pattern=patterns.modality_mutual([((i0, i1), (i1, a))]))`` called with
    ``context=None``: causal, plus image tokens seeing the question (not the answer).
    """

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        context_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVCache | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, Lq, E)``, ``context`` ``(B, Lk, kv_dim)`` (default ``x``), ``context_mask``
        ``(B, Lk)`` bool; other arguments as :meth:`MultiHeadAttention.forward`. ``(B, Lq, E)``."""
        if context_mask is not None:
            if cu_seqlens is not None or cache is not None:
                raise ValueError("context_mask is for padded batches; got cu_seqlens or cache")
            keys = x if context is None else context
            expected = (keys.shape[0], keys.shape[1]) if isinstance(keys, torch.Tensor) else None
            if (
                not isinstance(context_mask, torch.Tensor)
                or context_mask.dtype != torch.bool
                or tuple(context_mask.shape) != expected
            ):
                raise ValueError(
                    f"context_mask must be a bool (B, Lk) = {expected} tensor; got "
                    f"{_shape(context_mask)}"
                    + (f" {context_mask.dtype}" if isinstance(context_mask, torch.Tensor) else "")
                )
            dtype = torch.promote_types(x.dtype, torch.float32)
            hidden = torch.zeros(context_mask.shape, dtype=dtype, device=x.device)
            hidden = hidden.masked_fill(~context_mask.to(x.device), float("-inf"))[:, None, None]
            bias = hidden if bias is None else bias + hidden
        return super().forward(x, context, cu_seqlens=cu_seqlens, cache=cache, bias=bias)


class ParameterFreeCrossAttention(nn.Module):
    """ADEM-VL parameter-free cross-attention with adaptive fusion (Hao et al. 2024,
    arXiv 2410.17779; official code Hao840/ADEM-VL).

    Text hidden states ``x`` ``(B, Lt, E)`` fuse visual tokens ``v`` ``(B, Nv, E)`` (already
    embedded into the language space) without any projection::

        A    = silu(x) silu(v + e_k)^T                    (B, Lt, Nv), no softmax
        tau  = element floor(gamma * Nv) of each row of A sorted ascending
        A    = A ⊙ [A >= tau]                            drop each text token's lowest scores
        y    = s * A (v + e_v)                            (B, Lt, E)

    ``gamma`` (``drop_ratio``) is the fraction of visual tokens each text token discards
    (``floor(gamma * Nv)`` of them, ties at the threshold kept); dropped pairs get exactly zero
    weight, so a dropped token never influences that text token's output. ``y`` is added to the
    block's output by the caller (the paper adds it next to the FFN of every LLM layer).

    Args:
        embed_dim: ``E``.
        drop_ratio: ``gamma`` in ``[0, 1)``.
        scale: ``s`` (the official code's per-layer ``s``).
        num_visual_tokens: if given, learnable offsets ``e_k`` (init ``N(0, 0.02^2)``) and
            ``e_v`` (init 0) of shape ``(Nv, E)``, as the official model's ``adapter_emb1/2``;
            otherwise there are no parameters at all.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        drop_ratio: float = 0.0,
        scale: float = 1.0,
        num_visual_tokens: int | None = None,
    ) -> None:
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        if not 0.0 <= check_real("drop_ratio", drop_ratio) < 1.0:
            raise ValueError(f"drop_ratio must be in [0, 1); got {drop_ratio!r}")
        scale = check_real("scale", scale)
        self.embed_dim, self.drop_ratio, self.scale = embed_dim, drop_ratio, scale
        self.key_offset = self.value_offset = None
        if num_visual_tokens is not None:
            tokens = check_int("num_visual_tokens", num_visual_tokens, minimum=1)
            self.key_offset = nn.Parameter(torch.empty(tokens, embed_dim))
            self.value_offset = nn.Parameter(torch.empty(tokens, embed_dim))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``e_k ~ N(0, 0.02^2)``, ``e_v = 0`` (the official ``adapter_emb1/2``); no-op without
        offsets."""
        if self.key_offset is not None:
            with torch.no_grad():
                self.key_offset.normal_(0.0, 0.02)
                self.value_offset.zero_()

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, drop_ratio={self.drop_ratio}, scale={self.scale}"

    def weights(self, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The fusion weights ``A ⊙ M`` ``(B, Lt, Nv)``; dropped pairs are exactly 0."""
        _check_tokens("x", x, None, self.embed_dim)
        _check_tokens("visual", visual, x.shape[0], self.embed_dim)
        check_input("x", x, self)
        check_input("visual", visual, x)
        if self.key_offset is not None and visual.shape[1] != self.key_offset.shape[0]:
            raise ValueError(
                f"visual must have Nv={self.key_offset.shape[0]} tokens (num_visual_tokens); "
                f"got {_shape(visual)}"
            )
        keys = visual if self.key_offset is None else visual + self.key_offset
        scores = F.silu(x) @ F.silu(keys).transpose(-1, -2)
        drop = int(self.drop_ratio * scores.shape[-1])
        if drop == 0:
            return scores
        # The kept set is a discrete choice: no gradient flows through the threshold.
        threshold = scores.detach().sort(-1).values[..., drop : drop + 1]
        return scores * (scores.detach() >= threshold)

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, Lt, E)``, ``visual`` ``(B, Nv, E)`` → ``(B, Lt, E)``."""
        values = visual if self.value_offset is None else visual + self.value_offset
        return self.scale * (self.weights(x, visual) @ values)


class GlobalLocalCrossAttention(MultiHeadAttention):
    """DCAL global-local cross-attention (Zhu et al., CVPR 2022, "Dual Cross-Attention Learning
    for Fine-Grained Visual Categorization and Object Re-Identification").

    The ``R = ceil(top_ratio * L)`` tokens with the highest ``scores`` (the CLS row of the
    attention rollout, :func:`attention_rollout`) become local queries over all tokens::

        idx = top-R(scores);  f_GLCA = softmax(Q_idx K^T / sqrt(D)) V        (B, R, E)

    Only the ``R`` selected rows are projected to queries. Weights are those of a
    :class:`~headwise.layers.MultiHeadAttention` (GLCA has its own in DCAL, not shared with SA).
    Paper defaults: ``top_ratio`` 0.1 (fine-grained categorisation), 0.3 (re-identification).
    To keep CLS out of the selection, pass its score as ``-inf``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, top_ratio: float = 0.1, **kwargs) -> None:
        super().__init__(embed_dim, num_heads, **kwargs)
        if not 0.0 < check_real("top_ratio", top_ratio) <= 1.0:
            raise ValueError(f"top_ratio must be in (0, 1]; got {top_ratio!r}")
        if self.rotary:
            raise ValueError("GLCA queries and keys are different token sets; got rotary=True")
        self.top_ratio = top_ratio

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, L, E)``, ``scores`` ``(B, L)`` → outputs ``(B, R, E)`` and the selected
        token indices ``(B, R)`` (ascending, so the local tokens keep their order)."""
        _check_tokens("x", x, None, self.embed_dim)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(x.shape[:2]):
            raise ValueError(f"scores must be (B, L) = {tuple(x.shape[:2])}; got {_shape(scores)}")
        count = max(1, math.ceil(self.top_ratio * x.shape[1]))
        idx = scores.topk(count, -1).indices.sort(-1).values
        local = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return super().forward(local, x), idx


class PairwiseCrossAttention(MultiHeadAttention):
    """DCAL pair-wise cross-attention (Zhu et al., CVPR 2022): a distractor image regularises
    the attention in training; at inference the layer is plain self-attention.

    Training, with ``x`` and a distractor ``x'`` from another image (same weights for both)::

        f_PWCA = softmax(Q [K; K']^T / sqrt(D)) [V; V']      (B, L, E)

    so the softmax mass is shared with distractor tokens. In ``eval()`` (or without a
    distractor) it is the layer's self-attention: in DCAL PWCA shares its weights with SA, so use
    this module as the SA layer.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, distractor: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` ``(B, L, E)``, ``distractor`` ``(B, L', E)`` (ignored in eval) → ``(B, L, E)``."""
        _check_tokens("x", x, None, self.embed_dim)
        if distractor is None or not self.training:
            return super().forward(x)
        _check_tokens("distractor", distractor, x.shape[0], self.embed_dim)
        check_input("distractor", distractor, self)
        return super().forward(x, torch.cat((x, distractor), 1))


class ConditionalCrossAttention(nn.Module):
    """Conditional cross-attention (Conditional Cross Attention Network for multi-space
    embedding, Song et al., ICCV 2023): one learned query set per condition (e.g. an attribute
    such as colour or shape) attends the image tokens, so a single backbone gives a separate,
    disentangled embedding per condition::

        Q = C[c]  (B, M, E)  learned condition queries,  K, V = image tokens W_k, W_v
        y = softmax(Q W_q K^T / sqrt(D)) V W_o           (B, M, E)

    Args:
        embed_dim: ``E``, width of the queries and output.
        num_heads: ``H``.
        num_conditions: number of conditions ``c``.
        queries_per_condition: ``M``.
        kv_dim: width of the image tokens (default ``E``).
        **kwargs: passed to :class:`CrossAttention` (``num_kv_heads``, ``qk_norm``, ``backend``...).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_conditions: int,
        *,
        queries_per_condition: int = 1,
        kv_dim: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        # checked before anything is allocated; the rest of **kwargs by CrossAttention
        embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        num_heads = check_int("num_heads", num_heads, minimum=1)
        kv_dim = None if kv_dim is None else check_int("kv_dim", kv_dim, minimum=1)
        num_conditions = check_int("num_conditions", num_conditions, minimum=1)
        queries = check_int("queries_per_condition", queries_per_condition, minimum=1)
        self.num_conditions, self.queries = num_conditions, queries
        self.condition_queries = nn.Parameter(torch.empty(num_conditions, queries, embed_dim))
        nn.init.normal_(self.condition_queries, std=0.02)
        self.attn = CrossAttention(embed_dim, num_heads, kv_dim=kv_dim, **kwargs)

    def reset_parameters(self) -> None:
        """Condition queries ``N(0, 0.02^2)``, then the attention as
        :meth:`MultiHeadAttention.reset_parameters`."""
        nn.init.normal_(self.condition_queries, std=0.02)
        self.attn.reset_parameters()

    def forward(
        self,
        image: torch.Tensor,
        condition: torch.Tensor,
        *,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``image`` ``(B, L, kv_dim)``, ``condition`` ``(B,)`` integer ids → ``(B, M, E)``."""
        _check_tokens("image", image, None, self.attn.kv_dim)
        check_input("image", image, self)
        if (
            not isinstance(condition, torch.Tensor)
            or condition.shape != (image.shape[0],)
            or condition.is_floating_point()
        ):
            raise ValueError(
                f"condition must be integer ids of shape (B,) = ({image.shape[0]},); got "
                f"{_shape(condition)}"
            )
        if condition.numel() and not (
            0 <= condition.min() and condition.max() < self.num_conditions
        ):
            raise ValueError(
                f"condition ids must be in [0, {self.num_conditions}); got "
                f"{condition.min().item()}..{condition.max().item()}"
            )
        queries = self.condition_queries[condition.to(self.condition_queries.device)]
        return self.attn(queries.to(image.dtype), image, context_mask=image_mask)


__all__ = [
    "ConditionalCrossAttention",
    "CrossAttention",
    "GlobalLocalCrossAttention",
    "PairwiseCrossAttention",
    "ParameterFreeCrossAttention",
    "attention_rollout",
]
