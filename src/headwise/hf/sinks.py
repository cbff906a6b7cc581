"""Attention sinks as VAR defines them (Kang et al., "See What You Are Told: Visual Attention Sink
in Large Multimodal Models", ICLR 2025): tokens whose hidden state is massive in a few fixed
dimensions (Sun et al., "Massive Activations in Large Language Models", 2024), and the heads
that attend to them most.

Notation: ``a[l,h,i,j]`` probabilities ``(B, H, Lq, Lk)`` (what :func:`headwise.hf.capture`
records as ``pattern``); ``x`` hidden states ``(B, L, D)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from headwise.hf.capture import capture
from headwise.hf.registry import select_sites
from headwise.hooks import Layers


def sink_values(hidden: torch.Tensor, dims: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """VAR's sink-dimension value ``phi(x) = max_{d in dims} |x_d / rms(x)|``: ``(B, L, D) ->
    (B, L)`` (RMS normalization without a learned weight)."""
    x = hidden.float()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x[..., list(dims)].abs().amax(-1)


def massive_dimensions(hidden: torch.Tensor, top: int = 2, eps: float = 1e-6) -> list[int]:
    """The ``top`` hidden dimensions with the largest normalized activation over all tokens.

    For models without published sink dimensions (VAR lists them for LLaVA/LLaMA): massive
    activations stand out by orders of magnitude in those dimensions.
    """
    x = hidden.float()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.abs().flatten(0, -2).amax(0).topk(top).indices.tolist()


def sink_share(probs: torch.Tensor, sink_mask: torch.Tensor) -> torch.Tensor:
    """Attention mass on sink keys, ``sum_{j in sinks} a_ij``: ``(B, H, Lq, Lk)`` with
    ``sink_mask`` ``(B, Lk)`` bool -> ``(B, H, Lq)``."""
    return (probs.float() * sink_mask[:, None, None, :].to(probs.device)).sum(-1)


def sink_threshold(tau: float, hidden_size: int) -> float:
    """``min(tau, 0.8 sqrt(D))``: ``|x_d / rms(x)| <= sqrt(D)``, so VAR's ``tau = 20`` (set for
    D = 4096) can never be reached by models narrower than 400 dimensions."""
    return min(tau, 0.8 * math.sqrt(hidden_size))


@dataclass
class SinkTokens:
    """Result of :func:`find_sinks`.

    ``dims``: the sink dimensions used; ``tokens[name]``: ``(B, L)`` sink tokens seen by that
    attention module (from its layer's input); ``share[name]``: ``(H,)`` mean attention share of
    each head on those tokens; ``ranking``: ``(name, head, share)`` strongest first.
    """

    dims: list[int]
    tau: float
    tokens: dict[str, torch.Tensor]
    share: dict[str, torch.Tensor]
    ranking: list[tuple[str, int, float]]


def find_sinks(
    model: nn.Module,
    inputs: Mapping,
    dims: Sequence[int] | None = None,
    tau: float = 20.0,
    layers: Layers = None,
) -> SinkTokens:
    """Attention sinks as VAR defines them, and the heads that attend to them most.

    Sink tokens of layer ``l``: ``phi(x^{l-1}_j) >= tau`` on the layer's input hidden states
    (``dims`` default: :func:`massive_dimensions` of the first chosen layer's input; ``tau``
    capped by :func:`sink_threshold`). Head share: mean over real query rows of
    ``sum_{j in sinks} a_ij``.
    """
    sites = select_sites(model, layers)
    hidden: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:

        def keep(mod, args, kwargs, name=site.name):
            hidden[name] = (args[0] if args else kwargs["hidden_states"]).detach()

        handles.append(site.layer.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad(), capture(model, layers=layers, what=("pattern",)) as cache:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    real = inputs.get("attention_mask")
    first = hidden[sites[0].name]
    dims = list(dims) if dims is not None else massive_dimensions(first)
    tau = sink_threshold(tau, first.shape[-1])
    tokens, share, ranking = {}, {}, []
    for site in sites:
        x = hidden[site.name]
        sinks = sink_values(x, dims) >= tau
        rows = torch.ones(x.shape[:2]) if real is None else real.float()
        sinks = sinks & rows.bool()
        per_row = sink_share(cache[f"{site.name}.pattern"], sinks)  # (B, H, L)
        weights = rows[:, None, :]
        head_share = (per_row * weights).sum((0, 2)) / weights.sum((0, 2))
        tokens[site.name], share[site.name] = sinks, head_share
        ranking += [(site.name, h, float(v)) for h, v in enumerate(head_share)]
    ranking.sort(key=lambda t: -t[2])
    return SinkTokens(dims, tau, tokens, share, ranking)
