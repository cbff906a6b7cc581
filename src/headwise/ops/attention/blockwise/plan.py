"""The blockwise plan: which queries run together and which keys each group reads.

A plan is a tuple of panels (:class:`Panel`). A panel names keys gathered once (or none: K
itself) and the query groups (:class:`RowGroup`) that read slices of them, also as batched runs
(:class:`Run`: consecutive groups with equal query and key counts, the same mask and evenly
spaced key offsets, which one forward kernel call takes as a batch of strided views). Groups
follow the pattern's own query grouping (:meth:`Pattern.key_panels`); groups whose keys are
scattered (block-sparse rows, sinks beside a window) move to panels holding their key sets back
to back. Plans are cached per
(pattern, lengths, block, device) together with the element masks of partial groups. A pattern
that gives its rows' key ranges (:meth:`Pattern._key_ranges`) has its groups' keys and flags
computed from them (:func:`_ranged_groups`); the predicate is then evaluated only for the cached
masks.

The index helpers at the end read and write a group's rows and keys (a slice or an index).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from headwise.ops.attention.plan_cache import PlanCache
from headwise.patterns import Pattern
from headwise.patterns.ranges import merge_ranges

DEFAULT_BLOCK = 32
#: the backward pass runs groups this many times larger (PyTorch's CPU backward kernel does
#: better on 64-query groups: less overlapping dK/dV work between neighboring groups)
BACKWARD_BLOCK_FACTOR = 2
#: partial query groups keep their masks (float32) in the cached plan up to this many entries
MASK_CACHE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RowGroup:
    rows: slice | torch.Tensor  # query positions processed together
    keys: slice | torch.Tensor  # every key position at least one of them may see
    panel_keys: slice | torch.Tensor  # the same keys as positions in the group's panel
    needs_mask: bool  # False when every selected key is visible to every row and head
    mask: torch.Tensor | None = None  # additive (H_p, rows, keys): 0 or -inf, when cached
    has_empty_rows: bool = True  # whether some row of some head sees none of the keys


@dataclass(frozen=True)
class Run:
    """Consecutive groups of one panel that one forward kernel call can take as a batch: equal
    query and key counts, the same mask, and keys at evenly spaced offsets of the panel
    (``key_start + i * key_step``), so the batch is a strided view, not a copy."""

    groups: tuple[RowGroup, ...]
    rows: slice | torch.Tensor  # the groups' query positions, concatenated
    key_start: int
    key_step: int


@dataclass(frozen=True)
class Panel:
    """Keys gathered once (``keys``: their positions; ``None``: K itself, nothing gathered) and
    the query groups that read slices of them, also as batched runs."""

    keys: torch.Tensor | None
    groups: tuple[RowGroup, ...]
    runs: tuple[Run | RowGroup, ...]


#: plans stay cached up to this many, while their masks hold at most this many float32 entries
#: (1 GiB) in all
PLANS: PlanCache[tuple[Panel, ...]] = PlanCache(
    max_plans=256,
    max_size=1 << 28,
    # groups with equal masks share one tensor: each counted once
    size=lambda plan: sum(
        mask.numel()
        for mask in {
            id(row.mask): row.mask for row in plan_groups(plan) if row.mask is not None
        }.values()
    ),
)


@torch.compiler.assume_constant_result
def plan_for(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int, device: str
) -> tuple[Panel, ...]:
    """The cached plan of ``pattern`` (``None``: full) for these lengths, groups of about
    ``block`` queries, and indices on ``device``. ``torch.compile`` runs it while tracing and
    keeps the plan as a constant of the graph (``assume_constant_result``: a pure function of
    its arguments, which the graph's guards fix), so the ``score_mod`` path traces its groups
    without the planner's data-dependent steps (20 graph breaks for a sliding window before)."""
    key = (pattern, q_len, kv_len, block, device)
    return PLANS.get(key, lambda: _build_plan(pattern, q_len, kv_len, block, device))


def _build_plan(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int, device: str
) -> tuple[Panel, ...]:
    if pattern is None:
        groups = tuple(
            RowGroup(slice(s, min(q_len, s + block)), slice(0, kv_len), slice(0, kv_len), False)
            for s in range(0, q_len, block)
        )
        return (Panel(None, groups, _runs(list(groups), device)),)
    panels, mostly_scattered = _panels(pattern, q_len, kv_len, block, device)
    if mostly_scattered:
        # Scattered key sets (sinks beside a window) are copied once per group: groups twice as
        # large halve the copying per query, worth it unless they add much masked work.
        larger, _ = _panels(pattern, q_len, kv_len, 2 * block, device)
        if _work(larger) <= 1.15 * _work(panels):
            return larger
    return panels


def _work(panels: tuple[Panel, ...]) -> int:
    return sum(count(row.rows) * count(row.keys) for row in plan_groups(panels))


def _panels(
    pattern: Pattern, q_len: int, kv_len: int, block: int, device: str
) -> tuple[tuple[Panel, ...], bool]:
    """The plan's panels, and whether most groups of the pattern's own key order (no panel of
    its own) see scattered keys."""
    panels = []
    mostly_scattered = False
    budget = MASK_CACHE_ELEMENTS
    shared: dict[tuple[int, bytes], torch.Tensor] = {}  # masks by their groups' relative ranges
    for panel_keys, query_groups in pattern.key_panels(q_len, kv_len, block):
        positions = torch.arange(kv_len) if panel_keys is None else panel_keys
        ranged = (
            None if panel_keys is not None else _ranged_groups(pattern, q_len, kv_len, query_groups)
        )
        groups = []
        for index, rows in enumerate(query_groups):
            shape = None
            if ranged is not None:
                in_panel, needs_mask, has_empty_rows, shape = ranged[index]
                keys, visible = in_panel, None
            else:
                visible = pattern.visible(positions_of(rows), positions, q_len, kv_len)
                cols = torch.nonzero(visible.any(0).any(0)).flatten()
                in_panel = _as_slice(cols) if len(cols) else slice(0, 0)
                visible = visible[:, :, in_panel]
                keys = (
                    in_panel if panel_keys is None else _as_slice(panel_keys[in_panel], sort=False)
                )
                needs_mask = not bool(visible.all())
                has_empty_rows = not bool(visible.any(-1).all())
            mask = shared.get(shape) if shape is not None else None
            entries = (pattern.num_heads or 1) * count(rows) * count(keys)
            if needs_mask and mask is None and entries <= budget:
                if visible is None:
                    visible = pattern.visible(positions_of(rows), positions_of(keys), q_len, kv_len)
                # Evaluating the predicate costs as much as the scores; do it once per plan.
                budget -= entries
                mask = _additive(visible).to(device)
                if shape is not None:
                    shared[shape] = mask
            groups.append(
                RowGroup(
                    _to(rows, device),
                    _to(keys, device),
                    _to(in_panel, device),
                    needs_mask,
                    mask,
                    has_empty_rows,
                )
            )
        if panel_keys is None:
            scattered_rows = sum(isinstance(row.keys, torch.Tensor) for row in groups)
            mostly_scattered = 2 * scattered_rows > len(groups)
            groups, scattered = _gather_scattered(groups, kv_len, device)
            panels.extend(scattered)
        panels.append(Panel(_to(panel_keys, device), tuple(groups), _runs(groups, device)))
    return tuple(panels), mostly_scattered


def _ranged_groups(
    pattern: Pattern, q_len: int, kv_len: int, query_groups: list[slice | torch.Tensor]
) -> list[tuple[slice | torch.Tensor, bool, bool, tuple[int, bytes] | None]] | None:
    """Per query group, from the rows' key ranges (``None`` when the pattern gives none): the
    keys some row sees (a slice when they are one run, else their positions), whether some row
    and head sees fewer of them (needs a mask), whether some row and head sees none, and, for a
    masked group of one run, its shape: key count and ranges relative to the first key, which
    determine its mask (a sliding window's groups all have the same one: they share it).

    As in the native plan (:func:`~..native.plan._ranged_tiles`): a row sees a subset of its
    group's keys, so it sees all of them exactly when it sees as many."""
    if not query_groups:
        return []
    rows = torch.cat([positions_of(group) for group in query_groups])
    ranges = pattern._key_ranges(rows, q_len, kv_len)
    if ranges is None:
        return None
    heads = pattern.num_heads or 1
    lo, hi = (r.expand(heads, -1, -1) for r in ranges)
    span, n = kv_len + 1, len(rows)
    group_of = torch.repeat_interleave(
        torch.arange(len(query_groups)), torch.tensor([count(g) for g in query_groups])
    )
    row = torch.arange(heads * n).repeat_interleave(lo.shape[-1])
    row, row_start, row_stop = merge_ranges(lo.flatten(), hi.flatten(), row, span)
    sizes = torch.zeros(heads * n, dtype=torch.long).index_add_(0, row, row_stop - row_start)
    owner, start, stop = merge_ranges(row_start, row_stop, group_of[row % n], span)
    keys = torch.zeros(len(query_groups), dtype=torch.long).index_add_(0, owner, stop - start)
    sizes = sizes.view(heads, n)
    groups = len(query_groups)
    partial = torch.zeros(groups, dtype=torch.long).index_add_(
        0, group_of, (sizes != keys[group_of]).any(0).long()
    )
    empty = torch.zeros(groups, dtype=torch.long).index_add_(
        0, group_of, (sizes == 0).any(0).long()
    )
    runs = torch.bincount(owner, minlength=groups).tolist()
    starts, stops = start.tolist(), stop.tolist()
    row_offsets = [0, *torch.tensor([count(g) for g in query_groups]).cumsum(0).tolist()]
    result, first = [], 0
    for group, (n_runs, needs_mask, has_empty) in enumerate(
        zip(runs, partial.tolist(), empty.tolist())
    ):
        shape = None
        if n_runs <= 1:
            keys_of = slice(starts[first], stops[first]) if n_runs else slice(0, 0)
            if needs_mask:
                mine = slice(row_offsets[group], row_offsets[group + 1])
                width = keys_of.stop - keys_of.start
                rel = torch.stack([lo[:, mine], hi[:, mine]]) - keys_of.start
                rel = rel.clamp(0, width).masked_fill(rel[0] >= rel[1], 0)
                shape = (width, rel.numpy().tobytes())
        else:
            mine = range(first, first + n_runs)
            keys_of = torch.cat([torch.arange(starts[r], stops[r]) for r in mine])
        first += n_runs
        result.append((keys_of, needs_mask > 0, has_empty > 0, shape))
    return result


def _gather_scattered(
    groups: list[RowGroup], kv_len: int, device: str
) -> tuple[list[RowGroup], list[Panel]]:
    """Groups whose keys are no contiguous range (block-sparse rows, sinks beside a window) move
    to panels holding their key sets back to back, sorted by size, so that groups of equal size
    run as one batched call instead of one gather and one call each. A panel holds at most
    ``kv_len`` keys (one K's worth), so the gather buffer stays small and in cache."""
    scattered = sorted(
        (row for row in groups if isinstance(row.keys, torch.Tensor)), key=lambda r: len(r.keys)
    )
    if len(scattered) < 2:
        return groups, []
    kept = [row for row in groups if not isinstance(row.keys, torch.Tensor)]
    chunks: list[list[RowGroup]] = [[]]
    for row in scattered:
        if chunks[-1] and sum(len(r.keys) for r in chunks[-1]) + len(row.keys) > kv_len:
            chunks.append([])
        chunks[-1].append(row)
    panels = []
    for chunk in chunks:
        starts = itertools.accumulate((len(row.keys) for row in chunk), initial=0)
        moved = [
            dataclasses.replace(row, panel_keys=slice(start, start + len(row.keys)))
            for row, start in zip(chunk, starts)
        ]
        keys = torch.cat([row.keys for row in chunk])
        panels.append(Panel(keys, tuple(moved), _runs(moved, device)))
    return kept, panels


def _runs(groups: list[RowGroup], device: str) -> tuple[Run | RowGroup, ...]:
    """Split ``groups`` into maximal batchable runs; a group that batches with no neighbor
    stays as it is."""
    runs: list[list[RowGroup]] = []
    for row in groups:
        if runs and _extends(runs[-1], row):
            runs[-1].append(row)
        else:
            runs.append([row])
    return tuple(_as_run(run, device) if len(run) > 1 else run[0] for run in runs)


def _extends(run: list[RowGroup], row: RowGroup) -> bool:
    last = run[-1]
    if not (isinstance(row.panel_keys, slice) and isinstance(last.panel_keys, slice)):
        return False
    if count(row.rows) != count(last.rows) or count(row.keys) != count(last.keys):
        return False
    if count(row.keys) == 0 or row.needs_mask != last.needs_mask:
        return False
    if row.needs_mask and (
        row.mask is None or last.mask is None or not torch.equal(row.mask, last.mask)
    ):
        return False
    step = row.panel_keys.start - last.panel_keys.start
    if len(run) > 1 and step != last.panel_keys.start - run[-2].panel_keys.start:
        return False
    return step >= 0


def _as_run(run: list[RowGroup], device: str) -> Run:
    starts = [row.panel_keys.start for row in run]
    if all(isinstance(row.rows, slice) for row in run) and all(
        a.rows.stop == b.rows.start for a, b in itertools.pairwise(run)
    ):
        rows = slice(run[0].rows.start, run[-1].rows.stop)
    else:
        rows = torch.cat([positions_of(row.rows, torch.device(device)) for row in run])
    step = starts[1] - starts[0]
    return Run(tuple(run), rows, starts[0], step)


def _to(index, device: str):
    return index.to(device) if isinstance(index, torch.Tensor) else index


def _as_slice(index: torch.Tensor, sort: bool = True) -> slice | torch.Tensor:
    """A slice when ``index`` (sorted, unless ``sort=False``) is one increasing contiguous range,
    else the index itself."""
    if not sort:
        if len(index) and bool((index == index[0] + torch.arange(len(index))).all()):
            return slice(int(index[0]), int(index[-1]) + 1)
        return index
    if int(index[-1] - index[0]) + 1 == len(index):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


# --------------------------------------------------------------------------- indexing
def positions_of(index: slice | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The positions a slice or an index names, as an index tensor."""
    if isinstance(index, slice):
        return torch.arange(index.start, index.stop, device=device)
    return index


def count(keys: slice | torch.Tensor) -> int:
    """How many positions a slice or an index names."""
    return keys.stop - keys.start if isinstance(keys, slice) else len(keys)


def plan_groups(plan: tuple[Panel, ...]):
    """Every query group of the plan, panel by panel."""
    return (row for panel in plan for row in panel.groups)


def put_rows(t: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor, dim: int):
    """Write ``values`` at positions ``rows`` along ``dim`` of ``t``."""
    values = values.to(t.dtype)
    if isinstance(rows, slice):
        t[(slice(None),) * dim + (rows,)] = values
    else:
        t.index_copy_(dim, rows, values)


def add_rows(t: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor, dim: int):
    """Add ``values`` at positions ``rows`` along ``dim`` of ``t``."""
    values = values.to(t.dtype)
    if isinstance(rows, slice):
        t[(slice(None),) * dim + (rows,)] += values
    else:
        t.index_add_(dim, rows, values)


def _additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, float("-inf"))


def pattern_mask(pattern, row, q_len, kv_len, device) -> torch.Tensor:
    """The pattern on one query group as an additive float32 mask ``(H_p, rows, keys)``."""
    if row.mask is not None:
        return row.mask
    q_idx, kv_idx = positions_of(row.rows, device), positions_of(row.keys, device)
    return _additive(pattern.visible(q_idx, kv_idx, q_len, kv_len))


def bias_block(bias: torch.Tensor, row: RowGroup) -> torch.Tensor:
    block = bias[:, :, row.rows] if bias.shape[2] > 1 else bias
    return block[..., row.keys] if bias.shape[3] > 1 else block
