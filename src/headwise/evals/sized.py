"""Run a model under an attention configuration sized for a fixed evaluated length.

An MoA plan (Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", 2024) gives head ``h`` the span ``alpha_h + beta_h * N``, where ``N`` is the whole
length of the sequence (prompt plus generated tokens). Swapped in elastically, the span follows
the keys of each call, so a short continuation over a cached context would see a span sized for
a different ``N`` than its prefill. An evaluation at a fixed length ``N`` therefore fixes it:
layer ``l`` of the plan becomes ``plan.pattern(heads, length=N, layer=l)`` on the ``l``-th
attention site, for the prefill and every continuation alike, so the KV density is the planned
one at that length. A :mod:`headwise.patterns` pattern (or a mapping of site names to patterns)
is used as given, and ``None`` is dense attention (still through headwise, no pattern).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from headwise._checks import check_int
from headwise.hf import swap_pattern
from headwise.hf.swap import SwapPattern, plan_sites
from headwise.layers import MoAPlan


@contextmanager
def sized_swap(model: nn.Module, config: SwapPattern | None, length: int) -> Iterator[None]:
    """Run ``model`` (every attention site) under ``config`` for sequences of total length
    ``length``: an :class:`~headwise.layers.MoAPlan` with its spans sized for ``N = length``
    (layer ``l`` on the ``l``-th site), a pattern or a mapping of site names to patterns as
    given (see :func:`headwise.hf.swap_pattern`), or dense attention for ``None``."""
    check_int("length", length, minimum=1)
    if config is None:
        yield
        return
    if isinstance(config, MoAPlan):
        sites = plan_sites(model, config)
        config = {
            site.name: config.pattern(site.heads, length=length, layer=i)
            for i, site in enumerate(sites)
        }
    with swap_pattern(model, config):
        yield
