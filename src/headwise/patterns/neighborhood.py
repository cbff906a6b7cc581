"""Neighborhood attention windows on 1-D, 2-D and 3-D token grids (NATTEN semantics).

Tokens of a grid ``(X,)``, ``(X, Y)`` or ``(X, Y, Z)`` are flattened row-major. Along each axis of
length ``L`` with kernel ``k``, dilation ``d``, stride ``s`` and a causal flag (Hassani et al.,
"Neighborhood Attention Transformer", CVPR 2023; "Dilated Neighborhood Attention Transformer";
"Faster Neighborhood Attention", NeurIPS 2024; "Generalized Neighborhood Attention", 2025):

* dilation groups: position ``i`` is in group ``g = i mod d`` at in-group index ``i' = i // d``;
  the group has ``L_g = L // d + [g < L mod d]`` positions; queries see keys of their group only.
* non-causal: ``left = k // 2``, ``right = k // 2 + k mod 2 - 1``; leader
  ``l = min((i' // s) s + s // 2, L_g - 1)``; center ``c = clamp(l, left, L_g - 1 - right)``;
  keys ``j'`` in ``[c - left, c + right]`` - near a border the window shifts inwards, so every
  query sees exactly ``k`` keys.
* causal: leader ``l = min((i' // s) s + s - 1, L_g - 1)``; keys ``j'`` in
  ``[max(l - k + 1, 0), i']`` - never shifted, early queries see fewer keys.
* a grid axis shorter than its window (``L_g < k``; NATTEN raises) lets every query see its
  whole dilation group along that axis.

Arguments are Python integers of any size (and bools for ``causal``). Before any tensor arithmetic
each axis clamps ``k`` to ``L + 1``, ``d`` to ``L`` and ``s`` to ``2L``: every larger value gives
the same window (the whole group; one token per group; leader = last position), so huge values
stay exact instead of overflowing int64.

The N-D neighborhood is the Cartesian product of the per-axis windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from headwise._checks import check_bool, check_int
from headwise.patterns.base import Pattern


@dataclass(frozen=True)
class Neighborhood(Pattern):
    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]

    def __post_init__(self):
        rank = len(self.grid)
        if rank not in (1, 2, 3):
            raise ValueError(f"grid must have 1, 2 or 3 axes; got {self.grid}")
        for name in ("grid", "kernel_size", "dilation", "stride", "causal"):
            values = getattr(self, name)
            if len(values) != rank:
                raise ValueError(f"{name} must have one entry per grid axis ({rank}); got {values}")
            names = [name] if rank == 1 else [f"{name}[{i}]" for i in range(rank)]
            if name == "causal":
                checked = tuple(check_bool(n, v) for n, v in zip(names, values))
            else:
                checked = tuple(check_int(n, v) for n, v in zip(names, values))
                if min(checked) < 1:
                    raise ValueError(f"{name} entries must be positive integers; got {values}")
            object.__setattr__(self, name, checked)
        if any(s > k for s, k in zip(self.stride, self.kernel_size)):
            raise ValueError(
                f"stride must not exceed kernel_size; got stride={self.stride}, "
                f"kernel_size={self.kernel_size}"
            )

    def __repr__(self) -> str:
        def one(values: tuple) -> Any:
            return values[0] if len(set(values)) == 1 else values

        grid = self.grid[0] if len(self.grid) == 1 else self.grid
        text = f"neighborhood({grid!r}, {one(self.kernel_size)!r}"
        for name, default in (("dilation", 1), ("causal", False), ("stride", 1)):
            value = one(getattr(self, name))
            if value != default:
                text += f", {name}={value!r}"
        return text + ")"

    @property
    def size(self) -> int:
        return math.prod(self.grid)

    def axis_parameters(self, axis: int) -> tuple[int, int, int, int]:
        """``(L, k, d, s)`` of ``axis``, clamped so that they fit any index arithmetic.

        ``k > L`` already shows the whole dilation group, ``d >= L`` already puts every position
        in a group of its own and ``s >= 2L`` already makes the leader the last position, so
        ``min(k, L + 1)``, ``min(d, L)`` and ``min(s, 2L)`` give the same windows exactly."""
        length = self.grid[axis]
        return (
            length,
            min(self.kernel_size[axis], length + 1),
            min(self.dilation[axis], length),
            min(self.stride[axis], 2 * length),
        )

    def check_lengths(self, q_len, kv_len):
        if q_len != self.size or kv_len != self.size:
            raise ValueError(
                f"neighborhood pattern on grid {self.grid} needs q_len = kv_len = {self.size}; "
                f"got q_len={q_len}, kv_len={kv_len}"
            )

    def coordinates(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Per-axis coordinates of flat (row-major) token indices."""
        coords = []
        for axis, length in enumerate(self.grid):
            inner = math.prod(self.grid[axis + 1 :])
            coords.append((idx // inner) % length)
        return coords

    def relative_index(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Flat index into a ``(2k_1 - 1) x ...`` relative-position table (NAT's RPB) of the
        offset ``(j - i) / d + k - 1`` per axis, ``q_idx`` broadcast against ``kv_idx``. Keys
        outside the window are masked anyway; clamping keeps their lookups in range."""
        flat = torch.zeros((), dtype=torch.long, device=q_idx.device)
        for axis, (i, j) in enumerate(zip(self.coordinates(q_idx), self.coordinates(kv_idx))):
            k, d = self.kernel_size[axis], self.axis_parameters(axis)[2]
            offset = torch.div(j - i, d, rounding_mode="floor") + k - 1
            flat = flat * (2 * k - 1) + offset.clamp(0, 2 * k - 2)
        return flat

    def query_groups(self, q_len, size):
        """Spatial tiles of about ``size`` queries (in dilation-group order), whose windows
        overlap far more than those of consecutive row-major tokens."""
        return [tile for band in self._tile_bands(size) for tile in band]

    def key_panels(self, q_len, kv_len, size):
        """The tiles of :meth:`query_groups` in bands that share every tile coordinate but the
        last axis'. A band's panel holds the keys its queries may see, ordered with the last axis
        outermost (dilation-group order on every axis), so each tile's window union is one
        contiguous run of the panel: a kernel reads it in place instead of gathering it."""
        if len(self.grid) == 1:
            return [(None, self.query_groups(q_len, size))]
        orders = [self._dilation_order(axis) for axis in range(len(self.grid))]
        tables = [self._axis_table(axis, torch.device("cpu")) for axis in range(len(self.grid))]
        panels = []
        for band in self._tile_bands(size):
            coords = self.coordinates(torch.cat(band))
            per_axis = []
            for order, table, coord in zip(orders, tables, coords):
                seen = table[coord.unique()].any(0)
                per_axis.append(order[seen[order]])
            # last axis outermost, then the others in grid order
            order = [per_axis[-1], *per_axis[:-1]]
            mesh = torch.meshgrid(*order, indexing="ij")
            flat = torch.zeros_like(mesh[0])
            for axis, coord in enumerate([*mesh[1:], mesh[0]]):
                flat = flat + coord * math.prod(self.grid[axis + 1 :])
            panels.append((flat.flatten(), band))
        return panels

    def _dilation_order(self, axis: int) -> torch.Tensor:
        """Positions along ``axis`` sorted by (dilation group, index within the group)."""
        length, _, d, _ = self.axis_parameters(axis)
        return torch.tensor(sorted(range(length), key=lambda i: (i % d, i // d)))

    def _tile_bands(self, size: int) -> list[list[torch.Tensor]]:
        """Tiles of about ``size`` queries, grouped by their tile index on all axes but the last.

        Tiles are taller than wide on the last axis (``size`` 32 on a 2-D grid: 8 x 4), which
        makes bands taller, so fewer bands re-read each key."""
        rank = len(self.grid)
        edges = _tile_edges(size, rank)
        index = torch.arange(self.size).view(self.grid)
        for axis in range(rank):
            index = index.index_select(axis, self._dilation_order(axis))
        bands = [index]
        for axis in range(rank - 1):
            bands = [part for b in bands for part in b.split(edges[axis], dim=axis)]
        return [
            [torch.sort(t.flatten()).values for t in band.split(edges[-1], dim=rank - 1)]
            for band in bands
        ]

    def axis_window(
        self, axis: int, i: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dilation group and inclusive in-group key range ``[lo, hi]`` of coordinate ``i``."""
        length, k, d, s = self.axis_parameters(axis)
        group = i % d
        inner = i // d
        group_len = length // d + (group < length % d).to(i.dtype)
        last = group_len - 1
        if self.causal[axis]:
            leader = torch.minimum((inner // s) * s + s - 1, last)
            return group, torch.clamp(leader - k + 1, min=0), inner
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = torch.minimum((inner // s) * s + s // 2, last)
        center = torch.clamp(torch.minimum(leader, last - right), min=left)
        return group, center - left, torch.minimum(center + right, last)

    def visible(self, q_idx, kv_idx, q_len, kv_len):
        # The window is a product over axes: look each axis up in its small (L_a, L_a) table
        # instead of evaluating the full predicate per (query, key) pair.
        allowed = None
        for axis, (i, j) in enumerate(zip(self.coordinates(q_idx), self.coordinates(kv_idx))):
            table = self._axis_table(axis, q_idx.device)
            part = table[i[:, None], j[None, :]]
            allowed = part if allowed is None else allowed & part
        return allowed[None]

    def _axis_table(self, axis: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(self.grid[axis], device=device)
        group, lo, hi = self.axis_window(axis, positions)
        keys = positions[None, :]
        d = self.axis_parameters(axis)[2]
        inner = keys // d
        return (keys % d == group[:, None]) & (inner >= lo[:, None]) & (inner <= hi[:, None])

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        allowed = torch.ones_like(q_idx + kv_idx, dtype=torch.bool)
        for axis, (i, j) in enumerate(zip(self.coordinates(q_idx), self.coordinates(kv_idx))):
            group, lo, hi = self.axis_window(axis, i)
            d = self.axis_parameters(axis)[2]
            inner = j // d
            allowed = allowed & (j % d == group) & (inner >= lo) & (inner <= hi)
        return allowed


def _tile_edges(size: int, rank: int) -> tuple[int, ...]:
    """Tile edge per axis for tiles of at most ``size`` queries (powers of two, the last axis
    never longer than the others): 16 -> (4, 4), 32 -> (8, 4) on a 2-D grid; 32 -> (4, 4, 2) on
    a 3-D grid."""
    if rank == 1:
        return (size,)
    bits = max(0, size.bit_length() - 1)
    return tuple(1 << (bits // rank + (axis < bits % rank)) for axis in range(rank))


def _per_axis(name: str, value: Any, rank: int) -> tuple:
    """One value for every axis, or one per axis (each is checked by :class:`Neighborhood`)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return (value,) * rank
    values = tuple(value)
    if len(values) != rank:
        raise ValueError(f"{name} must be one value or {rank} values; got {value!r}")
    return values


def neighborhood(
    grid: int | tuple[int, ...],
    kernel_size: int | tuple[int, ...],
    dilation: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    *,
    stride: int | tuple[int, ...] = 1,
) -> Pattern:
    """Neighborhood attention on a row-major flattened grid (see the module doc for the rule).

    ``grid`` is ``X``, ``(X, Y)`` or ``(X, Y, Z)``; ``kernel_size``, ``dilation``, ``stride`` and
    ``causal`` are one value for every axis or one per axis.
    """
    grid = (grid,) if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable) else grid
    grid = tuple(grid)
    rank = len(grid)
    return Neighborhood(
        grid=grid,
        kernel_size=_per_axis("kernel_size", kernel_size, rank),
        dilation=_per_axis("dilation", dilation, rank),
        stride=_per_axis("stride", stride, rank),
        causal=_per_axis("causal", causal, rank),
    )
