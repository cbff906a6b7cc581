"""The base of headwise's softmax sequence layers: project → position → attend → merge, with hooks.

:class:`SequenceAttention` holds what those layers share (argument checks, the four projections,
qk-norm, rotary positions, the core attention call) as one method per step, so that a layer
overrides the step it changes (as x-transformers separates ``Attend`` from ``Attention``, and
timm's blocks share one ``Attention``). Each step passes its result through a
:class:`headwise.hooks.HookPoint` named as in TransformerLens, to read or patch from outside.
:func:`apply_rotary` and :func:`packed_positions` are the position step's building blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from headwise import patterns
from headwise._checks import Unsupported, check_bool, check_choice, check_int, check_real
from headwise.hooks import HookPoint
from headwise.layers._init import head_dim_of, reset_submodules
from headwise.ops.attention import attention, attention_varlen
from headwise.ops.attention.dropout import Dropout, check_dropout, draw_seed_tensor
from headwise.patterns import Pattern
from headwise.patterns.base import check_pattern
from headwise.types import Backend

QKNorm = Literal["rms", "layer"]
_QK_NORMS = ("rms", "layer")


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoFormer, Su et al. 2021), "rotate_half" convention.

    ``x`` ``(..., L, H, D)`` with even ``D``, ``positions`` ``(L,)`` (any integers, negative too).
    Channel ``i < D/2`` is paired with ``i + D/2`` (Llama / GPT-NeoX layout, not the interleaved
    ``(2i, 2i+1)`` pairs of the paper) and the pair is rotated by ``theta_i = p * base^(-2i/D)``::

        x'_i       = x_i cos(theta_i) - x_{i+D/2} sin(theta_i)
        x'_{i+D/2} = x_{i+D/2} cos(theta_i) + x_i sin(theta_i)

    so ``<rot(q, p), rot(k, p')>`` depends on ``p - p'`` only.
    """
    half = x.shape[-1] // 2
    # Angles in float32 at least: p * theta loses whole radians in half precision at long L.
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angles = positions.to(device=x.device, dtype=dtype)[:, None] * inv_freq
    cos = angles.cos()[:, None, :]
    sin = angles.sin()[:, None, :]
    x1, x2 = x[..., :half].to(dtype), x[..., half:].to(dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def packed_positions(
    cu_seqlens: torch.Tensor, lengths: list[int], device: torch.device
) -> torch.Tensor:
    """``(T,)`` index of every packed token inside its own sequence (restarting at 0 for each).

    ``lengths`` are the sequence lengths of ``cu_seqlens`` (as
    :func:`headwise.ops.attention.varlen.seqlens_from_cu` returns them after checking it).
    RoPE being relative, rotating at packed indices would give the same outputs in exact
    arithmetic, but angles as small as in an unpacked call keep the rounding the same too
    (float32 ``p * theta`` degrades at large ``p``).
    """
    total = sum(lengths)
    starts = torch.repeat_interleave(
        cu_seqlens[:-1].to(device=device, dtype=torch.long),
        torch.tensor(lengths, device=device),
        output_size=total,
    )
    return torch.arange(total, device=device) - starts


def _probabilities(scores: torch.Tensor) -> torch.Tensor:
    # The reference's softmax: a row that sees no key gets all-zero weights (never NaN), forward
    # and backward.
    row_max = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isinf(row_max), 0.0, row_max))
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total > 0, total, 1.0)


class SequenceAttention(nn.Module):
    """Softmax attention over sequences, as four overridable steps with hook points.

    For queries from ``x`` ``(B, Lq, E)`` and keys/values from ``c`` (``x`` itself, or a context
    ``(B, Lk, kv_dim)``), heads in the library layout ``(B, L, H, D)``::

        project   Q = norm(x W_q + b_q)  (B, Lq, H, D);  K = norm(c W_k + b_k), V = c W_v + b_v
                  (B, Lk, H_kv, D), norm = qk-norm per head over D (identity without qk_norm)
        position  Q, K <- rot(Q, p), rot(K, p)   if rotary (:func:`apply_rotary`)
        attend    Z_h = softmax(scale * Q_h K_g^T + bias, hidden where the pattern says no) V_g,
                  g = h // (H / H_kv)            (B, Lq, H, D); in training mode the
                  probabilities take attention dropout (``dropout``, :func:`headwise.attention`'s
                  ``dropout_p``), as ``nn.MultiheadAttention``; none in ``eval()``
        merge     y = concat_h(Z_h) W_o + b_o    (B, Lq, E)

    Hook points (:class:`headwise.hooks.HookPoint`, TransformerLens names): ``hook_q``,
    ``hook_k``, ``hook_v`` on the projected heads (after qk-norm, before rotary), ``hook_z`` on
    the attention output ``(B, Lq, H, D)`` and ``hook_result`` on the layer's output
    ``(B, Lq, E)`` (the sum over heads, TransformerLens' ``hook_attn_out``): identities on
    tensors the layer computes anyway. ``hook_scores`` (``scale * Q K^T + bias``, ``-inf`` where
    hidden) and ``hook_pattern`` (the probabilities), both ``(B, H, Lq, Lk)`` in float32 (float64
    for float64 inputs), cost nothing unless a hook is registered on them: only then are they
    computed explicitly (the reference formula of :mod:`headwise.ops.attention.reference`).
    If a hook returns a different tensor (patch by returning one, not by editing in place), the
    probabilities are taken from it (softmax of replaced scores) and ``Z`` is computed from
    them, so a patched pattern changes the output; otherwise ``Z`` is the core's and the output
    is unchanged bit for bit. Packed input (``cu_seqlens``) forms neither.

    The constructor checks and stores the arguments of :class:`headwise.layers.MultiHeadAttention`
    (which see) and builds ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``q_norm`` and
    ``k_norm``; a subclass writes ``forward`` from the steps.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        bias: bool = True,
        qk_norm: QKNorm | None = None,
        rotary: bool = False,
        rope_base: float = 10000.0,
        pattern: Pattern | None = None,
        causal: bool = False,
        scale: float | None = None,
        backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        num_heads = check_int("num_heads", num_heads, minimum=1)
        head_dim = head_dim_of("embed_dim", embed_dim, num_heads, head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        num_kv_heads = check_int("num_kv_heads", num_kv_heads, minimum=1)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads; got num_heads={num_heads}, "
                f"num_kv_heads={num_kv_heads}"
            )
        kv_dim = embed_dim if kv_dim is None else check_int("kv_dim", kv_dim, minimum=1)
        bias = check_bool("bias", bias)
        rotary = check_bool("rotary", rotary)
        causal = check_bool("causal", causal)
        check_choice("qk_norm", qk_norm, (None, *_QK_NORMS))
        if rotary and head_dim % 2:
            raise ValueError(f"rotary needs an even head_dim; got head_dim={head_dim}")
        rope_base = check_real("rope_base", rope_base, positive=True)
        scale = None if scale is None else check_real("scale", scale)
        dropout = check_dropout(dropout, "dropout")
        if pattern is not None:
            check_pattern(pattern, num_heads, "num_heads")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_dim = kv_dim
        self.rotary = rotary
        self.rope_base = rope_base
        self.pattern = pattern
        self.causal = causal
        self.effective_pattern()  # built here, before any compiled call
        self.scale = scale
        self.backend = backend
        self.dropout = dropout

        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        self.q_norm, self.k_norm = (
            (_qk_norm(qk_norm, head_dim), _qk_norm(qk_norm, head_dim))
            if qk_norm is not None
            else (nn.Identity(), nn.Identity())
        )
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_scores, self.hook_pattern = HookPoint(), HookPoint()
        self.hook_z, self.hook_result = HookPoint(), HookPoint()

    def reset_parameters(self) -> None:
        """Re-initialize every projection and qk-norm (PyTorch's defaults: Kaiming-uniform
        weights, uniform biases, unit norm scales), e.g. after meta construction + ``to_empty``."""
        reset_submodules(self)

    # ------------------------------------------------------------------ steps
    def project(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        q_raw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Q`` ``(..., Lq, H, D)`` from ``x`` and ``K``, ``V`` ``(..., Lk, H_kv, D)`` from
        ``context`` (default ``x``), qk-normed, through ``hook_q``/``hook_k``/``hook_v``.

        ``q_raw``: ``x``'s query projection ``(..., Lq, H, D)`` before qk-norm, when the caller
        needs it too (MoH routes on it) and has computed it already.
        """
        if q_raw is None:
            q_raw = self.q_proj(x).view(*x.shape[:-1], self.num_heads, self.head_dim)
        c = x if context is None else context
        heads = (*c.shape[:-1], self.num_kv_heads, self.head_dim)
        q = self.q_norm(q_raw)
        k = self.k_norm(self.k_proj(c).view(heads))
        v = self.v_proj(c).view(heads)
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def position(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``Q``, ``K`` rotated at ``positions`` if the layer is rotary (else unchanged).

        ``positions``: the ``(L,)`` token indices of the rows of ``q`` and ``k`` (self-attention:
        the same tokens), or the index of the first of ``L`` consecutive tokens.
        """
        if not self.rotary:
            return q, k
        if isinstance(positions, int):
            positions = torch.arange(positions, positions + q.shape[-3], device=q.device)
        q = apply_rotary(q, positions, self.rope_base)
        return q, apply_rotary(k, positions, self.rope_base)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: Pattern | None,
        *,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Z`` ``(B, Lq, H, D)`` of :func:`headwise.attention` with the layer's scale and
        backend, through ``hook_scores``/``hook_pattern`` (when hooked) and ``hook_z``."""
        return self.hook_z(self._attention(q, k, v, pattern, bias))

    def attend_packed(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """``Z`` ``(T, H, D)`` of :func:`headwise.attention_varlen` (each sequence of the packed
        batch attends only to itself; the layer's pattern and ``causal`` in packed positions),
        through ``hook_z``. ``hook_scores``/``hook_pattern`` are not formed for packed input."""
        if self.hook_scores.is_hooked or self.hook_pattern.is_hooked:
            raise Unsupported(
                "hook_scores and hook_pattern are (B, H, Lq, Lk) and not formed for packed input "
                "(cu_seqlens); call the layer on a padded batch to read or patch them"
            )
        z = attention_varlen(
            q,
            k,
            v,
            cu_seqlens,
            pattern=self.pattern,
            causal=self.causal,
            scale=self.scale,
            backend=self.backend,
            dropout_p=self.attention_dropout(),
        )
        return self.hook_z(z)

    def merge(self, z: torch.Tensor) -> torch.Tensor:
        """``y = concat_h(Z_h) W_o + b_o`` ``(..., Lq, E)`` from ``Z`` ``(..., Lq, H, D)``,
        through ``hook_result``."""
        return self.hook_result(self.out_proj(z.flatten(-2)))

    @property
    def pattern(self) -> Pattern | None:
        return self._pattern

    @pattern.setter
    def pattern(self, pattern: Pattern | None) -> None:
        self._pattern = pattern
        self._effective = None

    @property
    def causal(self) -> bool:
        return self._causal

    @causal.setter
    def causal(self, causal: bool) -> None:
        self._causal = causal
        self._effective = None

    def effective_pattern(self) -> Pattern | None:
        """The layer's pattern, intersected with ``patterns.causal()`` if ``causal``: built once
        per assignment of ``pattern`` or ``causal`` (the constructor builds the first), so a
        compiled forward gets a pattern built before the traced code runs, which reaches the
        attention operators without a graph break."""
        if not self.causal:
            return self.pattern
        if self._effective is None:
            self._effective = (
                patterns.causal() if self.pattern is None else self.pattern & patterns.causal()
            )
        return self._effective

    def attention_dropout(self) -> float:
        """The attention dropout rate of a call: ``dropout`` in training mode, 0 in ``eval()``."""
        return self.dropout if self.training else 0.0

    def _attention(self, q, k, v, pattern, bias) -> torch.Tensor:
        """``attend`` before ``hook_z`` (a layer that attends in pieces hooks their union)."""
        if self.hook_scores.is_hooked or self.hook_pattern.is_hooked:
            z = self._attend_explicit(q, k, v, pattern, bias)
            if z is not None:
                return z
        return attention(
            q,
            k,
            v,
            pattern,
            scale=self.scale,
            bias=bias,
            backend=self.backend,
            dropout_p=self.attention_dropout(),
        )

    def _attend_explicit(self, q, k, v, pattern, bias) -> torch.Tensor | None:
        """Scores and probabilities written out, through their hook points; ``Z`` from the
        probabilities if a hook replaced one of them, else ``None`` (the core computes ``Z``)."""
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        group = q.shape[2] // k.shape[2]
        qh = q.transpose(1, 2).to(dtype)
        kh = k.transpose(1, 2).to(dtype).repeat_interleave(group, dim=1)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        computed = (qh @ kh.transpose(-1, -2)) * scale
        if bias is not None:
            computed = computed + bias.to(dtype)
        if pattern is not None:
            visible = pattern.dense_mask(q.shape[1], k.shape[1], device=q.device)
            computed = computed.masked_fill(~visible[None], float("-inf"))
        scores = self.hook_scores(computed) if self.hook_scores.is_hooked else computed
        patched = scores is not computed
        if not patched and not self.hook_pattern.is_hooked:
            return None
        probs = _probabilities(scores)
        if self.hook_pattern.is_hooked:
            hooked = self.hook_pattern(probs)
            patched, probs = patched or hooked is not probs, hooked
        if not patched:
            return None
        p = self.attention_dropout()
        if p > 0:  # the patched probabilities take the layer's dropout, as the core's would
            seed = draw_seed_tensor()  # (in the graph under torch.compile; the same draw)
            keep = Dropout(p, seed).weights(*probs.shape, device=probs.device, dtype=dtype)
            probs = probs.to(dtype) * keep
        vh = v.transpose(1, 2).to(dtype).repeat_interleave(group, dim=1)
        return (probs.to(dtype) @ vh).transpose(1, 2).to(q.dtype)


def _qk_norm(kind: str, head_dim: int) -> nn.Module:
    # A fixed eps (1e-6, as Qwen3) so results do not depend on the dtype, unlike torch's default.
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)
    return nn.LayerNorm(head_dim, eps=1e-6)


__all__ = ["QKNorm", "SequenceAttention", "apply_rotary", "packed_positions"]
