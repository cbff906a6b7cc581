"""The blockwise backend's entry point: :func:`blockwise_attention`."""

from __future__ import annotations

import functools

import torch

from headwise.ops.attention.blockwise.function import BlockwiseFunction, check_captured
from headwise.ops.attention.blockwise.heads import head_passes
from headwise.ops.attention.blockwise.operators import blockwise_operator
from headwise.ops.attention.blockwise.plan import DEFAULT_BLOCK
from headwise.ops.attention.dropout import Dropout
from headwise.ops.attention.nonfinite import has_non_finite, run_poisoned
from headwise.ops.attention.problem import captured_leaves
from headwise.patterns import Pattern
from headwise.types import ScoreMod


def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    block: int = DEFAULT_BLOCK,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out (B, Lq, H, Dv), lse (B, H, Lq))``; inputs ``(B, L, H, D)``.

    ``lse`` is float32 (float64 for float64 inputs); queries run in groups of about ``block``.
    ``dropout``: attention dropout (``None``: none), its keep mask regenerated block by block.
    Applies the non-finite rule of :func:`headwise.ops.attention.attention` itself. Without a
    ``score_mod`` the call is one custom operator (:mod:`.operators`), which ``torch.compile``
    keeps in its graph; a ``score_mod`` runs through an autograd Function, which it does not.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if score_mod is None:
        return blockwise_operator(q, k, v, pattern, scale, bias, block, dropout)
    run = functools.partial(_with_score_mod, block=block)
    if has_non_finite(q, k, v):  # a score_mod can hide keys: the rule applies
        return run_poisoned(run, q, k, v, pattern, scale, bias, score_mod, dropout)
    return run(q, k, v, pattern, scale, bias, score_mod, dropout)


def _with_score_mod(q, k, v, pattern, scale, bias, score_mod, dropout, *, block):
    captured = ()
    if torch.is_grad_enabled():
        check_captured(score_mod, q, k)
        captured = captured_leaves(score_mod)
    head_groups = head_passes(pattern, q.shape[1], k.shape[1], block)
    return BlockwiseFunction.apply(
        q, k, v, bias, head_groups, scale, score_mod, block, dropout, *captured
    )
