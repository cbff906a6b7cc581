"""Iterative head pruning (Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?",
NeurIPS 2019): mask the least important heads, a fraction at a time, while the metric stays above
a threshold of the unpruned model's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from headwise.hf.ablation import gate_heads
from headwise.hf.importance import LossFn, MetricFn, head_importance_gradient
from headwise.hf.registry import select_sites
from headwise.hooks import Layers


@dataclass
class Pruning:
    """Result of :func:`prune_heads`: the kept-head ``mask`` (1 = keep) per site and the
    ``history`` of ``(heads pruned, metric)`` steps; the first entry is the unpruned model."""

    mask: dict[str, torch.Tensor]
    history: list[tuple[int, float]]


def prune_heads(
    model: nn.Module,
    batches: Sequence[Mapping],
    loss_fn: LossFn,
    metric_fn: MetricFn,
    threshold: float = 0.9,
    step: float = 0.1,
    layers: Layers = None,
) -> Pruning:
    """Michel et al.'s iterative pruning: repeatedly mask the ``step`` fraction (of all heads)
    least important by :func:`head_importance_gradient` (per-layer normalized, recomputed under
    the current mask) while ``metric >= threshold * metric(unpruned)``. Masked heads stay masked;
    the returned mask is the last one that met the threshold.
    """
    sites = select_sites(model, layers)
    mask = {s.name: torch.ones(s.heads) for s in sites}
    total = sum(s.heads for s in sites)
    per_step = max(1, math.ceil(step * total))

    def metric(m):
        with torch.no_grad(), gate_heads(model, m):
            return sum(metric_fn(model, b) for b in batches) / len(batches)

    base = metric(mask)
    history = [(0, base)]
    while True:
        kept = int(sum(m.sum() for m in mask.values()))
        if kept <= per_step:
            break
        scores = head_importance_gradient(model, batches, loss_fn, layers, mask=mask)
        flat = torch.cat([torch.where(mask[n] > 0, scores[n], math.inf) for n in mask])
        order = flat.argsort()[:per_step]
        trial = {n: m.clone() for n, m in mask.items()}
        offsets = torch.tensor([0, *[s.heads for s in sites]]).cumsum(0)
        for idx in order.tolist():
            site = int(torch.searchsorted(offsets, idx, right=True)) - 1
            trial[sites[site].name][idx - int(offsets[site])] = 0
        value = metric(trial)
        if value < threshold * base:
            break
        mask = trial
        history.append((total - kept + per_step, value))
    return Pruning(mask, history)
