"""Heads: grouping heads by pattern, and views of the tensors restricted to a group.

A per-head pattern (:func:`headwise.patterns.per_head`) whose heads follow a few distinct
patterns runs as one pass per distinct pattern, each skipping its own empty blocks, instead of one
pass over the union of all heads' blocks, when that saves at least a fifth of the block work
(:func:`group_heads`). Each pass reads its heads as strided views when they are evenly spaced,
else as index copies, and sees ``score_mod`` with its global head numbers.
"""

from __future__ import annotations

import functools

import torch

from headwise.ops.attention.problem import bias_4d
from headwise.patterns import EMPTY, Pattern
from headwise.types import ScoreMod


@functools.lru_cache(maxsize=64)
def group_heads(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int
) -> tuple[tuple[Pattern, tuple[int, ...]], ...] | None:
    """Heads grouped by pattern when that saves at least a fifth of the block work (cached and
    shared by every caller and thread, hence tuples: no caller can change them)."""
    per_head = pattern.head_patterns() if pattern is not None else None
    if per_head is None or len(set(per_head)) == 1:
        return None
    groups: dict[Pattern, list[int]] = {}
    for h, p in enumerate(per_head):
        groups.setdefault(p, []).append(h)
    union_work = len(per_head) * _visited_blocks(pattern, q_len, kv_len, block, union=True)
    grouped_work = sum(
        len(heads) * _visited_blocks(p, q_len, kv_len, block) for p, heads in groups.items()
    )
    if grouped_work >= 0.8 * union_work:
        return None
    return tuple((p, tuple(heads)) for p, heads in groups.items())


@torch.compiler.assume_constant_result
def head_passes(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int
) -> tuple[tuple[Pattern | None, tuple[int, ...] | None], ...]:
    """``((pattern, heads), ...)``: one pass per distinct pattern of :func:`group_heads`, each
    skipping its own empty blocks, or ``((pattern, None),)``: one pass over every head.
    ``torch.compile`` runs it while tracing, its result a constant of the graph (as
    :func:`~.plan.plan_for`)."""
    groups = group_heads(pattern, q_len, kv_len, block)
    return ((pattern, None),) if groups is None else groups


def _visited_blocks(pattern: Pattern, q_len: int, kv_len: int, block: int, union=False) -> int:
    layout = pattern._shared_layout(q_len, kv_len, block)
    return int((layout != EMPTY).any(0).sum()) if union else int((layout != EMPTY).sum())


def head_index(heads, device: torch.device) -> slice | torch.Tensor:
    """``heads`` as a slice when evenly spaced and increasing (selected as a strided view), else
    as an index tensor."""
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    if step > 0 and list(heads) == list(range(heads[0], heads[-1] + 1, step)):
        return slice(heads[0], heads[-1] + 1, step)
    return torch.tensor(heads, device=device)


def select_heads(t: torch.Tensor, heads, dim: int) -> torch.Tensor:
    """Heads ``heads`` of ``t`` along ``dim``: a strided view when evenly spaced, else a copy."""
    where = head_index(heads, t.device)
    if isinstance(where, slice):
        return t[(slice(None),) * dim + (where,)]
    return t.index_select(dim, where)


def head_views(q, k, v, bias, heads):
    """q, k, v and bias restricted to the query heads ``heads`` (``None``: all of them)."""
    if heads is None:
        return q, k, v, bias
    kv_heads = [h // (q.shape[2] // k.shape[2]) for h in heads]
    if bias is not None:
        full = bias_4d(bias)
        bias = select_heads(full, heads, 1) if full.shape[1] > 1 else full
    return (
        select_heads(q, heads, 2),
        select_heads(k, kv_heads, 2),
        select_heads(v, kv_heads, 2),
        bias,
    )


def renumber_heads(score_mod: ScoreMod | None, heads) -> ScoreMod | None:
    """``score_mod`` seen from a subset of heads: local head ``h`` is global head ``heads[h]``."""
    if score_mod is None or heads is None:
        return score_mod

    def renumbered(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, torch.tensor(heads, device=h.device)[h], q_idx, kv_idx)

    return renumbered


def heads_first(q, k, v):
    """``(B, L, H, D)`` views as ``(B, H, L, D)``, K/V heads repeated to the query heads."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if group > 1:
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    return qh, kh, vh
