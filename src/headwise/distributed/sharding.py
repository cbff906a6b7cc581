"""How a sequence is split over ranks, and patterns evaluated at the shards' global positions.

Layouts over ``P`` ranks of a sequence padded to ``L_pad`` tokens:

* ``"contiguous"``: ``L_pad = ceil(L / P) * P``; rank ``r`` holds tokens ``[r c, (r + 1) c)`` with
  ``c = L_pad / P``.
* ``"zigzag"`` (the default): ``L_pad = ceil(L / 2P) * 2P``, cut into ``2P`` chunks of
  ``c = L_pad / 2P``; rank ``r`` holds chunks ``r`` and ``2P - 1 - r``. Under a causal pattern
  every rank then sees the same number of (query, key) pairs, so no rank waits for another.

**Padding rule.** When ``L`` does not divide, the sequence is padded at its end with zeros. Padded
positions are neither queries nor keys: they see nothing (output 0, LSE -inf), nobody sees them,
and they receive zero gradient. :func:`shard_sequence` pads, :func:`gather_sequence` strips.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from headwise.distributed._comm import ProcessGroup, rank_and_size
from headwise.patterns import Pattern

Layout = Literal["zigzag", "contiguous"]
_LAYOUTS = ("zigzag", "contiguous")
Runs = tuple[tuple[int, int], ...]


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout!r}")


def padded_length(seq_len: int, world_size: int, layout: Layout = "zigzag") -> int:
    """Length after padding ``seq_len`` so that ``layout`` splits it evenly over the ranks."""
    _check_layout(layout)
    if seq_len < 1 or world_size < 1:
        raise ValueError(
            f"seq_len and world_size must be positive; got seq_len={seq_len}, "
            f"world_size={world_size}"
        )
    parts = 2 * world_size if layout == "zigzag" else world_size
    return -(-seq_len // parts) * parts


def shard_runs(seq_len: int, world_size: int, rank: int, layout: Layout = "zigzag") -> Runs:
    """Global ``(start, length)`` runs held by ``rank``, in the order they sit in its shard."""
    total = padded_length(seq_len, world_size, layout)
    if layout == "contiguous":
        chunk = total // world_size
        return ((rank * chunk, chunk),)
    chunk = total // (2 * world_size)
    return ((rank * chunk, chunk), ((2 * world_size - 1 - rank) * chunk, chunk))


def shard_positions(
    seq_len: int, world_size: int, rank: int, layout: Layout = "zigzag"
) -> torch.Tensor:
    """Global positions ``(L_pad / P,)`` of ``rank``'s tokens (padded ones are ``>= seq_len``)."""
    return _positions(shard_runs(seq_len, world_size, rank, layout))


def _positions(runs: Runs) -> torch.Tensor:
    return torch.cat([torch.arange(start, start + n) for start, n in runs])


def shard_sequence(
    x: torch.Tensor,
    *,
    layout: Layout = "zigzag",
    dim: int = 1,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's shard of a full sequence ``x`` (length along ``dim``), zero-padded per layout."""
    rank, world = rank_and_size(group)
    seq_len = x.shape[dim]
    total = padded_length(seq_len, world, layout)
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, total - seq_len]
    padded = torch.nn.functional.pad(x, pad)
    index = shard_positions(seq_len, world, rank, layout).to(x.device)
    return padded.index_select(dim, index)


def gather_sequence(
    x: torch.Tensor,
    seq_len: int,
    *,
    layout: Layout = "zigzag",
    dim: int = 1,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: all ranks get the full ``seq_len`` sequence.

    Not differentiable (``all_gather``); meant for evaluation, tests and logging.
    """
    _, world = rank_and_size(group)
    if world == 1:
        return x.narrow(dim, 0, seq_len)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    order = torch.cat([shard_positions(seq_len, world, r, layout) for r in range(world)])
    gathered = torch.cat(parts, dim)
    return gathered.index_select(dim, torch.argsort(order).to(x.device)).narrow(dim, 0, seq_len)


@dataclass(frozen=True)
class AtPositions(Pattern):
    """``pattern`` on a length-``seq_len`` self-attention, seen from a subset of positions.

    Local query ``i`` is global position ``q_runs``-flattened ``[i]``, local key ``j`` likewise
    from ``kv_runs``; local head ``h`` is global head ``heads[h]`` (all heads when ``None``).
    Positions ``>= seq_len`` (padding) are never visible. ``pattern=None`` is full attention.
    This lets every backend run one block of a sharded problem with the global pattern.
    """

    pattern: Pattern | None
    seq_len: int
    q_runs: Runs
    kv_runs: Runs
    heads: tuple[int, ...] | None = None
    _tables: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        if self.heads is not None:
            return len(self.heads)
        return None if self.pattern is None else self.pattern.num_heads

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        expected = (sum(n for _, n in self.q_runs), sum(n for _, n in self.kv_runs))
        if (q_len, kv_len) != expected:
            raise ValueError(
                f"shard pattern covers {expected[0]} queries and {expected[1]} keys; got "
                f"q_len={q_len}, kv_len={kv_len}"
            )

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._tables:
            heads = self.heads if self.heads is not None else (0,)
            self._tables[key] = (
                _positions(self.q_runs).to(device),
                _positions(self.kv_runs).to(device),
                torch.tensor(heads, dtype=torch.long, device=device),
            )
        return self._tables[key]

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        q_table, kv_table, head_table = self._table(q_idx.device)
        q_pos, kv_pos = q_table[q_idx], kv_table[kv_idx]
        real = (q_pos < self.seq_len) & (kv_pos < self.seq_len)
        if self.pattern is None:
            return real
        last = self.seq_len - 1
        head = head_table[h] if self.heads is not None else h
        # Padded positions are clamped to a real one only to stay inside the wrapped pattern's
        # tables (documents); ``real`` hides them anyway.
        allowed = self.pattern._allowed(
            head, q_pos.clamp(max=last), kv_pos.clamp(max=last), self.seq_len, self.seq_len
        )
        return allowed & real


@functools.lru_cache(maxsize=1024)
def block_pattern(
    pattern: Pattern | None, seq_len: int, q_runs: Runs, kv_runs: Runs
) -> tuple[Pattern | None, bool]:
    """The pattern of one (query shard, key shard) block and whether any pair in it is visible.

    Returns ``(None, True)`` for unpadded full attention so backends take their dense path.
    """
    padded = any(start + n > seq_len for start, n in q_runs + kv_runs)
    if pattern is None and not padded:
        return None, True
    local = AtPositions(pattern, seq_len, q_runs, kv_runs)
    q_len, kv_len = sum(n for _, n in q_runs), sum(n for _, n in kv_runs)
    visible = bool(local.block_layout(q_len, kv_len, 64).any())
    return local, visible
