"""Head importance (Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?",
NeurIPS 2019): the gradient of a gate on each head's output, and the metric lost when a head is
ablated.

Model-level scores return ``{site name: tensor}`` dicts keyed like ``"blocks.3.attn"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from headwise.hf.registry import select_sites
from headwise.hooks import HeadGate, Layers, hooked

LossFn = Callable[[nn.Module, Mapping], torch.Tensor]
MetricFn = Callable[[nn.Module, Mapping], float]


def head_importance_gradient(
    model: nn.Module,
    batches: Iterable[Mapping],
    loss_fn: LossFn,
    layers: Layers = None,
    mask: Mapping[str, torch.Tensor] | None = None,
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """Michel et al. (2019): ``I[l,h] = E_x |dL(x)/d xi[l,h]|`` at the gates ``xi = mask`` (1s).

    A gate ``xi`` multiplies each head's output before the output projection; ``loss_fn(model,
    batch)`` returns a scalar. ``normalize`` divides each layer's scores by their L2 norm
    (Molchanov et al.), as Michel et al. do before pruning. Returns ``(H,)`` per site.
    """
    sites = select_sites(model, layers)
    gates = {
        s.name: (
            torch.ones(s.heads) if mask is None else mask[s.name].detach().float()
        ).requires_grad_(True)
        for s in sites
    }
    total = {name: torch.zeros_like(g) for name, g in gates.items()}
    count = 0
    with hooked(model, HeadGate(gates)):
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), list(gates.values()))
            for name, g in zip(gates, grads):
                total[name] += g.abs()
            count += 1
    if not count:
        raise ValueError("batches is empty")
    scores = {name: t / count for name, t in total.items()}
    if normalize:
        scores = {name: s / s.norm().clamp_min(1e-20) for name, s in scores.items()}
    return scores


def head_importance_ablation(
    model: nn.Module,
    batches: Sequence[Mapping],
    metric_fn: MetricFn,
    layers: Layers = None,
) -> dict[str, torch.Tensor]:
    """``I[l,h] = metric(all heads) - metric(head (l,h) zeroed)``, averaged over ``batches``.

    Costs one pass per head and batch. ``metric_fn(model, batch)`` returns a float (accuracy,
    true-class probability, or a label-free similarity to the unablated output).
    """
    sites = select_sites(model, layers)

    def metric() -> float:
        with torch.no_grad():
            return sum(metric_fn(model, b) for b in batches) / len(batches)

    base = metric()
    scores = {}
    for site in sites:
        drops = torch.zeros(site.heads)
        for h in range(site.heads):
            gate = torch.ones(site.heads)
            gate[h] = 0
            with hooked(model, HeadGate({site.name: gate})):
                drops[h] = base - metric()
        scores[site.name] = drops
    return scores
