"""Run attention modules under another pattern, and measure how far the output drifts: a
:mod:`headwise.patterns` pattern per site, or an MoA plan (Fu et al., "MoA: Mixture of Sparse
Attention for Automatic Large Language Model Compression", 2024) whose layer ``l`` goes to the
``l``-th chosen site.

The swap is a context manager: the model is unchanged after the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from headwise._checks import ArgumentTypeError
from headwise.hf.registry import select_sites
from headwise.hooks import Hook, Layers, Site, hooked
from headwise.layers import MoAPlan
from headwise.patterns import Pattern


class _Swap(Hook):
    def __init__(self, patterns: dict[str, Pattern]):
        self.patterns = patterns

    def pattern(self, site: Site) -> Pattern | None:
        return self.patterns.get(site.name)


SwapPattern = Pattern | Mapping[str, Pattern] | MoAPlan


def plan_sites(model: nn.Module, plan: MoAPlan, layers: Layers = None) -> list[Site]:
    """The sites ``layers`` chooses, one per layer of ``plan`` (layer ``l`` for the ``l``-th)."""
    sites = select_sites(model, layers)
    if len(sites) != plan.num_layers:
        raise ValueError(
            f"the MoA plan has {plan.num_layers} layers but layers={layers!r} chooses "
            f"{len(sites)} sites {[s.name for s in sites]}: pass layers= naming one per plan "
            "layer (e.g. layers='language_model')"
        )
    return sites


def _site_patterns(model: nn.Module, pattern: SwapPattern, layers: Layers) -> dict[str, Pattern]:
    """One pattern per site name: the same for every chosen site, the mapping's, or layer ``l``
    of an MoA plan for the ``l``-th chosen site (elastic spans, sized per call)."""
    if isinstance(pattern, Pattern):
        return {s.name: pattern for s in select_sites(model, layers)}
    if isinstance(pattern, MoAPlan):
        sites = plan_sites(model, pattern, layers)
        return {s.name: pattern.pattern(s.heads, layer=i) for i, s in enumerate(sites)}
    if not isinstance(pattern, Mapping):
        raise ArgumentTypeError(
            "pattern must be a Pattern, a mapping of site names to Patterns or an MoAPlan; "
            f"got {pattern!r}"
        )
    select_sites(model, list(pattern))
    for name, value in pattern.items():
        if not isinstance(value, Pattern):
            raise ArgumentTypeError(f"pattern[{name!r}] must be a Pattern; got {value!r}")
    return dict(pattern)


@contextmanager
def swap_pattern(model: nn.Module, pattern: SwapPattern, layers: Layers = None) -> Iterator[None]:
    """Run chosen attention modules under a :mod:`headwise.patterns` pattern (intersected with
    the model's own causal/padding mask), e.g. ``per_head([...])`` of sliding windows and
    strided shards: one pattern for all chosen sites, one per site name, or an MoA plan
    (:class:`~headwise.layers.moa.MoAPlan`), whose layer ``l`` goes to the ``l``-th chosen
    site (``layers`` must choose as many sites as the plan has layers)."""
    with hooked(model, _Swap(_site_patterns(model, pattern, layers))):
        yield


@dataclass
class Drift:
    """Output drift of a pattern swap: ``max_abs``/``mean_abs`` of ``swapped - original`` and
    ``relative = ||swapped - original|| / ||original||`` on the compared output."""

    max_abs: float
    mean_abs: float
    relative: float


def pattern_drift(
    model: nn.Module,
    inputs: Mapping,
    pattern: SwapPattern,
    layers: Layers = None,
    output: str = "auto",
) -> Drift:
    """How much the model's output moves when ``pattern`` is swapped in (see
    :func:`swap_pattern`), on the real tokens (``attention_mask == 1``) when the inputs have an
    attention mask. ``output``: the output field compared (``"auto"``: ``logits``, else
    ``last_hidden_state``)."""
    with torch.no_grad():
        base = _output(model(**inputs), output)
        with swap_pattern(model, pattern, layers):
            swapped = _output(model(**inputs), output)
    mask = inputs.get("attention_mask")
    if mask is not None and base.dim() >= 2 and tuple(base.shape[:2]) == tuple(mask.shape):
        # Padding rows are not outputs anyone reads, and eager fills their fully masked rows
        # with a uniform softmax that a swapped pattern changes: compare real tokens only.
        real = mask.bool()
        base, swapped = base[real], swapped[real]
    diff = (swapped - base).float()
    return Drift(
        float(diff.abs().max()),
        float(diff.abs().mean()),
        float(diff.norm() / base.float().norm().clamp_min(1e-30)),
    )


def _output(result, field: str) -> torch.Tensor:
    if field == "auto":
        field = "logits" if getattr(result, "logits", None) is not None else "last_hidden_state"
    return getattr(result, field)
