"""MoA plan search: per-head ``(alpha, beta)`` spans under a density budget.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv 2406.14909), §3.4. :func:`candidate_grid` gives the official candidate spans and
:func:`search_plan` picks one per head from the influence tiles of
:func:`headwise.moa.profile_influence`, returning a :class:`headwise.layers.moa.MoAPlan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from headwise._checks import check_int, check_real
from headwise.layers.moa import (
    BLOCK,
    MAX_NEW_TOKENS,
    MIN_CACHE,
    SINK_SIZE,
    MoAPlan,
    check_rule,
    moa_cache_size,
)


def candidate_grid(
    length: int, *, alpha_step: int = 1024, num_betas: int = 9
) -> list[tuple[float, float]]:
    """Official candidate ``(alpha, beta)`` grid for profile length ``N``.

    ``beta`` in ``linspace(0, 1, num_betas)``, ``alpha`` multiples of ``alpha_step`` in
    ``[-N, N]``, keeping pairs with ``0 < alpha + beta * N <= N``.
    """
    check_int("length", length, minimum=1)
    check_int("alpha_step", alpha_step, minimum=1)
    check_int("num_betas", num_betas, minimum=2)
    betas = [i / (num_betas - 1) for i in range(num_betas)]
    alphas = range(-(length // alpha_step) * alpha_step, length + 1, alpha_step)
    return [(float(a), b) for b in betas for a in alphas if 0 < a + b * length <= length]


def _candidate_layout(
    alpha: float, beta: float, length: int, block: int, sink_size: int, min_cache: int
) -> torch.Tensor:
    """Block layout ``(n, n)`` of a candidate at length ``N`` (the runtime prefill rule)."""
    sink, local = moa_cache_size(
        alpha, beta, length, block=block, sink_size=sink_size, min_cache=min_cache
    )
    n = -(-length // block)
    q_block, kv_block = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = (kv_block < sink // block) | (kv_block >= q_block + 1 - local // block)
    return (kv_block <= q_block) & window


def search_plan(
    influence: Sequence[torch.Tensor],
    length: int,
    budget: float,
    *,
    candidates: Sequence[tuple[float, float]] | None = None,
    block: int = BLOCK,
    sink_size: int = SINK_SIZE,
    min_cache: int = MIN_CACHE,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> MoAPlan:
    """Pick ``(alpha_h, beta_h)`` per head minimising the summed influence loss under a budget.

    ``influence[l]`` ``(H_l, n, n)`` tiles from :func:`profile_influence` at profile length
    ``N = length`` (``n = ceil(N / block)``). For each candidate (default
    :func:`candidate_grid`) its **loss** is the influence outside its block layout and its
    **density** ("kv" mode of the official code) the most key blocks any query block keeps,
    over ``n``. The constraint is ``mean over all heads of density <= budget``.

    Solved exactly as a multiple-choice knapsack by dynamic programming over the integer total
    of kept key blocks (capacity ``floor(budget * heads * n)``), ``O(heads * capacity * n)``.
    Differences from the official search (a Gurobi MIP): one profile length (no multi-length
    epsilon-constraint Pareto sweep), no lower bound on density and no limit of 2 distinct
    spans per layer, and candidates are scored with the exact runtime layout (cache rounding
    included) instead of the approximate band of ``int(alpha/64 + beta * n)`` blocks.
    """
    check_int("length", length, minimum=1)
    check_rule(block, sink_size, min_cache)
    if not 0 < check_real("budget", budget) <= 1:
        raise ValueError(f"budget must be in (0, 1]; got {budget!r}")
    n = -(-length // block)
    for layer, tiles in enumerate(influence):
        if not isinstance(tiles, torch.Tensor) or tiles.dim() != 3 or tiles.shape[1:] != (n, n):
            got = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
            raise ValueError(
                f"influence[{layer}] must be (H, {n}, {n}) tiles of block {block} at length "
                f"{length}; got {got}"
            )
    candidates = list(candidate_grid(length) if candidates is None else candidates)
    if not influence or not candidates:
        raise ValueError("search_plan needs at least one layer of influence and one candidate")
    rule = (block, sink_size, min_cache)
    layouts = torch.stack([_candidate_layout(a, b, length, *rule) for a, b in candidates])
    weights = layouts.sum(-1).amax(-1).tolist()  # kept key blocks of the widest row
    tiles = torch.cat([t.double().cpu() for t in influence])  # (heads, n, n)
    dropped = (~layouts).double().flatten(1)  # (K, n*n)
    losses = tiles.flatten(1) @ dropped.t()  # (heads, K)
    heads = tiles.shape[0]
    capacity = math.floor(budget * heads * n + 1e-9)
    if min(weights) * heads > capacity:
        raise ValueError(
            f"budget={budget} is below the sparsest candidate ({min(weights)}/{n} blocks per head)"
        )
    # best[c] = least loss of the heads so far within c kept blocks; choice[h, c] its pick.
    best = torch.zeros(capacity + 1, dtype=torch.float64)
    choice = torch.empty(heads, capacity + 1, dtype=torch.long)
    for h in range(heads):
        options = torch.full((len(candidates), capacity + 1), math.inf, dtype=torch.float64)
        for c, w in enumerate(weights):
            if w <= capacity:
                options[c, w:] = best[: capacity + 1 - w] + losses[h, c]
        best, choice[h] = options.min(0)
    picks, left = [], capacity
    for h in range(heads - 1, -1, -1):
        c = int(choice[h, left])
        picks.append(c)
        left -= weights[c]
    picks.reverse()
    alphas, betas, start = [], [], 0
    for tiles_l in influence:
        chosen = [candidates[c] for c in picks[start : start + tiles_l.shape[0]]]
        alphas.append(tuple(a for a, _ in chosen))
        betas.append(tuple(b for _, b in chosen))
        start += tiles_l.shape[0]
    return MoAPlan(tuple(alphas), tuple(betas), block, sink_size, min_cache, max_new_tokens)


__all__ = ["candidate_grid", "search_plan"]
