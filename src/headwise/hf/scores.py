"""Scores of the shape of attention patterns: entropy, mean attention distance, distance profiles.

The functions take probabilities ``a`` of shape ``(B, H, Lq, Lk)`` (what
:func:`headwise.hf.capture` records as ``pattern``). The paper-specific scores live one file per
method: head importance (:mod:`headwise.hf.importance`), VAR sinks (:mod:`headwise.hf.sinks`),
VHD (:mod:`headwise.hf.vhr`), rollout/flow (:mod:`headwise.hf.rollout`), VL-SAM
(:mod:`headwise.hf.vlsam`); importing them from here still works, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import math

import torch

from headwise._checks import ArgumentTypeError
from headwise._deprecated import moved


def real_rows(probs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, 1, Lq)`` bool of the real query rows, from a ``(B, Lq)`` 0/1 or bool mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ArgumentTypeError(f"attention_mask must be a tensor; got {attention_mask!r}")
    want = (probs.shape[0], probs.shape[-2])
    if probs.dim() != 4 or tuple(attention_mask.shape) != want:
        raise ValueError(
            f"attention_mask must be (B, Lq) = {want} for probabilities (B, H, Lq, Lk) of shape "
            f"{tuple(probs.shape)}; got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool and not bool(
        ((attention_mask == 0) | (attention_mask == 1)).all()
    ):
        raise ValueError("attention_mask must hold 0/1 or bools (1 = real token)")
    return attention_mask.bool().to(probs.device)[:, None, :]


def attention_entropy(
    probs: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``-sum_j a_ij log a_ij`` per query row (nats): ``(..., Lq, Lk) -> (..., Lq)``.

    With ``attention_mask`` ``(B, Lq)`` (1 = real token; ``probs`` ``(B, H, Lq, Lk)``) padding
    rows are NaN, so that a plain mean over rows cannot mix them in silently (``nanmean`` skips
    them).
    """
    p = probs.float()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    real = real_rows(probs, attention_mask)
    return entropy if real is None else entropy.masked_fill(~real, math.nan)


def token_distances(
    n: int, grid: tuple[int, int] | None = None, prefix_tokens: int = 0
) -> torch.Tensor:
    """Distances ``d(i, j)`` ``(n, n)`` between tokens: ``|i - j|`` for sequences, Euclidean in
    patch units on a ``grid`` of ``rows x cols`` patches after ``prefix_tokens`` (ViT's CLS).
    """
    if grid is None:
        idx = torch.arange(n, dtype=torch.float32)
        return (idx[:, None] - idx[None]).abs()
    rows, cols = grid
    if prefix_tokens + rows * cols != n:
        raise ValueError(f"grid {grid} + {prefix_tokens} prefix tokens != {n} tokens")
    r = torch.arange(rows * cols) // cols
    c = torch.arange(rows * cols) % cols
    pos = torch.stack([r, c], -1).float()
    d = torch.zeros(n, n)
    d[prefix_tokens:, prefix_tokens:] = torch.cdist(pos, pos)
    return d


def _patch_part(probs, grid, prefix_tokens):
    """Patch-to-patch probabilities renormalized over patch keys (prefix tokens dropped)."""
    if grid is None:
        return probs.float()
    p = probs[..., prefix_tokens:, prefix_tokens:].float()
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def _patch_rows(real, grid, prefix_tokens):
    """Real query rows among the rows :func:`_patch_part` keeps."""
    if real is None or grid is None:
        return real
    return real[..., prefix_tokens:]


def mean_attention_distance(
    probs: torch.Tensor,
    grid: tuple[int, int] | None = None,
    prefix_tokens: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``D[h] = mean_i sum_j a_ij d(i, j)`` per batch and head: ``(B, H, L, L) -> (B, H)``.

    With a ``grid`` (ViT), only patch queries and keys count (CLS rows are a separate story).
    With ``attention_mask`` ``(B, L)`` the mean runs over real query rows only.
    """
    n = probs.shape[-1]
    real = _patch_rows(real_rows(probs, attention_mask), grid, prefix_tokens)
    d = token_distances(n, grid, prefix_tokens).to(probs.device)
    if grid is not None:
        d = d[prefix_tokens:, prefix_tokens:]
    per_row = (_patch_part(probs, grid, prefix_tokens) * d).sum(-1)
    if real is None:
        return per_row.mean(-1)
    return (per_row * real).sum(-1) / real.sum(-1).clamp_min(1)


def distance_profile(
    probs: torch.Tensor,
    grid: tuple[int, int] | None = None,
    prefix_tokens: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``S[h](d)``: mean attention over (query, key) pairs with ``round(d(i, j)) = d``.

    The mean (not the sum) per distance bin, because far bins hold fewer pairs. ``(B, H, L, L)``
    -> ``(H, max_distance + 1)``, averaged over the batch; with ``attention_mask`` ``(B, L)``
    only pairs of two real tokens count.
    """
    n = probs.shape[-1]
    real = _patch_rows(real_rows(probs, attention_mask), grid, prefix_tokens)
    d = token_distances(n, grid, prefix_tokens).to(probs.device)
    if grid is not None:
        d = d[prefix_tokens:, prefix_tokens:]
    bins = d.round().long().flatten()
    p = _patch_part(probs, grid, prefix_tokens)
    if real is None:
        pairs = torch.ones(p.shape[0], *d.shape, device=p.device)
    else:
        r = real[:, 0].float()
        pairs = r[:, :, None] * r[:, None, :]  # (B, L, L)
    p = (p * pairs[:, None]).sum(0).flatten(1)  # (H, pairs)
    sums = torch.zeros(p.shape[0], int(bins.max()) + 1, device=p.device)
    sums.index_add_(1, bins, p)
    counts = torch.zeros(sums.shape[1], device=p.device)
    counts.index_add_(0, bins, pairs.sum(0).flatten())
    return sums / counts.clamp_min(1)


#: names that moved out of this module: their module under ``headwise.hf``
_MOVED = {
    "LossFn": "importance",
    "MetricFn": "importance",
    "head_importance_gradient": "importance",
    "head_importance_ablation": "importance",
    "sink_values": "sinks",
    "massive_dimensions": "sinks",
    "sink_share": "sinks",
    "sink_threshold": "sinks",
    "find_sinks": "sinks",
    "SinkTokens": "sinks",
    "vision_head_divergence": "vhr",
    "attention_rollout": "rollout",
    "attention_flow": "rollout",
    "vlsam_head_weights": "vlsam",
    "vlsam_map": "vlsam",
}


__getattr__ = moved(
    __name__,
    {name: f"headwise.hf.{home}" for name, home in _MOVED.items()}
    | {"Sinks": "headwise.hf.sinks:SinkTokens"},
)
