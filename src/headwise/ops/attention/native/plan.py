"""The native kernel's plans: query tiles of at most :func:`~.build.lanes` rows, their key runs
and per-key lane bits, cached per pattern and lengths.

A tile is filled from the pattern's own query groups (:meth:`Pattern.key_panels`: spatial tiles
for a 2-D neighborhood), so its queries' windows overlap; its keys are the union of what they
may see, stored as runs of consecutive positions, and a per-key bit per query lane says who may
see it (omitted when every query sees every key of the tile). A neighborhood's relative-position
table is read through a per-entry index built once per plan (:func:`relative_index_plan`).

A pattern that gives its rows' key ranges (:meth:`Pattern._key_ranges`: causal, windows, sinks,
packed documents, per-head stacks and their ``&`` / ``|``) gets its plan from them in O(rows x
ranges + entries) (:func:`_ranged_tiles`): a fresh ``cu_seqlens`` costs milliseconds. Any other
pattern is evaluated tile by tile through its predicate (:func:`_predicate_tiles`), which gives
the same plan.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from headwise.ops.attention.native.build import PlanStruct, lanes
from headwise.ops.attention.plan_cache import PlanCache
from headwise.patterns import Pattern
from headwise.patterns.ranges import merge_ranges


@dataclass(frozen=True)
class TilePlan:
    """Query tiles of at most :func:`lanes` rows (``rows``: -1 pads), each with its keys as runs of
    consecutive positions and, when some of its queries may not see some of them, lane bits per
    key (bit ``i``: query ``i`` of the tile sees it) for each head of the pattern."""

    rows: torch.Tensor  # int32 (tiles, lanes)
    seg_offsets: torch.Tensor  # int64 (tiles + 1,)
    seg_start: torch.Tensor  # int32
    seg_len: torch.Tensor  # int32
    bit_offsets: torch.Tensor  # int64 (tiles,), -1: every key visible to every query
    bits: torch.Tensor  # int32 (H_p, entries)
    max_keys: int
    key_offsets: torch.Tensor  # int64 (tiles + 1,): each tile's first key entry, then the total

    def as_struct(self, rpb_index: torch.Tensor | None = None) -> PlanStruct:
        pointers = (self.rows, self.seg_offsets, self.seg_start, self.seg_len, self.bit_offsets)
        return PlanStruct(
            len(self.rows),
            *[t.data_ptr() for t in pointers],
            self.bits.data_ptr(),
            self.bits.shape[1] if self.bits.shape[0] > 1 else 0,
            self.key_offsets.data_ptr(),
            None if rpb_index is None else rpb_index.data_ptr(),
        )

    @functools.cached_property
    def tiles(self) -> int:
        return len(self.rows)

    @functools.cached_property
    def struct(self) -> PlanStruct:
        """:meth:`as_struct` without a relative-position index, made once per plan."""
        return self.as_struct()

    def key_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every key entry in kernel order: its position and its tile."""
        lengths = self.seg_len.long()
        starts = torch.repeat_interleave(self.seg_start.long(), lengths)
        first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        positions = starts + torch.arange(len(starts)) - first
        per_tile = self.key_offsets.diff()
        return positions, torch.repeat_interleave(torch.arange(len(self.rows)), per_tile)

    @property
    def entries(self) -> int:
        return self.bits.numel() + 2 * self.seg_start.numel() + self.rows.numel()


def plan_budget() -> int:
    """The int32 entries cached plans may hold: a sixteenth of the machine's memory, at least
    512 MiB. A model's plans must all fit, or each forward rebuilds them: the 30 layers of a MoA
    plan for SmolLM2 at 8k tokens hold 1.2 GiB (2-72 MiB a layer)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        memory = 0
    return max(1 << 29, memory // 16) // 4


#: plans stay cached up to this many, while they hold at most :func:`plan_budget` entries
PLANS: PlanCache[TilePlan] = PlanCache(
    max_plans=256, max_size=plan_budget(), size=lambda plan: plan.entries
)


def tile_plan(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
    """The plan of ``pattern`` for these lengths: the caller's own copy of the cached one (which
    every equal pattern shares, so no caller may change it)."""
    plan = _shared_tile_plan(pattern, q_len, kv_len)
    fields = [getattr(plan, f.name) for f in dataclasses.fields(plan)]
    return TilePlan(*[x.clone() if isinstance(x, torch.Tensor) else x for x in fields])


def _shared_tile_plan(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
    """The cached plan itself, for the kernel, which only reads it."""
    return PLANS.get((pattern, q_len, kv_len), lambda: _build_plan(pattern, q_len, kv_len))


def _build_plan(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
    pattern.check_lengths(q_len, kv_len)
    plan = _tiles_of(pattern, q_len, kv_len)
    # the kernel indexes q and k, v rows with these: each must be in range
    rows, ends = plan.rows, plan.seg_start + plan.seg_len
    if rows.numel() and (rows.max() >= q_len or (len(ends) and ends.max() > kv_len)):
        raise ValueError(f"pattern {pattern} names positions beyond q_len={q_len}, kv_len={kv_len}")
    return plan


def _tiles_of(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
    """The plan from the rows' key ranges when the pattern gives them (and gathers no panels),
    else from its predicate."""
    width = lanes()
    panels = pattern.key_panels(q_len, kv_len, width)
    groups = [group for _, panel_groups in panels for group in panel_groups]
    if all(keys is None for keys, _ in panels) and all(isinstance(g, slice) for g in groups):
        rows = _tile_rows(groups, width)
        ranges = pattern._key_ranges(rows.flatten().clamp(min=0), q_len, kv_len)
        if ranges is not None:
            return _ranged_tiles(rows, *ranges, pattern.num_heads or 1, kv_len)
    return _predicate_tiles(pattern, q_len, kv_len)


def _tile_rows(groups: list[slice], width: int) -> torch.Tensor:
    """``(tiles, width)`` int64 query rows (-1 pads): each group of consecutive rows cut into
    tiles of ``width`` rows, in order."""
    start = torch.tensor([g.start for g in groups], dtype=torch.long)
    stop = torch.tensor([g.stop for g in groups], dtype=torch.long)
    # an empty group is one empty tile, as ``split`` gives
    per_group = ((stop - start + width - 1) // width).clamp(min=1)
    group = torch.repeat_interleave(torch.arange(len(groups)), per_group)
    rank = torch.arange(len(group)) - (per_group.cumsum(0) - per_group)[group]
    rows = (start[group] + rank * width)[:, None] + torch.arange(width)
    return rows.masked_fill(rows >= stop[group, None], -1)


def _ranged_tiles(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, heads: int, kv_len: int
) -> TilePlan:
    """The plan of tiles ``rows`` ``(tiles, width)`` whose queries see the key ranges ``[lo,
    hi)`` ``(H, tiles * width, K)``, in O(H x rows x K + entries), no (query, key) pair
    evaluated.

    Each row's ranges are merged into disjoint runs; a tile's keys are the union of its rows'
    runs. Since a row sees a subset of that union, it sees all of it exactly when it sees as many
    keys: a tile where every row does needs no bits. A partial tile's bits are a running sum
    over its key entries of ``+2**lane`` where a run of that lane starts and ``-2**lane`` where
    it stops (the runs of one lane are disjoint, so the sum is their OR)."""
    tiles, width = rows.shape
    span = kv_len + 1
    real = (rows >= 0).view(1, -1, 1)
    lo, hi = lo.expand(heads, -1, -1), hi.expand(heads, -1, -1)
    hi = torch.where(real, hi, lo)  # padding lanes see nothing
    if lo.shape[-1] == 1:  # one range a row (causal, a window, documents): its own run or none
        keep = (hi > lo).flatten()
        lane_of = torch.arange(heads * tiles * width)[keep]
        row_start, row_stop = lo.flatten()[keep], hi.flatten()[keep]
    else:
        lane_of = torch.arange(heads * tiles * width).repeat_interleave(lo.shape[-1])
        lane_of, row_start, row_stop = merge_ranges(lo.flatten(), hi.flatten(), lane_of, span)
    sizes = torch.zeros(heads * tiles * width, dtype=torch.long)
    sizes.index_add_(0, lane_of, row_stop - row_start)
    row_tile = lane_of // width % tiles
    owner, start, stop = merge_ranges(row_start, row_stop, row_tile, span)
    segments = torch.bincount(owner, minlength=tiles)
    keys = torch.zeros(tiles, dtype=torch.long).index_add_(0, owner, stop - start)
    seen_all = (sizes.view(heads, tiles, width) == keys[None, :, None]) | ~real.view(1, tiles, -1)
    partial = ~seen_all.all(2).all(0)
    bit_offsets = torch.where(partial, (keys * partial).cumsum(0) - keys * partial, -1)
    bits = torch.zeros(1, 1, dtype=torch.int32)
    if bool(partial.any()):
        # each row run's first key entry among the partial tiles' entries
        lengths = (stop - start) * partial[owner]
        run = torch.searchsorted(owner * span + start, row_tile * span + row_start, right=True) - 1
        first = (lengths.cumsum(0) - lengths)[run] + row_start - start[run]
        mine = partial[row_tile]
        head, first, lane_bit = lane_of[mine] // (tiles * width), first[mine], lane_of[mine] % width
        entries = int(lengths.sum())
        steps = torch.zeros(heads, entries, dtype=torch.int32)
        lane_bit = (1 << lane_bit).to(torch.int32)
        steps.index_put_((head, first), lane_bit, accumulate=True)
        last = first + (row_stop - row_start)[mine]
        inside = last < entries  # a run ending at the last entry needs no step down
        steps.index_put_((head[inside], last[inside]), -lane_bit[inside], accumulate=True)
        bits = steps.cumsum_(1)
    return TilePlan(
        rows=rows.to(torch.int32),
        seg_offsets=torch.nn.functional.pad(segments.cumsum(0), (1, 0)),
        seg_start=start.to(torch.int32),
        seg_len=(stop - start).to(torch.int32),
        bit_offsets=bit_offsets,
        bits=bits,
        max_keys=max(1, int(keys.max())) if tiles else 1,
        key_offsets=torch.nn.functional.pad(keys.cumsum(0), (1, 0)),
    )


def _predicate_tiles(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
    rows_list, starts, lengths, seg_counts, bit_offsets, bits = [], [], [], [0], [], []
    entries, max_keys, key_counts = 0, 1, [0]
    width = lanes()
    for panel_keys, groups in pattern.key_panels(q_len, kv_len, width):
        candidates = torch.arange(kv_len) if panel_keys is None else panel_keys
        for group in groups:
            positions = torch.arange(group.start, group.stop) if isinstance(group, slice) else group
            for rows in positions.split(width):
                visible = pattern.visible(rows, candidates, q_len, kv_len)
                seen = visible.any(0).any(0)
                keys, order = torch.sort(candidates[seen])
                visible = visible[:, :, seen][:, :, order]
                breaks = torch.nonzero(keys.diff() != 1).flatten() + 1
                edges = torch.cat([torch.tensor([0]), breaks, torch.tensor([len(keys)])])
                if len(keys) == 0:
                    edges = edges[:1]
                starts.append(keys[edges[:-1]])
                lengths.append(edges.diff())
                seg_counts.append(len(edges) - 1)
                padded = torch.full((width,), -1, dtype=torch.int32)
                padded[: len(rows)] = rows
                rows_list.append(padded)
                max_keys = max(max_keys, len(keys))
                key_counts.append(len(keys))
                if bool(visible.all()):
                    bit_offsets.append(-1)
                    continue
                lane_bits = torch.arange(len(rows)).view(1, -1, 1)
                bits.append((visible.to(torch.int32) << lane_bits).sum(1, dtype=torch.int32))
                bit_offsets.append(entries)
                entries += len(keys)
    heads = max((b.shape[0] for b in bits), default=1)
    return TilePlan(
        rows=torch.stack(rows_list),
        seg_offsets=torch.tensor(seg_counts).cumsum(0),
        seg_start=torch.cat(starts).to(torch.int32),
        seg_len=torch.cat(lengths).to(torch.int32),
        bit_offsets=torch.tensor(bit_offsets, dtype=torch.int64),
        bits=torch.cat([b.expand(heads, -1) for b in bits], 1)
        if bits
        else torch.zeros(1, 1, dtype=torch.int32),
        max_keys=max_keys,
        key_offsets=torch.tensor(key_counts).cumsum(0),
    )


@functools.lru_cache(maxsize=16)
def relative_index_plan(pattern: Pattern, q_len: int, kv_len: int) -> tuple[torch.Tensor, int]:
    """``(entries, lanes)`` int32: per key entry of the plan and query lane, the flat index into
    a head's relative-position table (``pattern.relative_index``; empty lanes read index 0, they
    are never written); and the entries a head's table must have for every index to be in it."""
    plan = _shared_tile_plan(pattern, q_len, kv_len)
    positions, tile = plan.key_entries()
    rows = plan.rows[tile].long().clamp(min=0)
    index = pattern.relative_index(rows, positions[:, None]).to(torch.int32).contiguous()
    return index, int(index.max()) + 1 if index.numel() else 0
