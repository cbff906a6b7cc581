"""MoA plan search as a MILP (scipy.optimize.milp): MoA's constraints against brute force."""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch

from headwise.layers.moa import MoAPlan, MoASpan
from headwise.moa import plan_density, plan_loss, search_plan

pytest.importorskip("scipy")

RULE = {"block": 4, "sink_size": 4, "min_cache": 8}
# at N = 32 (8 blocks): sink + 1, 3 and 5 local blocks, and dense
CANDIDATES = [(8.0, 0.0), (16.0, 0.0), (24.0, 0.0), (math.inf, 0.0)]


def _kept(alpha: float, beta: float, length: int) -> torch.Tensor:
    """Kept key blocks ``(n, n)`` of one head, from the pattern's own block layout."""
    span = MoASpan(alpha, beta, **RULE, length=length)
    return span.block_layout(length, length, RULE["block"])[0] != 0


def _tiles(seed: int, layers: int, heads: int, length: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = length // RULE["block"]
    return [
        torch.rand(heads, n, n, generator=gen, dtype=torch.float64).tril() for _ in range(layers)
    ]


def _brute_force(
    profiles, budget, *, group=1, max_spans=None, lower=0.0, limits=None, candidates=CANDIDATES
):
    """Least normalized loss over every assignment of ``candidates`` to units (and its picks)."""
    lengths = sorted(profiles)
    limits = lengths if limits is None else limits
    first = profiles[lengths[0]]
    units = [(layer, h) for layer, t in enumerate(first) for h in range(0, t.shape[0], group)]
    best, best_picks = math.inf, None
    for picks in itertools.product(range(len(candidates)), repeat=len(units)):
        by_layer: dict[int, set] = {}
        for (layer, _), c in zip(units, picks):
            by_layer.setdefault(layer, set()).add(c)
        if max_spans is not None and max(len(s) for s in by_layer.values()) > max_spans:
            continue
        ok = True
        for n in limits:
            density = sum(
                int(_kept(*candidates[c], n).sum(-1).max()) / (n // RULE["block"]) for c in picks
            ) / len(units)
            ok &= lower * budget - 1e-9 <= density <= budget + 1e-9
        if not ok:
            continue
        loss = 0.0
        for n in lengths:
            total = sum(float(t.sum()) for t in profiles[n])
            for (layer, h), c in zip(units, picks):
                dropped = ~_kept(*candidates[c], n)
                loss += float(profiles[n][layer][h : h + group][:, dropped].sum()) / total
        if loss < best - 1e-12:
            best, best_picks = loss, picks
    return best, best_picks


def _score(plan: MoAPlan, profiles) -> float:
    return sum(plan_loss(plan, tiles, n) for n, tiles in profiles.items())


def _distinct(plan: MoAPlan) -> list[int]:
    return [len(set(zip(a, b))) for a, b in zip(plan.alphas, plan.betas)]


@pytest.mark.parametrize(
    "seed, layers, heads, group, max_spans, lower, budget",
    [
        (0, 2, 2, 1, None, 0.0, 0.55),  # the plain multiple-choice knapsack
        (1, 1, 4, 1, 2, 0.9, 0.6),  # MoA's constraints
        (2, 2, 4, 2, 1, 0.5, 0.7),  # GQA groups of 2, one span per layer
    ],
)
def test_milp_matches_brute_force(seed, layers, heads, group, max_spans, lower, budget):
    profiles = {32: _tiles(seed, layers, heads)}
    kw = {"group": group, "max_spans": max_spans, "lower": lower}
    plan = search_plan(profiles[32], 32, budget, candidates=CANDIDATES, **RULE, **kw)
    best, _ = _brute_force(profiles, budget, **kw)
    assert _score(plan, profiles) == pytest.approx(best, rel=1e-6)
    assert lower * budget - 1e-9 <= plan_density(plan, 32) <= budget + 1e-9


def test_two_profile_lengths_and_an_unprofiled_constraint_length():
    profiles = {32: _tiles(3, 1, 3), 64: _tiles(4, 1, 3, length=64)}
    elastic = [(8.0, 0.0), (0.0, 0.25), (0.0, 0.5), (0.0, 1.0)]
    plan = search_plan(
        [profiles[32], profiles[64]],
        [32, 64],
        0.6,
        candidates=elastic,
        **RULE,
        max_spans=2,
        lower=0.8,
        constraint_lengths=[32, 64, 128],
    )
    best, _ = _brute_force(
        profiles, 0.6, max_spans=2, lower=0.8, limits=[32, 64, 128], candidates=elastic
    )
    assert _score(plan, profiles) == pytest.approx(best, rel=1e-6)
    for n in (32, 64, 128):
        assert 0.8 * 0.6 - 1e-9 <= plan_density(plan, n) <= 0.6 + 1e-9


def test_known_optimum_far_influence_gets_the_dense_span():
    # head 0 reads far back (block 3 from query block 7), head 1 only its own block
    tiles = torch.zeros(2, 8, 8, dtype=torch.float64)
    tiles[0, 7, 3], tiles[1].diagonal().fill_(1.0)
    tiles[1, 7, 3] = 0.0
    tiles[0, 7, 3] = 1.0
    # room for one dense head (8 blocks) and one narrow (2): 10 of 16 blocks
    plan = search_plan([tiles], 32, 10 / 16, candidates=[CANDIDATES[0], CANDIDATES[3]], **RULE)
    assert plan.alphas == ((math.inf, 8.0),)
    assert plan_loss(plan, [tiles], 32) == 0.0


def test_span_limit_binds():
    profiles = {32: [torch.zeros(3, 8, 8, dtype=torch.float64)]}
    for h, far in enumerate((1, 3, 5)):  # each head reads one distance: its own best span
        profiles[32][0][h].diagonal(-far).fill_(1.0)
    free = search_plan(profiles[32], 32, 0.8, candidates=CANDIDATES, **RULE)
    limited = search_plan(profiles[32], 32, 0.8, candidates=CANDIDATES, **RULE, max_spans=2)
    assert _distinct(free) == [3] and _distinct(limited) == [2]
    best, _ = _brute_force(profiles, 0.8, max_spans=2)
    assert _score(limited, profiles) == pytest.approx(best)
    assert _score(limited, profiles) > _score(free, profiles)


def test_lower_bound_binds():
    tiles = [torch.eye(8, dtype=torch.float64).expand(2, 8, 8).clone()]  # all on the diagonal
    free = search_plan(tiles, 32, 0.9, candidates=CANDIDATES, **RULE)
    bounded = search_plan(tiles, 32, 0.9, candidates=CANDIDATES, **RULE, lower=0.9)
    assert plan_density(free, 32) < 0.9 * 0.9  # nothing to gain: any span, 2/8 is the least
    assert 0.81 <= plan_density(bounded, 32) <= 0.9


def test_group_shares_one_span_and_sums_influence():
    tiles = torch.zeros(4, 8, 8, dtype=torch.float64)
    tiles[1, 7, 3] = 1.0  # the second head of the first group reads far back
    tiles[2, 7, 3] = 0.5  # the first head of the second group, less
    plan = search_plan(
        [tiles], 32, 10 / 16, candidates=[CANDIDATES[0], CANDIDATES[3]], **RULE, group=2
    )
    assert plan.alphas == ((math.inf, math.inf, 8.0, 8.0),)


def test_every_profile_length_weighs_by_its_share_of_the_influence():
    short, long = (
        torch.zeros(2, 8, 8, dtype=torch.float64),
        torch.zeros(2, 16, 16, dtype=torch.float64),
    )
    short[0, 7, 3], short[1, 7, 7] = 0.6, 0.4  # head 0 drops 60% of the short profile
    long[1, 15, 5], long[0, 15, 15] = 4.0, 6.0  # head 1 drops 40% of the long one (10x larger)
    # one dense head fits: (8 + 2) / 16 blocks at 32 tokens, (16 + 2) / 32 at 64
    plan = search_plan(
        [[short], [long]], [32, 64], 0.63, candidates=[CANDIDATES[0], CANDIDATES[3]], **RULE
    )
    assert plan.alphas == ((math.inf, 8.0),)


def test_infeasible_constraints_raise():
    tiles = _tiles(0, 1, 2)
    with pytest.raises(ValueError, match=r"budget=0.1 is below the sparsest candidate"):
        search_plan(tiles, 32, 0.1, candidates=CANDIDATES, **RULE)
    # 2/8 and 1.0 only, one span per layer: a mean density in [0.54, 0.6] cannot be met
    with pytest.raises(ValueError, match=r"no plan meets budget=0\.6"):
        search_plan(
            tiles,
            32,
            0.6,
            candidates=[CANDIDATES[0], CANDIDATES[3]],
            **RULE,
            max_spans=1,
            lower=0.9,
        )
    with pytest.raises(ValueError, match="group=3 must divide"):
        search_plan(tiles, 32, 0.6, candidates=CANDIDATES, **RULE, group=3)
    with pytest.raises(ValueError, match="one profile per length"):
        search_plan([tiles], [32, 64], 0.6, candidates=CANDIDATES, **RULE)
    with pytest.raises(ValueError, match="lower must be in"):
        search_plan(tiles, 32, 0.6, **RULE, lower=1.5)


def test_without_scipy_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"headwise\[moa\]"):
        search_plan(_tiles(0, 1, 2), 32, 0.6, candidates=CANDIDATES, **RULE)


def test_plan_density_and_loss_follow_the_spans():
    plan = MoAPlan(((8.0, math.inf),), ((0.0, 0.0),), **RULE, max_new_tokens=0)
    assert plan_density(plan, 32) == pytest.approx((8 + 32) / 64)
    tiles = [torch.ones(2, 8, 8, dtype=torch.float64).tril()]
    dropped = float((~_kept(8.0, 0.0, 32) & torch.ones(8, 8).tril().bool()).sum())
    assert plan_loss(plan, tiles, 32) == pytest.approx(dropped / 72)


def test_signed_influence_with_a_negative_total_is_still_minimized():
    """Tiles of ``absolute=False`` may sum below zero: dividing by that sum would turn the
    minimization into a maximization. Head 0 relies on far keys (dropping them costs +10.5 of
    influence): it must get the wide span."""
    n, length = 8, 512
    tiles = torch.full((2, n, n), -0.5).tril()
    tiles[0, 4:, :2] = 3.0
    assert float(tiles.sum()) < 0
    plan = search_plan([tiles], length, 0.7, candidates=[(0.0, 0.25), (0.0, 1.0)])
    assert plan.betas == ((1.0, 0.25),)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"candidates": [(0,)]}, ValueError, "pairs"),
        ({"influence": [torch.full((2, 8, 8), math.nan)]}, ValueError, "non-finite"),
    ],
)
def test_bad_candidates_and_non_finite_tiles_are_named(kwargs, error, match):
    influence = kwargs.pop("influence", [torch.rand(2, 8, 8).tril()])
    with pytest.raises(error, match=match):
        search_plan(influence, 512, 0.5, **kwargs)


def test_a_time_limit_hit_before_any_plan_says_so():
    """Stopped by ``time_limit`` before a feasible point, the search says so (not that the
    budget is infeasible)."""
    torch.manual_seed(0)
    influence = [torch.rand(32, 16, 16).tril() for _ in range(8)]
    with pytest.raises(RuntimeError, match="time_limit"):
        search_plan(influence, 1024, 0.5, lower=0.95, max_spans=2, time_limit=1e-6)
