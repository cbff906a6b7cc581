"""The pattern constructors.

Positions and alignment
-----------------------
Query ``i`` sits at position ``p(i) = i + offset``. With ``align="bottom_right"`` (the default, as
FlashAttention >= 2.1) ``offset = kv_len - q_len``: the last query lines up with the last key, which
is what a KV-cache decode step needs. With ``align="top_left"`` (PyTorch SDPA's ``is_causal``)
``offset = 0``. Rows whose window is empty produce zero output and LSE = -inf in every backend.

Integer arguments
-----------------
Every integer argument is a Python ``int`` of any size (bools, floats and strings are refused).
Predicates clamp them before any tensor arithmetic, to bounds past which nothing changes: a
window wider than ``q_len + kv_len`` is unbounded, ``sinks(n)`` with ``n >= kv_len`` shows every
key, a stride or a ``strided`` block longer than the keys acts as ``kv_len``, a ``block_sparse``
block is capped at ``2**62`` (above every index). So a huge value gives the exact mask on every
view instead of overflowing int64.

Printing
--------
A pattern prints as the expression that builds it (``sliding_window(64) | sinks(4)``), so errors
and :func:`headwise.explain` read as the user's own code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from headwise._checks import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_int,
    check_ints,
)
from headwise.patterns.base import Pattern
from headwise.patterns.ranges import MAX_RANGES
from headwise.types import Align

_ALIGNS = ("bottom_right", "top_left")


def query_positions(
    q_idx: torch.Tensor, q_len: int, kv_len: int, align: Align = "bottom_right"
) -> torch.Tensor:
    """Key-axis position ``p(i)`` of query ``i`` under ``align`` (module docstring): ``i + Lk -
    Lq`` bottom-right aligned, ``i`` top-left. For patterns written outside this module."""
    return q_idx + (kv_len - q_len) if align == "bottom_right" else q_idx


def _ranges(kv_len: int, *bounds: tuple[torch.Tensor, torch.Tensor]):
    """``(lo, hi)`` ``(1, n, K)`` from ``K`` pairs of 1-D bounds, clamped to ``[0, kv_len]``
    (the form of :meth:`Pattern._key_ranges`)."""
    lo = torch.stack([b[0] for b in bounds], -1).clamp(0, kv_len)
    hi = torch.stack([b[1] for b in bounds], -1).clamp(0, kv_len)
    return lo[None], hi[None]


def _normalize(obj: Pattern, name: str, value: Any) -> None:
    """Store a checked value on a frozen dataclass (e.g. ``numpy.int64(3)`` becomes ``3``)."""
    object.__setattr__(obj, name, value)


def _args(*positional: Any, **keywords: Any) -> str:
    """``"a, b, key=c"`` for a constructor call; keywords equal to ``None`` are left out."""
    parts = [repr(v) for v in positional]
    parts += [f"{k}={v!r}" for k, v in keywords.items() if v is not None]
    return ", ".join(parts)


def _unless(value: Any, default: Any) -> Any:
    """``value``, or ``None`` (left out of a repr) when it equals the default."""
    return None if value == default else value


# --------------------------------------------------------------------------- basic shapes
@dataclass(frozen=True)
class Full(Pattern):
    """Every query sees every key."""

    def __repr__(self) -> str:
        return "full()"

    @property
    def is_full(self) -> bool:
        return True

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        return torch.ones_like(q_idx + kv_idx, dtype=torch.bool)

    def _key_ranges(self, q_idx, q_len, kv_len):
        return _ranges(kv_len, (torch.zeros_like(q_idx), torch.full_like(q_idx, kv_len)))


@dataclass(frozen=True)
class Causal(Pattern):
    """Query at position ``p(i)`` sees keys ``j <= p(i)``."""

    align: str = "bottom_right"

    def __post_init__(self):
        check_choice("align", self.align, _ALIGNS)

    def __repr__(self) -> str:
        return f"causal({_args(align=_unless(self.align, 'bottom_right'))})"

    @property
    def causal_align(self) -> Align:
        return self.align

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        return kv_idx <= query_positions(q_idx, q_len, kv_len, self.align)

    def _key_ranges(self, q_idx, q_len, kv_len):
        pos = query_positions(q_idx, q_len, kv_len, self.align)
        return _ranges(kv_len, (torch.zeros_like(q_idx), pos + 1))


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Query at position ``p`` sees keys ``p - left <= j <= p + right`` (``None`` = unbounded)."""

    left: int | None
    right: int | None = 0
    align: str = "bottom_right"

    def __post_init__(self):
        for name in ("left", "right"):
            if getattr(self, name) is not None:
                _normalize(self, name, check_int(name, getattr(self, name), minimum=0))
        check_choice("align", self.align, _ALIGNS)

    def __repr__(self) -> str:
        right = () if self.right == 0 else (self.right,)
        align = _unless(self.align, "bottom_right")
        return f"sliding_window({_args(self.left, *right, align=align)})"

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        pos = query_positions(q_idx, q_len, kv_len, self.align)
        # Positions lie in [-q_len, kv_len): a reach of q_len + kv_len already covers every key.
        reach = q_len + kv_len
        allowed = torch.ones_like(pos + kv_idx, dtype=torch.bool)
        if self.left is not None:
            allowed = allowed & (kv_idx >= pos - min(self.left, reach))
        if self.right is not None:
            allowed = allowed & (kv_idx <= pos + min(self.right, reach))
        return allowed

    def _key_ranges(self, q_idx, q_len, kv_len):
        pos = query_positions(q_idx, q_len, kv_len, self.align)
        reach = q_len + kv_len
        left = reach if self.left is None else min(self.left, reach)
        right = reach if self.right is None else min(self.right, reach)
        return _ranges(kv_len, (pos - left, pos + right + 1))


@dataclass(frozen=True)
class Sinks(Pattern):
    """The first ``n`` keys (attention sinks, StreamingLLM) are visible.

    With ``causal=True`` a sink key is visible only to queries at or after it, so
    ``sliding_window(w) | sinks(n)`` stays causal.
    """

    n: int
    causal: bool = True
    align: str = "bottom_right"

    def __post_init__(self):
        _normalize(self, "n", check_int("n", self.n, minimum=0))
        check_bool("causal", self.causal)
        check_choice("align", self.align, _ALIGNS)

    def __repr__(self) -> str:
        causal = _unless(self.causal, True)
        return f"sinks({_args(self.n, causal=causal, align=_unless(self.align, 'bottom_right'))})"

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        allowed = kv_idx < min(self.n, kv_len)
        if self.causal:
            allowed = allowed & (kv_idx <= query_positions(q_idx, q_len, kv_len, self.align))
        return allowed

    def _key_ranges(self, q_idx, q_len, kv_len):
        stop = torch.full_like(q_idx, min(self.n, kv_len))
        if self.causal:
            stop = stop.minimum(query_positions(q_idx, q_len, kv_len, self.align) + 1)
        return _ranges(kv_len, (torch.zeros_like(q_idx), stop))


@dataclass(frozen=True)
class Strided(Pattern):
    """Key ``j`` is visible iff ``(j // block) % stride == offset``.

    ``block=1`` gives every ``stride``-th key; ``block > 1`` gives S2-Attention-style shards of key
    blocks. Combine with :func:`causal` or a window with ``&`` / ``|``.
    """

    stride: int
    offset: int = 0
    block: int = 1

    def __post_init__(self):
        _normalize(self, "stride", check_int("stride", self.stride, minimum=1))
        _normalize(self, "offset", check_int("offset", self.offset))
        _normalize(self, "block", check_int("block", self.block, minimum=1))
        if not 0 <= self.offset < self.stride:
            raise ValueError(f"offset must be in [0, stride={self.stride}); got {self.offset}")

    def __repr__(self) -> str:
        offset = (self.offset,) if self.offset else ()
        return f"strided({_args(self.stride, *offset, block=_unless(self.block, 1))})"

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        # Block indices are below kv_len, so a block or a stride of kv_len or more acts as kv_len;
        # an offset at or past the clamped stride then matches nothing, as before clamping.
        keys = max(kv_len, 1)
        stride = min(self.stride, keys)
        block_idx = kv_idx // min(self.block, keys)
        return (block_idx % stride == min(self.offset, stride)) & (q_idx >= 0)


# --------------------------------------------------------------------------- packed documents
@dataclass(frozen=True)
class Documents(Pattern):
    """Packed sequences: token ``i`` of document ``d`` sees only keys of document ``d``.

    ``q_lengths`` (and ``kv_lengths``, default the same) give each document's length; their sums
    must equal the packed lengths. Documents of length 0 are allowed. With ``causal=True`` the
    causal rule applies inside each document, bottom-right aligned per document.
    """

    q_lengths: tuple[int, ...]
    kv_lengths: tuple[int, ...]
    causal: bool = False
    _tables: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        for name in ("q_lengths", "kv_lengths"):
            _normalize(self, name, check_ints(name, getattr(self, name), minimum=0))
        if len(self.q_lengths) != len(self.kv_lengths):
            raise ValueError(
                "q_lengths and kv_lengths must have one entry per document; got "
                f"{len(self.q_lengths)} and {len(self.kv_lengths)}"
            )
        check_bool("causal", self.causal)

    def __repr__(self) -> str:
        kv = () if self.kv_lengths == self.q_lengths else (list(self.kv_lengths),)
        causal = _unless(self.causal, False)
        return f"documents({_args(list(self.q_lengths), *kv, causal=causal)})"

    def check_lengths(self, q_len, kv_len):
        if sum(self.q_lengths) != q_len or sum(self.kv_lengths) != kv_len:
            raise ValueError(
                f"documents pattern covers {sum(self.q_lengths)} queries and "
                f"{sum(self.kv_lengths)} keys; got q_len={q_len}, kv_len={kv_len}"
            )

    def _table(self, device: torch.device):
        # Per packed token: document id and position relative to the document's end.
        key = str(device)
        if key not in self._tables:

            def ids_and_tail(lengths):
                lens = torch.tensor(lengths, dtype=torch.long, device=device)
                ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
                ends = torch.cumsum(lens, 0)
                return ids, torch.arange(int(lens.sum()), device=device) - ends[ids]

            self._tables[key] = ids_and_tail(self.q_lengths) + ids_and_tail(self.kv_lengths)
        return self._tables[key]

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        q_doc, q_tail, kv_doc, kv_tail = self._table(q_idx.device)
        allowed = q_doc[q_idx] == kv_doc[kv_idx]
        if self.causal:
            allowed = allowed & (kv_tail[kv_idx] <= q_tail[q_idx])
        return allowed

    def _key_ranges(self, q_idx, q_len, kv_len):
        # O(rows log documents): no per-token table. Query i of document d (queries up to
        # q_end[d], keys from kv_start[d] to kv_end[d]) sees keys kv_start[d] <= j < kv_end[d],
        # causally only j - kv_end[d] <= i - q_end[d] (equal distances from the ends).
        device = q_idx.device
        q_end = torch.tensor(self.q_lengths, dtype=torch.long, device=device).cumsum(0)
        kv_end = torch.tensor(self.kv_lengths, dtype=torch.long, device=device).cumsum(0)
        kv_start = kv_end - torch.tensor(self.kv_lengths, dtype=torch.long, device=device)
        doc = torch.searchsorted(q_end, q_idx, right=True)
        stop = kv_end[doc]
        if self.causal:
            stop = stop.minimum(q_idx - q_end[doc] + stop + 1)
        return _ranges(kv_len, (kv_start[doc], stop))


# --------------------------------------------------------------------------- multimodal
@dataclass(frozen=True)
class ModalityMutual(Pattern):
    """AKI modality-mutual attention: causal, plus each ``(a, b)`` pair of segments sees each other.

    Each segment is a half-open range ``(start, stop)`` of token positions (top-left indexing of
    a self-attention sequence). For a pair ``(image, question)`` the image tokens additionally see
    the question tokens that follow them; tokens inside one segment stay causal, as in AKI.
    """

    pairs: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    def __post_init__(self):
        _normalize(self, "pairs", _segment_pairs(self.pairs))

    def __repr__(self) -> str:
        return f"modality_mutual({list(self.pairs)!r})"

    def check_lengths(self, q_len, kv_len):
        if q_len != kv_len:
            raise ValueError(
                f"modality_mutual is a self-attention pattern; got q_len={q_len}, kv_len={kv_len}"
            )
        end = max((stop for pair in self.pairs for _, stop in pair), default=0)
        if end > q_len:
            raise ValueError(f"modality_mutual segments reach position {end}; got q_len={q_len}")

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        allowed = kv_idx <= q_idx
        for (a_start, a_stop), (b_start, b_stop) in self.pairs:
            q_in_a = (q_idx >= a_start) & (q_idx < a_stop)
            q_in_b = (q_idx >= b_start) & (q_idx < b_stop)
            k_in_a = (kv_idx >= a_start) & (kv_idx < a_stop)
            k_in_b = (kv_idx >= b_start) & (kv_idx < b_stop)
            allowed = allowed | (q_in_a & k_in_b) | (q_in_b & k_in_a)
        return allowed

    def _key_ranges(self, q_idx, q_len, kv_len):
        if 1 + 2 * len(self.pairs) > MAX_RANGES:
            return None
        bounds = [(torch.zeros_like(q_idx), q_idx + 1)]
        for (a_start, a_stop), (b_start, b_stop) in self.pairs:
            # a segment's range, for the queries of its partner (an empty range for the others)
            for (start, stop), (p_start, p_stop) in (
                ((b_start, b_stop), (a_start, a_stop)),
                ((a_start, a_stop), (b_start, b_stop)),
            ):
                mine = (q_idx >= p_start) & (q_idx < p_stop)
                bounds.append((torch.full_like(q_idx, start), torch.where(mine, stop, start)))
        return _ranges(kv_len, *bounds)


# --------------------------------------------------------------------------- block sparse
@dataclass(frozen=True)
class BlockSparse(Pattern):
    """Query block ``r`` sees key block ``c`` iff ``layout[h, r, c]`` (blocks of ``block_size``)."""

    layout_bytes: bytes
    shape: tuple[int, int, int]
    block_size: tuple[int, int]
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        _normalize(self, "block_size", _block_pair(self.block_size))

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return self.shape[0] if self.shape[0] > 1 else None

    def __repr__(self) -> str:
        layout = self._layout(torch.device("cpu"))
        if self.shape[0] == 1:
            layout = layout[0]
        if layout.numel() <= _REPR_LAYOUT:
            shown = repr(layout.int().tolist())
        else:
            shown = (
                f"<layout of shape {tuple(layout.shape)}, {int(layout.sum())} of "
                f"{layout.numel()} blocks visible>"
            )
        block = self.block_size[0] if self.block_size[0] == self.block_size[1] else self.block_size
        return f"block_sparse({shown}, {block!r})"

    def layout(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The boolean layout ``(H, nq, nk)`` on ``device``: the caller's own copy."""
        return self._layout(torch.device(device)).clone()

    def _layout(self, device: torch.device) -> torch.Tensor:
        """The layout cached per device, which every use of this pattern reads: never written."""
        key = str(device)
        if key not in self._cache:
            flat = torch.frombuffer(bytearray(self.layout_bytes), dtype=torch.bool)
            self._cache[key] = flat.view(self.shape).to(device)
        return self._cache[key]

    def query_groups(self, q_len, size):
        # Rows of one query block share their key blocks exactly: never split a block.
        rows = max(size, self.block_size[0]) // self.block_size[0] * self.block_size[0]
        return super().query_groups(q_len, rows)

    def head_patterns(self):
        if self.shape[0] == 1:
            return None
        layout = self._layout(torch.device("cpu"))
        return tuple(block_sparse(layout[h], self.block_size) for h in range(self.shape[0]))

    def check_lengths(self, q_len, kv_len):
        n_q = -(-q_len // self.block_size[0])
        n_k = -(-kv_len // self.block_size[1])
        if (n_q, n_k) != self.shape[1:]:
            raise ValueError(
                f"block_sparse layout has {self.shape[1:]} blocks of {self.block_size}; "
                f"lengths q_len={q_len}, kv_len={kv_len} need {(n_q, n_k)}"
            )

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        layout = self._layout(q_idx.device)
        head = h if self.shape[0] > 1 else torch.zeros_like(h)
        # A block past int64 is capped at 2**62, which every index is below as well, so the
        # block index stays 0. (Not capped at the lengths: FlexAttention may evaluate indices
        # past the sequence end, which must keep landing on the layout as they did.)
        block_q, block_k = (min(b, _INDEX_CAP) for b in self.block_size)
        return layout[head, q_idx // block_q, kv_idx // block_k]


@dataclass(frozen=True)
class PerHead(Pattern):
    """Head ``h`` follows ``patterns[h]``."""

    patterns: tuple[Pattern, ...]

    def __post_init__(self):
        if not self.patterns:
            raise ValueError("per_head needs at least one pattern; got an empty list")
        for i, p in enumerate(self.patterns):
            if not isinstance(p, Pattern):
                raise ArgumentTypeError(f"patterns[{i}] must be a Pattern; got {p!r}")
            if p.num_heads is not None:
                raise ValueError(
                    f"patterns[{i}] of per_head cannot itself be a per-head stack; got {p!r}"
                )

    def __repr__(self) -> str:
        return f"per_head({list(self.patterns)!r})"

    @property
    def num_heads(self) -> int:  # type: ignore[override]
        return len(self.patterns)

    def check_lengths(self, q_len, kv_len):
        for p in self.patterns:
            p.check_lengths(q_len, kv_len)

    def head_patterns(self):
        return self.patterns

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        allowed = self.patterns[-1]._allowed(h, q_idx, kv_idx, q_len, kv_len)
        for head in range(len(self.patterns) - 2, -1, -1):
            mine = self.patterns[head]._allowed(h, q_idx, kv_idx, q_len, kv_len)
            allowed = torch.where(h == head, mine, allowed)
        return allowed

    def _key_ranges(self, q_idx, q_len, kv_len):
        ranges = [p._key_ranges(q_idx, q_len, kv_len) for p in self.patterns]
        if any(r is None for r in ranges):
            return None
        # heads with fewer ranges are padded with empty ones
        count = max(lo.shape[-1] for lo, _ in ranges)
        pad = [count - lo.shape[-1] for lo, _ in ranges]
        lo = torch.cat([torch.nn.functional.pad(lo, (0, n)) for (lo, _), n in zip(ranges, pad)])
        hi = torch.cat([torch.nn.functional.pad(hi, (0, n)) for (_, hi), n in zip(ranges, pad)])
        return lo, hi

    def visible(self, q_idx, kv_idx, q_len, kv_len):
        # Stacking per-head masks is cheaper than evaluating every pattern for every head.
        return torch.cat([p.visible(q_idx, kv_idx, q_len, kv_len) for p in self.patterns])


# --------------------------------------------------------------------------- constructors
def full() -> Pattern:
    """Every query attends every key."""
    return Full()


def causal(align: Align = "bottom_right") -> Pattern:
    """Query at position ``p(i)`` attends keys ``j <= p(i)`` (see module doc for ``align``)."""
    return Causal(align)


def sliding_window(
    left: int | None, right: int | None = 0, *, align: Align = "bottom_right"
) -> Pattern:
    """Query at position ``p`` attends keys ``p - left <= j <= p + right``.

    ``sliding_window(w)`` is causal local attention over the ``w`` previous keys plus itself;
    ``sliding_window(w, w)`` is the symmetric (bidirectional) window; ``None`` means unbounded.
    """
    return SlidingWindow(left, right, align)


def sinks(n: int, *, causal: bool = True, align: Align = "bottom_right") -> Pattern:
    """The first ``n`` keys are always visible (only to later queries when ``causal``)."""
    return Sinks(n, causal, align)


def strided(stride: int, offset: int = 0, *, block: int = 1) -> Pattern:
    """Keys ``j`` with ``(j // block) % stride == offset`` are visible."""
    return Strided(stride, offset, block)


def documents(
    lengths: Sequence[int] | torch.Tensor,
    kv_lengths: Sequence[int] | torch.Tensor | None = None,
    *,
    causal: bool = False,
) -> Pattern:
    """Packed documents of the given lengths attend only within themselves."""
    q_lengths = _lengths("lengths", lengths)
    kv = q_lengths if kv_lengths is None else _lengths("kv_lengths", kv_lengths)
    return Documents(q_lengths, kv, causal)


def modality_mutual(
    segments: Sequence[tuple[tuple[int, int], tuple[int, int]]] | tuple[tuple[int, int], ...],
) -> Pattern:
    """Causal attention where each pair ``((a0, a1), (b0, b1))`` of segments sees each other.

    AKI (Wang et al. 2025): ``modality_mutual([((img_start, img_stop), (img_stop, assistant))])``
    lets the image tokens see the question tokens but not the answer.
    """
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Iterable):
        raise ArgumentTypeError(
            f"segments must be a list of ((start, stop), (start, stop)) pairs; got {segments!r}"
        )
    pairs = tuple(segments)
    first = pairs[0] if len(pairs) == 2 else None
    if isinstance(first, Sequence) and not any(isinstance(s, Iterable) for s in first):
        pairs = (pairs,)  # a single pair was given
    return ModalityMutual(pairs)


def block_sparse(layout: torch.Tensor, block_size: int | tuple[int, int] = 128) -> Pattern:
    """Block-level pattern: ``layout[(h,) r, c]`` says whether query block r sees key block c."""
    if not isinstance(layout, torch.Tensor):
        try:
            layout = torch.as_tensor(layout)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentTypeError(
                f"layout must be a tensor (or nested lists) of 0/1 or booleans; got {layout!r}"
            ) from None
    if layout.dim() == 2:
        layout = layout[None]
    if layout.dim() != 3:
        raise ValueError(
            f"layout must be (n_q_blocks, n_kv_blocks) or (H, nq, nk); got {tuple(layout.shape)}"
        )
    if layout.dtype != torch.bool:
        # Truthiness would turn 0.5 or 2 into True; only exact 0/1 mean "hidden"/"visible".
        odd = layout[(layout != 0) & (layout != 1)]
        if odd.numel():
            raise ValueError(f"layout must hold only 0/1 or booleans; got {odd[0].item()!r}")
    block = _block_pair(block_size)
    flat = layout.to(torch.bool).contiguous().cpu()
    return BlockSparse(flat.numpy().tobytes(), tuple(flat.shape), block)


def per_head(patterns: Sequence[Pattern]) -> Pattern:
    """Stack one pattern per head: head ``h`` follows ``patterns[h]``."""
    if isinstance(patterns, Pattern) or not isinstance(patterns, Iterable):
        raise ArgumentTypeError(
            f"patterns must be a sequence of Pattern objects, one per head; got {patterns!r}"
        )
    return PerHead(tuple(patterns))


# Block-sparse layouts with at most this many blocks print as nested lists.
_REPR_LAYOUT = 64
# Larger than any token index, small enough for int64 tensor arithmetic.
_INDEX_CAP = 2**62


def _lengths(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor) and values.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(values.shape)}")
    return check_ints(name, values, minimum=0)


def _block_pair(block_size: Any) -> tuple[int, int]:
    """``block_size`` as ``(block_q, block_k)``: one positive integer or a pair of them."""
    if isinstance(block_size, (str, bytes)) or not isinstance(block_size, Iterable):
        value = check_int("block_size", block_size, minimum=1)
        return value, value
    pair = tuple(block_size)
    if len(pair) != 2:
        raise ValueError(f"block_size must be one positive integer or a pair; got {block_size!r}")
    return (
        check_int("block_size[0]", pair[0], minimum=1),
        check_int("block_size[1]", pair[1], minimum=1),
    )


def _segment_pairs(pairs: Any) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """Checked ``((a0, a1), (b0, b1))`` pairs of half-open ranges with ``0 <= start <= stop``."""
    checked = []
    for i, pair in enumerate(pairs):
        try:
            (a0, a1), (b0, b1) = pair
        except (TypeError, ValueError):
            raise ArgumentTypeError(
                f"segments must be pairs of (start, stop) ranges; got segments[{i}] = {pair!r}"
            ) from None
        segments = []
        for j, (start, stop) in enumerate(((a0, a1), (b0, b1))):
            start = check_int(f"segments[{i}][{j}] start", start, minimum=0)
            stop = check_int(f"segments[{i}][{j}] stop", stop, minimum=0)
            if start > stop:
                raise ValueError(
                    f"segments must satisfy 0 <= start <= stop; got segments[{i}] = {pair!r}"
                )
            segments.append((start, stop))
        checked.append(tuple(segments))
    return tuple(checked)
