"""Input validation for softmax attention: one place that turns tensors into a checked problem.

Every error is a ``ValueError`` that names the argument and the shapes or values it got, raised
before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from headwise.patterns import Pattern

ScoreMod = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class RelativePositionTable:
    """What a relative-position-bias ``score_mod`` adds (``score_mod.relative_position``), in a
    form a kernel can take without calling it: ``table`` ``(H, 2k_1 - 1, ...)`` read at
    ``pattern.relative_index(q_idx, kv_idx)`` (:func:`headwise.ops.attention.neighborhood.
    relative_position_bias`; the ``native`` backend uses it)."""

    pattern: Pattern
    table: torch.Tensor


def relative_position_of(score_mod: ScoreMod | None, pattern: Pattern | None):
    """The :class:`RelativePositionTable` ``score_mod`` carries for ``pattern``, else ``None``."""
    relative = getattr(score_mod, "relative_position", None)
    if isinstance(relative, RelativePositionTable) and relative.pattern == pattern:
        return relative
    return None


@dataclass(frozen=True)
class AttentionProblem:
    """Sizes and flags of one validated ``attention`` call (layout ``(B, L, H, D)``)."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device
    pattern: Pattern | None
    has_bias: bool
    bias_needs_grad: bool
    has_score_mod: bool
    #: the score_mod is a relative-position table of the pattern (RelativePositionTable)
    relative_position: bool
    return_lse: bool
    needs_grad: bool

    @property
    def score_elements(self) -> int:
        """Number of entries of the full ``(B, H, Lq, Lk)`` score tensor."""
        return self.batch * self.heads * self.q_len * self.kv_len


def check_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None,
    bias: torch.Tensor | None,
    score_mod: ScoreMod | None,
    return_lse: bool,
) -> AttentionProblem:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, L, H, D); got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor; got dtype {t.dtype}")
    batch, q_len, heads, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(
            f"q, k, v must share the batch size; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k and v must share length and heads; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape[3] != head_dim:
        raise ValueError(
            f"k must have q's head_dim {head_dim}; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"q heads must be a multiple of k/v heads (GQA); got q {heads} heads, k/v {kv_heads}"
        )
    if min(batch, q_len, kv_len, heads, head_dim, v.shape[3]) == 0:
        raise ValueError(
            f"empty tensors are not supported; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise ValueError(f"pattern must be a headwise Pattern; got {type(pattern).__name__}")
        if pattern.num_heads is not None and pattern.num_heads != heads:
            raise ValueError(
                f"pattern is per-head for {pattern.num_heads} heads; q has {heads} heads"
            )
        pattern.check_lengths(q_len, kv_len)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise ValueError(f"bias must be a floating tensor; got {type(bias).__name__}")
        target = (batch, heads, q_len, kv_len)
        if bias.dim() > 4 or any(s not in (1, t) for s, t in zip(bias.shape[::-1], target[::-1])):
            raise ValueError(
                f"bias must broadcast to (B, H, Lq, Lk) = {target}; got {tuple(bias.shape)}"
            )
        if bias.device != q.device:
            raise ValueError(f"bias must be on q's device {q.device}; got {bias.device}")
    if score_mod is not None and not callable(score_mod):
        raise ValueError(f"score_mod must be callable; got {type(score_mod).__name__}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias)
    )
    return AttentionProblem(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        value_dim=v.shape[3],
        dtype=q.dtype,
        device=q.device,
        pattern=pattern,
        has_bias=bias is not None,
        bias_needs_grad=bias is not None and bias.requires_grad,
        has_score_mod=score_mod is not None,
        relative_position=relative_position_of(score_mod, pattern) is not None,
        return_lse=return_lse,
        needs_grad=needs_grad,
    )


def bias_4d(bias: torch.Tensor) -> torch.Tensor:
    """View a broadcastable bias as 4-D ``(B|1, H|1, Lq|1, Lk|1)``."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
