"""The :class:`Pattern` object: who may attend to whom.

A pattern answers one question, "may query ``i`` of head ``h`` attend key ``j``?", as a pure
function of indices (FlexAttention's ``mask_mod`` style). From that predicate every consumer derives
what it needs:

* ``mask_mod(q_len, kv_len)`` - the predicate itself, for FlexAttention and custom kernels;
* ``dense_mask(q_len, kv_len)`` - a boolean ``(H_p, Lq, Lk)`` tensor, for the reference oracle;
* ``block_layout(q_len, kv_len, block)`` - ``(H_p, nQ, nK)`` codes EMPTY/PARTIAL/FULL, computed
  in row chunks so no ``Lq x Lk`` tensor is ever built;
* ``block_mask(...)`` - a FlexAttention ``BlockMask`` assembled from that layout;
* ``density(q_len, kv_len)`` - the fraction of visible (query, key) pairs;
* ``is_full`` / ``causal_align`` - whether it is plain full or plain causal attention (and with
  which alignment), for backends that serve those natively without testing concrete classes.

``a & b`` and ``a | b`` build the composition patterns defined here, beside the base class, so
that the base never imports the constructors of :mod:`headwise.patterns.library`.

``H_p`` is 1 for head-agnostic patterns and the number of heads for :func:`per_head` stacks.
Patterns are immutable and hashable, so derived layouts are cached per (pattern, lengths) and
shared by every equal pattern. A public method hands out a tensor of its own (a copy; a layout is
small), never the cached one, which a caller could change in place for every later call: torch
has no read-only tensors. Kernels read the cached objects through :meth:`Pattern._shared_layout`
and :meth:`Pattern._shared_block_mask`, and never write to them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from headwise._checks import ArgumentTypeError, check_int
from headwise.patterns.ranges import MAX_RANGES, merge_ranges, row_sizes
from headwise.types import Align

EMPTY, PARTIAL, FULL = 0, 1, 2

# Predicates are evaluated over at most this many (head, query, key) elements at a time.
_CHUNK_ELEMENTS = 1 << 22

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Pattern:
    """Base class of all attention patterns. Subclasses implement :meth:`_allowed`.

    Compose with ``a & b`` (both must allow) and ``a | b`` (either allows); stack one pattern per
    head with :func:`headwise.patterns.per_head`.
    """

    #: number of heads the pattern distinguishes; ``None`` = the same for every head
    num_heads: int | None = None

    # ----------------------------------------------------------------- to be implemented
    def _allowed(
        self,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        q_len: int,
        kv_len: int,
    ) -> torch.Tensor:
        """Boolean tensor, broadcast of the index tensors: may ``q_idx`` attend ``kv_idx``."""
        raise NotImplementedError

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` if the pattern was built for other sequence lengths."""

    def query_groups(self, q_len: int, size: int) -> list[slice | torch.Tensor]:
        """Query positions to process together, about ``size`` each, chosen so that their visible
        keys overlap: consecutive rows by default; spatial tiles for neighborhoods."""
        return [slice(s, min(q_len, s + size)) for s in range(0, q_len, size)]

    def key_panels(
        self, q_len: int, kv_len: int, size: int
    ) -> list[tuple[torch.Tensor | None, list[slice | torch.Tensor]]]:
        """The query groups split among panels: each names the key positions a kernel gathers
        once, in an order where every group of the panel sees one contiguous run of them
        (``None``: all keys in their own order, nothing to gather)."""
        return [(None, self.query_groups(q_len, size))]

    def head_patterns(self) -> tuple[Pattern, ...] | None:
        """One head-agnostic pattern per head, or ``None`` if every head follows this one."""
        return None

    def _key_ranges(
        self, q_idx: torch.Tensor, q_len: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The keys each query of ``q_idx`` (1-D) may see as a union of half-open ranges ``[lo,
        hi)``: int64 ``(H_p or 1, len(q_idx), K)`` each, clamped to ``[0, kv_len]`` (``hi <=
        lo``: empty), exactly :meth:`visible`'s keys; ``None`` when the rows are not such unions
        of at most :data:`~.ranges.MAX_RANGES` ranges (plans then evaluate the predicate)."""
        return None

    # ----------------------------------------------------------------- what kernels ask
    # Backends that take only some shapes natively (SDPA: dense or plain causal) ask these
    # instead of testing for concrete classes. Both are structural: they describe how the
    # pattern was built, not what it happens to show at some lengths (``sliding_window(None,
    # None)`` shows every key yet is not ``is_full``), so a dispatch decision never depends on
    # the lengths of the call.
    @property
    def is_full(self) -> bool:
        """Whether this is :func:`headwise.patterns.full`: every query sees every key."""
        return False

    @property
    def causal_align(self) -> Align | None:
        """The ``align`` of a plain :func:`headwise.patterns.causal` pattern (``"bottom_right"``
        or ``"top_left"``); ``None`` for every other pattern, compositions included."""
        return None

    # ----------------------------------------------------------------- composition
    def __and__(self, other: Pattern) -> Pattern:
        return _Intersection(_flatten(_Intersection, (self, other)))

    def __or__(self, other: Pattern) -> Pattern:
        return _Union(_flatten(_Union, (self, other)))

    # ----------------------------------------------------------------- derived views
    def mask_mod(self, q_len: int, kv_len: int) -> MaskMod:
        """The predicate as ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for the given lengths."""
        q_len, kv_len = _lengths(q_len, kv_len)
        self.check_lengths(q_len, kv_len)
        return _mask_mod(self, q_len, kv_len)

    def dense_mask(
        self,
        q_len: int,
        kv_len: int,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Boolean mask of shape ``(H_p, q_len, kv_len)``; ``True`` = may attend."""
        q_len, kv_len = _lengths(q_len, kv_len)
        self.check_lengths(q_len, kv_len)
        return self._rows(0, q_len, q_len, kv_len, torch.device(device or "cpu"))

    def block_layout(
        self,
        q_len: int,
        kv_len: int,
        block_size: int | tuple[int, int] = 128,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Block codes ``(H_p, ceil(Lq/bq), ceil(Lk/bk))``: EMPTY=0, PARTIAL=1, FULL=2 (uint8);
        the caller's own copy."""
        return self._shared_layout(q_len, kv_len, block_size, device=device).clone()

    def block_mask(
        self,
        q_len: int,
        kv_len: int,
        *,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ):
        """A FlexAttention ``BlockMask`` (fully visible blocks skip the predicate); the caller's
        own, built anew from the cached layout."""
        args = _block_args(self, q_len, kv_len, block_size, device)
        return _make_block_mask(self, *args)

    def _shared_layout(
        self,
        q_len: int,
        kv_len: int,
        block_size: int | tuple[int, int] = 128,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """:meth:`block_layout` without the copy: the cached tensor every equal pattern shares.
        For kernels, which only read it."""
        return _block_layout(self, *_block_args(self, q_len, kv_len, block_size, device))

    def _shared_block_mask(
        self,
        q_len: int,
        kv_len: int,
        *,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ):
        """:meth:`block_mask`, cached and shared by every equal pattern (FlexAttention then sees
        the same ``mask_mod`` object and does not recompile). For kernels, which only read it."""
        return _flex_block_mask(self, *_block_args(self, q_len, kv_len, block_size, device))

    def density(self, q_len: int, kv_len: int) -> float:
        """Fraction of (head, query, key) triples that are visible, in ``[0, 1]``."""
        q_len, kv_len = _lengths(q_len, kv_len)
        self.check_lengths(q_len, kv_len)
        return _density(self, q_len, kv_len)

    # ----------------------------------------------------------------- helpers
    def visible(
        self, q_idx: torch.Tensor, kv_idx: torch.Tensor, q_len: int, kv_len: int
    ) -> torch.Tensor:
        """Mask ``(H_p, len(q_idx), len(kv_idx))`` for the given 1-D query and key positions."""
        heads = self.num_heads or 1
        h = torch.arange(heads, device=q_idx.device).view(-1, 1, 1)
        allowed = self._allowed(h, q_idx.view(1, -1, 1), kv_idx.view(1, 1, -1), q_len, kv_len)
        return allowed.expand(heads, len(q_idx), len(kv_idx))

    def _rows(
        self, start: int, stop: int, q_len: int, kv_len: int, device: torch.device
    ) -> torch.Tensor:
        """Dense mask of query rows ``start:stop``, shape ``(H_p, stop - start, kv_len)``."""
        q_idx = torch.arange(start, stop, device=device)
        return self.visible(q_idx, torch.arange(kv_len, device=device), q_len, kv_len)

    def _row_chunks(self, q_len: int, kv_len: int):
        heads = self.num_heads or 1
        step = max(1, _CHUNK_ELEMENTS // max(1, heads * kv_len))
        for start in range(0, q_len, step):
            yield start, min(q_len, start + step)


# --------------------------------------------------------------------------- composition
@dataclass(frozen=True)
class _Intersection(Pattern):
    """``a & b & ...``: a key is visible when every part allows it."""

    parts: tuple[Pattern, ...]

    def __repr__(self) -> str:
        # ``&`` binds tighter than ``|``: only unions inside an intersection need parentheses.
        return " & ".join(f"({p!r})" if isinstance(p, _Union) else repr(p) for p in self.parts)

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return max((p.num_heads or 0 for p in self.parts), default=0) or None

    def check_lengths(self, q_len, kv_len):
        for part in self.parts:
            part.check_lengths(q_len, kv_len)

    @staticmethod
    def _combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a & b

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        allowed = self.parts[0]._allowed(h, q_idx, kv_idx, q_len, kv_len)
        for part in self.parts[1:]:
            allowed = self._combine(allowed, part._allowed(h, q_idx, kv_idx, q_len, kv_len))
        return allowed

    def query_groups(self, q_len, size):
        # A part with its own grouping (a neighborhood) knows best which queries share keys.
        for part in self.parts:
            if type(part).query_groups is not Pattern.query_groups:
                return part.query_groups(q_len, size)
        return super().query_groups(q_len, size)

    def key_panels(self, q_len, kv_len, size):
        for part in self.parts:
            if type(part).key_panels is not Pattern.key_panels:
                return part.key_panels(q_len, kv_len, size)
        return super().key_panels(q_len, kv_len, size)

    def head_patterns(self):
        if self.num_heads is None:
            return None
        per_part = []
        for part in self.parts:
            split = (part,) * self.num_heads if part.num_heads is None else part.head_patterns()
            if split is None:  # a per-head part that cannot be split into single heads
                return None
            per_part.append(split)
        return tuple(type(self)(parts) for parts in zip(*per_part))

    def _key_ranges(self, q_idx, q_len, kv_len):
        ranges = [part._key_ranges(q_idx, q_len, kv_len) for part in self.parts]
        if any(r is None for r in ranges):
            return None
        lo, hi = ranges[0]
        for part_lo, part_hi in ranges[1:]:
            lo, hi = self._combine_ranges(lo, hi, part_lo, part_hi)
            if lo.shape[-1] > MAX_RANGES:
                return None
        return lo, hi

    @staticmethod
    def _combine_ranges(lo, hi, other_lo, other_hi):
        # a key is in both unions iff it is in one range of each: every pair's overlap
        both_lo = torch.maximum(lo[..., :, None], other_lo[..., None, :])
        both_hi = torch.minimum(hi[..., :, None], other_hi[..., None, :])
        return both_lo.flatten(-2), both_hi.flatten(-2)

    def visible(self, q_idx, kv_idx, q_len, kv_len):
        # Combine the parts' own masks so per-head parts keep their fast stacking.
        allowed = self.parts[0].visible(q_idx, kv_idx, q_len, kv_len)
        for part in self.parts[1:]:
            allowed = self._combine(allowed, part.visible(q_idx, kv_idx, q_len, kv_len))
        return allowed.expand(self.num_heads or 1, -1, -1)


@dataclass(frozen=True, repr=False)
class _Union(_Intersection):
    """``a | b | ...``: a key is visible when any part allows it."""

    def __repr__(self) -> str:
        return " | ".join(repr(p) for p in self.parts)

    @staticmethod
    def _combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a | b

    @staticmethod
    def _combine_ranges(lo, hi, other_lo, other_hi):
        heads = max(lo.shape[0], other_lo.shape[0])
        lo, other_lo = lo.expand(heads, -1, -1), other_lo.expand(heads, -1, -1)
        hi, other_hi = hi.expand(heads, -1, -1), other_hi.expand(heads, -1, -1)
        return torch.cat([lo, other_lo], -1), torch.cat([hi, other_hi], -1)

    def key_panels(self, q_len, kv_len, size):
        # A part's panel holds only that part's keys; the union may see others.
        return Pattern.key_panels(self, q_len, kv_len, size)


def _block_args(
    pattern: Pattern,
    q_len: int,
    kv_len: int,
    block_size: int | tuple[int, int],
    device: torch.device | str | None,
) -> tuple[int, int, int, int, str]:
    """The cache key of a block layout or mask: checked lengths and block sizes, the device."""
    q_len, kv_len = _lengths(q_len, kv_len)
    pattern.check_lengths(q_len, kv_len)
    return (q_len, kv_len, *_pair(block_size), str(device or "cpu"))


def _lengths(q_len: int, kv_len: int) -> tuple[int, int]:
    return check_int("q_len", q_len, minimum=0), check_int("kv_len", kv_len, minimum=0)


def _pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block_size, tuple | list) and len(block_size) == 2:
        block_q, block_k = block_size
    elif isinstance(block_size, tuple | list):
        raise ValueError(f"block_size must be one positive integer or a pair; got {block_size!r}")
    else:
        block_q = block_k = block_size
    block_q = check_int("block_size", block_q, minimum=1)
    block_k = check_int("block_size", block_k, minimum=1)
    return block_q, block_k


def _flatten(kind: type, parts: tuple[Pattern, ...]) -> tuple[Pattern, ...]:
    flat: list[Pattern] = []
    for part in parts:
        if not isinstance(part, Pattern):
            raise TypeError(f"can only combine Pattern objects; got {type(part).__name__}")
        flat.extend(part.parts if type(part) is kind else (part,))
    heads = {p.num_heads for p in flat if p.num_heads is not None}
    if len(heads) > 1:
        stacks = ", ".join(f"{p!r} ({p.num_heads} heads)" for p in flat if p.num_heads)
        raise ValueError(f"cannot combine per-head patterns with different head counts: {stacks}")
    return tuple(flat)


@functools.lru_cache(maxsize=256)
def _mask_mod(pattern: Pattern, q_len: int, kv_len: int) -> MaskMod:
    # Cached so that FlexAttention sees the same function object for the same problem and does
    # not recompile.
    def mask_mod(b, h, q_idx, kv_idx):
        return pattern._allowed(h, q_idx, kv_idx, q_len, kv_len)

    return mask_mod


@functools.lru_cache(maxsize=256)
def _block_layout(
    pattern: Pattern, q_len: int, kv_len: int, block_q: int, block_k: int, device: str
) -> torch.Tensor:
    heads = pattern.num_heads or 1
    # A block longer than its sequence holds all of it either way; clamping gives the same codes
    # and keeps a huge block size from sizing the buffers below.
    block_q, block_k = min(block_q, max(q_len, 1)), min(block_k, max(kv_len, 1))
    n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
    ranges = pattern._key_ranges(torch.arange(q_len), q_len, kv_len) if q_len * kv_len else None
    if ranges is not None:
        return _ranged_layout(*ranges, heads, kv_len, block_q, block_k).to(device)
    any_visible = torch.zeros(heads, n_q * block_q, n_k, dtype=torch.bool, device=device)
    all_visible = torch.ones_like(any_visible)
    pad_k = n_k * block_k - kv_len
    # Rows are chunked so each chunk holds whole query blocks.
    step = max(block_q, (_CHUNK_ELEMENTS // max(1, heads * kv_len)) // block_q * block_q)
    for start in range(0, q_len, step):
        stop = min(q_len, start + step)
        rows = pattern._rows(start, stop, q_len, kv_len, torch.device(device))
        blocks_any = torch.nn.functional.pad(rows, (0, pad_k), value=False)
        blocks_all = torch.nn.functional.pad(rows, (0, pad_k), value=True)
        any_visible[:, start:stop] = blocks_any.view(heads, stop - start, n_k, block_k).any(-1)
        all_visible[:, start:stop] = blocks_all.view(heads, stop - start, n_k, block_k).all(-1)
    any_visible = any_visible.view(heads, n_q, block_q, n_k).any(2)
    # Padding rows past q_len count as visible for "all" so a partial last block can be FULL.
    all_visible[:, q_len:] = True
    all_visible = all_visible.view(heads, n_q, block_q, n_k).all(2)
    layout = torch.full((heads, n_q, n_k), EMPTY, dtype=torch.uint8, device=device)
    layout[any_visible] = PARTIAL
    layout[all_visible & any_visible] = FULL
    return layout


def _ranged_layout(
    lo: torch.Tensor, hi: torch.Tensor, heads: int, kv_len: int, block_q: int, block_k: int
) -> torch.Tensor:
    """:func:`_block_layout` from the rows' key ranges, in O(heads x rows x ranges + blocks).

    Per row, each run of its merged ranges touches key blocks ``start // bk ... (stop - 1) //
    bk`` and covers ``ceil(start / bk) ... stop // bk - 1`` (the last, short block too when
    ``stop`` is ``kv_len``); counting, per query block, the rows that touch (cover) each key
    block with +1/-1 at the ends of those spans and a running sum, a block is visible when some
    row touches it and FULL when every row covers it."""
    q_len = lo.shape[1]
    n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
    lo, hi = lo.expand(heads, -1, -1), hi.expand(heads, -1, -1)
    group = torch.arange(heads * q_len).repeat_interleave(lo.shape[-1])
    owner, start, stop = merge_ranges(lo.flatten(), hi.flatten(), group, kv_len + 1)
    cell = owner // q_len * n_q + owner % q_len // block_q  # (head, query block)
    full_stop = torch.where(stop == kv_len, n_k, stop // block_k)
    counts = []
    for first, last in (
        (start // block_k, (stop - 1) // block_k + 1),
        (-(-start // block_k), full_stop),
    ):
        spans = torch.zeros(heads * n_q, n_k + 1, dtype=torch.int32)
        ones = torch.ones(len(first), dtype=torch.int32)
        spans.index_put_((cell, first), ones, accumulate=True)
        spans.index_put_((cell, last.clamp(min=first)), -ones, accumulate=True)
        counts.append(spans.cumsum(1, dtype=torch.int32)[:, :n_k].view(heads, n_q, n_k))
    touched, covered = counts
    rows = torch.full((n_q,), block_q, dtype=torch.int32)
    rows[-1] = q_len - (n_q - 1) * block_q
    layout = torch.full((heads, n_q, n_k), EMPTY, dtype=torch.uint8)
    layout[touched > 0] = PARTIAL
    layout[(covered == rows[:, None]) & (touched > 0)] = FULL
    return layout


@functools.lru_cache(maxsize=256)
def _density(pattern: Pattern, q_len: int, kv_len: int) -> float:
    if q_len == 0 or kv_len == 0:
        return 0.0
    ranges = pattern._key_ranges(torch.arange(q_len), q_len, kv_len)
    if ranges is not None:
        heads = pattern.num_heads or 1
        lo, hi = (r.expand(heads, -1, -1) for r in ranges)
        return int(row_sizes(lo, hi, kv_len + 1).sum()) / (heads * q_len * kv_len)
    visible = 0
    for start, stop in pattern._row_chunks(q_len, kv_len):
        visible += int(pattern._rows(start, stop, q_len, kv_len, torch.device("cpu")).sum())
    return visible / ((pattern.num_heads or 1) * q_len * kv_len)


def _make_block_mask(
    pattern: Pattern, q_len: int, kv_len: int, block_q: int, block_k: int, device: str
):
    from torch.nn.attention.flex_attention import BlockMask

    layout = _block_layout(pattern, q_len, kv_len, block_q, block_k, device)

    def indices_of(code: int) -> tuple[torch.Tensor, torch.Tensor]:
        hit = layout == code
        counts = hit.sum(-1, dtype=torch.int32)
        # Stable sort puts the selected block columns first, in increasing order.
        order = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None], order[None]

    partial_counts, partial_indices = indices_of(PARTIAL)
    full_counts, full_indices = indices_of(FULL)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=(block_q, block_k),
        mask_mod=_mask_mod(pattern, q_len, kv_len),
        seq_lengths=(q_len, kv_len),
    )


_flex_block_mask = functools.lru_cache(maxsize=64)(_make_block_mask)


def check_pattern(pattern: object, heads: int, label: str, name: str = "pattern") -> Pattern:
    """``pattern`` if it is a :class:`Pattern` that fits ``heads`` heads (``label`` names them in
    the message, e.g. ``"num_heads"``); raises ``ArgumentTypeError`` / ``ValueError`` otherwise."""
    if not isinstance(pattern, Pattern):
        raise ArgumentTypeError(f"{name} must be a headwise Pattern; got {type(pattern).__name__}")
    if pattern.num_heads is not None and pattern.num_heads != heads:
        raise ValueError(f"{name} is per-head for {pattern.num_heads} heads; got {label}={heads}")
    return pattern
