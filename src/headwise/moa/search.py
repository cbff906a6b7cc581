"""MoA plan search: per-head ``(alpha, beta)`` spans under a KV-density budget, by a MILP.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv 2406.14909), §3.4; official search thu-nics/MoA ``MoA/universal`` (a Gurobi MIP).
:func:`candidate_grid` gives the official candidate spans, :func:`search_plan` picks one per
unit (a head, or a GQA group of heads sharing one KV head) from the influence tiles of
:func:`headwise.moa.profile_influence` / :func:`headwise.hf.moa_profile` with
``scipy.optimize.milp`` (HiGHS), returning a :class:`headwise.layers.moa.MoAPlan`;
:func:`plan_density` and :func:`plan_loss` score a plan at a length.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import torch

from headwise._checks import ArgumentTypeError, check_int, check_real
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
    length: int, *, alpha_step: int = 1024, num_betas: int = 9, min_length: int | None = None
) -> list[tuple[float, float]]:
    """Official candidate ``(alpha, beta)`` grid for profile lengths ``min_length..length``.

    ``beta`` in ``linspace(0, 1, num_betas)``, ``alpha`` multiples of ``alpha_step`` in
    ``[-min_length, length]``, keeping pairs whose span ``alpha + beta * N`` is ``<= N`` at the
    longest length ``N = length`` and ``> 0`` at the shortest ``N = min_length`` (default
    ``length``: one length).
    """
    check_int("length", length, minimum=1)
    check_int("alpha_step", alpha_step, minimum=1)
    check_int("num_betas", num_betas, minimum=2)
    short = length if min_length is None else check_int("min_length", min_length, minimum=1)
    if short > length:
        raise ValueError(f"min_length must be <= length={length}; got {min_length}")
    betas = [i / (num_betas - 1) for i in range(num_betas)]
    alphas = range(-(short // alpha_step) * alpha_step, length + 1, alpha_step)
    return [
        (float(a), b)
        for b in betas
        for a in alphas
        if 0 < a + b * short and a + b * length <= length
    ]


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


def _check_tiles(influence: object, length: int, block: int, what: str) -> list[torch.Tensor]:
    n = -(-length // block)
    if isinstance(influence, torch.Tensor) or not isinstance(influence, Sequence):
        raise ArgumentTypeError(f"{what} must be a list of (H, n, n) tensors; got {influence!r}")
    for layer, tiles in enumerate(influence):
        if not isinstance(tiles, torch.Tensor) or tiles.dim() != 3 or tiles.shape[1:] != (n, n):
            got = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
            raise ValueError(
                f"{what}[{layer}] must be (H, {n}, {n}) tiles of block {block} at length "
                f"{length}; got {got}"
            )
        if not bool(torch.isfinite(tiles).all()):
            raise ValueError(f"{what}[{layer}] holds non-finite influence values")
    return list(influence)


def _profiles(
    influence: Sequence, length: int | Sequence[int], block: int
) -> dict[int, list[torch.Tensor]]:
    """``{profile length: per-layer tiles}`` from one profile or one per length."""
    if isinstance(length, int) and not isinstance(length, bool):
        check_int("length", length, minimum=1)
        return {length: _check_tiles(influence, length, block, "influence")}
    if isinstance(length, str) or not isinstance(length, Sequence) or not length:
        raise ArgumentTypeError(f"length must be an int or a list of ints; got {length!r}")
    for n in length:
        check_int("length", n, minimum=1)
    if len(set(length)) != len(length):
        raise ValueError(f"length must not repeat a profile length; got {list(length)}")
    if not isinstance(influence, Sequence) or len(influence) != len(length):
        raise ValueError(
            f"influence must hold one profile per length {list(length)}; got "
            f"{len(influence) if isinstance(influence, Sequence) else type(influence).__name__}"
        )
    return {
        n: _check_tiles(tiles, n, block, f"influence[{i}]")
        for i, (n, tiles) in enumerate(zip(length, influence))
    }


def search_plan(
    influence: Sequence,
    length: int | Sequence[int],
    budget: float,
    *,
    candidates: Sequence[tuple[float, float]] | None = None,
    block: int = BLOCK,
    sink_size: int = SINK_SIZE,
    min_cache: int = MIN_CACHE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    group: int = 1,
    max_spans: int | None = None,
    lower: float = 0.0,
    constraint_lengths: Sequence[int] | None = None,
    time_limit: float | None = None,
) -> MoAPlan:
    """Pick one ``(alpha, beta)`` per unit minimising the influence loss under a KV budget.

    ``influence[l]`` ``(H_l, n, n)`` tiles from a profile at total length ``N = length``
    (``n = ceil(N / block)``); or, with ``length`` a list of profile lengths, ``influence`` one
    such per-layer list per length. A **unit** is ``group`` consecutive heads of a layer (a GQA
    group sharing one KV head: they get one span, so the KV cache really shrinks;
    ``group=1``: per head); its influence is summed over its heads.

    For candidate ``c`` (default :func:`candidate_grid` over the profile lengths) at length
    ``N``, with the exact runtime block layout (cache rounding included): its **loss** is the
    unit's influence outside the layout, its **density** ("kv" mode of the official code) the
    most key blocks any query block keeps, over ``n``. The mixed-integer program, binary
    ``x[u, c]`` (unit ``u`` takes ``c``) and ``y[l, c]`` (layer ``l`` uses ``c``)::

        minimize   sum_P sum_{u,c} x[u,c] loss_P[u,c] / total_P
        subject to sum_c x[u,c] = 1                                  every unit
                   x[u,c] <= y[l(u),c],  sum_c y[l,c] <= max_spans   every layer
                   lower * budget <= mean_u sum_c x[u,c] density_N[c] <= budget
                                                          every N in constraint_lengths

    where ``total_P`` is the whole influence (sum of absolute values) at profile length ``P``
    (so every length weighs alike) and ``constraint_lengths`` defaults to the profile lengths
    (densities there are those of a plan sized for total length ``N``: save it with
    ``max_new_tokens=0`` to evaluate at ``N`` prompt tokens). Solved by
    ``scipy.optimize.milp`` (HiGHS, relative gap ``1e-6``); ``time_limit`` seconds stops it
    with a warning and the best plan found so far (``RuntimeError`` if it found none). Raises
    ``ValueError`` when no plan meets the constraints.

    Differences from the official search: it sweeps epsilon-constraints over the losses at the
    profile lengths for a Pareto front and keeps the plan with the lowest loss at an unseen
    length; here one plan minimises the normalized sum. Candidates whose cache sizes agree at
    every profile and constraint length are merged (the first kept). Candidates are scored
    with the exact runtime layout instead of the band of ``int(alpha/64 + beta * n)`` blocks.
    """
    check_rule(block, sink_size, min_cache)
    profiles = _profiles(influence, length, block)
    if not 0 < check_real("budget", budget) <= 1:
        raise ValueError(f"budget must be in (0, 1]; got {budget!r}")
    check_int("group", group, minimum=1)
    if max_spans is not None:
        check_int("max_spans", max_spans, minimum=1)
    if not 0 <= check_real("lower", lower) <= 1:
        raise ValueError(f"lower must be in [0, 1]; got {lower!r}")
    if time_limit is not None and not check_real("time_limit", time_limit) > 0:
        raise ValueError(f"time_limit must be > 0 seconds; got {time_limit!r}")
    lengths = sorted(profiles)
    limits = sorted(set(lengths if constraint_lengths is None else constraint_lengths))
    for n in limits:
        check_int("constraint_lengths", n, minimum=1)
    if not limits:
        raise ValueError("constraint_lengths must name at least one length")
    first = profiles[lengths[0]]
    heads = [t.shape[0] for t in first]
    if not first or any([t.shape[0] for t in profiles[n]] != heads for n in lengths):
        raise ValueError(
            "every profile must hold the same layers and heads; got heads per layer "
            f"{ {n: [t.shape[0] for t in profiles[n]] for n in lengths} }"
        )
    if any(h % group for h in heads):
        raise ValueError(f"group={group} must divide the heads of every layer; got {heads}")
    if candidates is None:
        candidates = candidate_grid(max(lengths + limits), min_length=min(lengths + limits))
    rule = {"block": block, "sink_size": sink_size, "min_cache": min_cache}
    merged: dict[tuple, tuple[float, float]] = {}
    for pair in candidates:
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"candidates must be (alpha, beta) pairs; got {pair!r}")
        a, b = pair
        key = tuple(moa_cache_size(a, b, n, **rule) for n in lengths + limits)
        merged.setdefault(key, (float(a), b))
    candidates = list(merged.values())
    if not candidates:
        raise ValueError("search_plan needs at least one candidate")

    units_per_layer = [h // group for h in heads]
    losses = 0.0
    for n in lengths:
        layouts = torch.stack([_candidate_layout(a, b, n, *rule.values()) for a, b in candidates])
        tiles = torch.cat([t.double().cpu() for t in profiles[n]])  # (heads, n, n)
        units = tiles.view(-1, group, *tiles.shape[1:]).sum(1).flatten(1)  # (U, n*n)
        # the size of the whole influence: signed tiles (absolute=False) may sum to <= 0
        total = float(units.abs().sum()) or 1.0
        losses = losses + units @ (~layouts).double().flatten(1).t() / total  # (U, K)
    weights = {}  # kept key blocks of the widest row, per constraint length
    for n in limits:
        layouts = torch.stack([_candidate_layout(a, b, n, *rule.values()) for a, b in candidates])
        weights[n] = layouts.sum(-1).amax(-1).tolist()
    picks = _solve(losses, units_per_layer, weights, budget, lower, max_spans, block, time_limit)
    alphas, betas, start = [], [], 0
    for count in units_per_layer:
        chosen = [candidates[c] for c in picks[start : start + count] for _ in range(group)]
        alphas.append(tuple(a for a, _ in chosen))
        betas.append(tuple(b for _, b in chosen))
        start += count
    return MoAPlan(tuple(alphas), tuple(betas), block, sink_size, min_cache, max_new_tokens)


def _solve(
    losses: torch.Tensor,
    units_per_layer: list[int],
    weights: dict[int, list[int]],
    budget: float,
    lower: float,
    max_spans: int | None,
    block: int,
    time_limit: float | None,
) -> list[int]:
    """The MILP of :func:`search_plan`; returns the candidate index of every unit."""
    try:
        import numpy as np
        from scipy.optimize import LinearConstraint, milp
        from scipy.sparse import coo_array
    except ImportError as error:
        raise ImportError(
            "headwise.moa.search_plan needs scipy>=1.9 (scipy.optimize.milp): "
            "pip install 'headwise[moa]'"
        ) from error
    num_units, num_cand = losses.shape
    num_layers = len(units_per_layer)
    layer_of = np.repeat(np.arange(num_layers), units_per_layer)
    spans = max_spans is not None and max_spans < num_cand
    num_x = num_units * num_cand
    num_vars = num_x + (num_layers * num_cand if spans else 0)
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(row_cols, row_vals, low, high):
        rows.append(np.full(len(row_cols), len(lo)))
        cols.append(np.asarray(row_cols))
        vals.append(np.asarray(row_vals, dtype=float))
        lo.append(low)
        hi.append(high)

    x = np.arange(num_x).reshape(num_units, num_cand)
    for u in range(num_units):
        add(x[u], np.ones(num_cand), 1, 1)
    for n, w in weights.items():
        cells = -(-n // block)
        if min(w) > budget * cells + 1e-9:
            raise ValueError(
                f"budget={budget} is below the sparsest candidate at length {n} "
                f"({min(w)}/{cells} key blocks per unit)"
            )
        # integer kept-block totals: the bounds hold exactly, with no solver tolerance
        cap = math.floor(budget * num_units * cells + 1e-9)
        floor_ = math.ceil(lower * budget * num_units * cells - 1e-9)
        add(x.ravel(), np.tile(np.asarray(w, dtype=float), num_units), floor_, cap)
    if spans:
        y = num_x + np.arange(num_layers * num_cand).reshape(num_layers, num_cand)
        for u in range(num_units):
            for c in range(num_cand):
                add([x[u, c], y[layer_of[u], c]], [1.0, -1.0], -np.inf, 0)
        for layer in range(num_layers):
            add(y[layer], np.ones(num_cand), 0, max_spans)
    matrix = coo_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(lo), num_vars),
    ).tocsr()
    cost = np.zeros(num_vars)
    cost[:num_x] = losses.numpy().ravel()
    options = {"mip_rel_gap": 1e-6, "disp": False}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    start = time.perf_counter()
    result = milp(
        cost,
        integrality=np.ones(num_vars),
        bounds=(0, 1),
        constraints=LinearConstraint(matrix, np.asarray(lo, float), np.asarray(hi, float)),
        options=options,
    )
    if result.x is None and result.status == 1:
        raise RuntimeError(
            f"search_plan: the solver found no plan within time_limit={time_limit} s; raise it"
        )
    if result.x is None:
        raise ValueError(
            f"no plan meets budget={budget}, lower={lower}, max_spans={max_spans} at lengths "
            f"{sorted(weights)} with these candidates (solver: {result.message})"
        )
    if result.status != 0:
        warnings.warn(
            f"search_plan: the solver stopped after {time.perf_counter() - start:.1f} s before "
            f"proving optimality ({result.message}); the plan is the best found",
            RuntimeWarning,
            stacklevel=3,
        )
    chosen = np.asarray(result.x[:num_x]).reshape(num_units, num_cand)
    return [int(c) for c in chosen.argmax(1)]


def _check_plan(plan: MoAPlan, length: int) -> None:
    if not isinstance(plan, MoAPlan):
        raise ArgumentTypeError(f"plan must be an MoAPlan; got {type(plan).__name__}")
    check_int("length", length, minimum=1)


def plan_density(plan: MoAPlan, length: int) -> float:
    """KV density of ``plan`` at total length ``N = length`` (``max_new_tokens`` ignored): the
    mean over heads of ``min(sink + local, N) / N``, the cached fraction of keys. The search
    bounds the same quantity counted in key blocks (the most blocks a query block keeps, over
    ``ceil(N / block)``); the two agree when ``N`` is a multiple of the block."""
    _check_plan(plan, length)
    kept = [
        min(s + w, length)
        for layer in range(plan.num_layers)
        for s, w in plan.cache_sizes(length, layer)
    ]
    return sum(kept) / (len(kept) * length)


def plan_loss(plan: MoAPlan, influence: Sequence[torch.Tensor], length: int) -> float:
    """Share of the whole influence (tiles profiled at total length ``length``) that ``plan``'s
    layouts at that length leave out: the normalized objective term of :func:`search_plan`."""
    _check_plan(plan, length)
    tiles = _check_tiles(influence, length, plan.block, "influence")
    if [t.shape[0] for t in tiles] != [len(a) for a in plan.alphas]:
        raise ValueError(
            f"influence heads per layer {[t.shape[0] for t in tiles]} do not match the plan's "
            f"{[len(a) for a in plan.alphas]}"
        )
    rule = (plan.block, plan.sink_size, plan.min_cache)
    dropped = total = 0.0
    for layer, layer_tiles in enumerate(tiles):
        for h, head in enumerate(layer_tiles.double()):
            kept = _candidate_layout(plan.alphas[layer][h], plan.betas[layer][h], length, *rule)
            dropped += float(head[~kept].sum())
            total += float(head.abs().sum())
    return dropped / (total or 1.0)


__all__ = ["candidate_grid", "plan_density", "plan_loss", "search_plan"]
