"""The pattern constructors.

Positions and alignment
-----------------------
Query ``i`` sits at position ``p(i) = i + offset``. With ``align="bottom_right"`` (the default, as
FlashAttention >= 2.1) ``offset = kv_len - q_len``: the last query lines up with the last key, which
is what a KV-cache decode step needs. With ``align="top_left"`` (PyTorch SDPA's ``is_causal``)
``offset = 0``. Rows whose window is empty produce zero output and LSE = -inf in every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from headwise.patterns.base import Pattern

Align = Literal["bottom_right", "top_left"]
_ALIGNS = ("bottom_right", "top_left")


def _query_positions(q_idx: torch.Tensor, q_len: int, kv_len: int, align: str) -> torch.Tensor:
    return q_idx + (kv_len - q_len) if align == "bottom_right" else q_idx


def _check_align(align: str) -> None:
    if align not in _ALIGNS:
        raise ValueError(f"align must be one of {_ALIGNS}; got {align!r}")


def _check_count(name: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


# --------------------------------------------------------------------------- basic shapes
@dataclass(frozen=True)
class Full(Pattern):
    """Every query sees every key."""

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        return torch.ones_like(q_idx + kv_idx, dtype=torch.bool)


@dataclass(frozen=True)
class Causal(Pattern):
    """Query at position ``p(i)`` sees keys ``j <= p(i)``."""

    align: str = "bottom_right"

    def __post_init__(self):
        _check_align(self.align)

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        return kv_idx <= _query_positions(q_idx, q_len, kv_len, self.align)


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Query at position ``p`` sees keys ``p - left <= j <= p + right`` (``None`` = unbounded)."""

    left: int | None
    right: int | None = 0
    align: str = "bottom_right"

    def __post_init__(self):
        _check_align(self.align)
        for name in ("left", "right"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        pos = _query_positions(q_idx, q_len, kv_len, self.align)
        allowed = torch.ones_like(pos + kv_idx, dtype=torch.bool)
        if self.left is not None:
            allowed = allowed & (kv_idx >= pos - self.left)
        if self.right is not None:
            allowed = allowed & (kv_idx <= pos + self.right)
        return allowed


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
        _check_count("n", self.n)
        _check_align(self.align)

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        allowed = kv_idx < self.n
        if self.causal:
            allowed = allowed & (kv_idx <= _query_positions(q_idx, q_len, kv_len, self.align))
        return allowed


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
        _check_count("stride", self.stride, 1)
        _check_count("block", self.block, 1)
        if not 0 <= self.offset < self.stride:
            raise ValueError(f"offset must be in [0, stride={self.stride}); got {self.offset}")

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        return ((kv_idx // self.block) % self.stride == self.offset) & (q_idx >= 0)


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
        if len(self.q_lengths) != len(self.kv_lengths):
            raise ValueError(
                "q_lengths and kv_lengths must have one entry per document; got "
                f"{len(self.q_lengths)} and {len(self.kv_lengths)}"
            )
        for name in ("q_lengths", "kv_lengths"):
            for n in getattr(self, name):
                _check_count(f"every entry of {name}", n)

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
        for pair in self.pairs:
            for start, stop in pair:
                if not 0 <= start <= stop:
                    raise ValueError(f"segments must satisfy 0 <= start <= stop; got {pair}")

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


# --------------------------------------------------------------------------- block sparse
@dataclass(frozen=True)
class BlockSparse(Pattern):
    """Query block ``r`` sees key block ``c`` iff ``layout[h, r, c]`` (blocks of ``block_size``)."""

    layout_bytes: bytes
    shape: tuple[int, int, int]
    block_size: tuple[int, int]
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return self.shape[0] if self.shape[0] > 1 else None

    def layout(self, device: torch.device) -> torch.Tensor:
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
        layout = self.layout(torch.device("cpu"))
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
        layout = self.layout(q_idx.device)
        head = h if self.shape[0] > 1 else torch.zeros_like(h)
        return layout[head, q_idx // self.block_size[0], kv_idx // self.block_size[1]]


# --------------------------------------------------------------------------- composition
@dataclass(frozen=True)
class _Intersection(Pattern):
    parts: tuple[Pattern, ...]

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

    def visible(self, q_idx, kv_idx, q_len, kv_len):
        # Combine the parts' own masks so per-head parts keep their fast stacking.
        allowed = self.parts[0].visible(q_idx, kv_idx, q_len, kv_len)
        for part in self.parts[1:]:
            allowed = self._combine(allowed, part.visible(q_idx, kv_idx, q_len, kv_len))
        return allowed.expand(self.num_heads or 1, -1, -1)


@dataclass(frozen=True)
class _Union(_Intersection):
    @staticmethod
    def _combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a | b

    def key_panels(self, q_len, kv_len, size):
        # A part's panel holds only that part's keys; the union may see others.
        return Pattern.key_panels(self, q_len, kv_len, size)


@dataclass(frozen=True)
class PerHead(Pattern):
    """Head ``h`` follows ``patterns[h]``."""

    patterns: tuple[Pattern, ...]

    def __post_init__(self):
        if not self.patterns:
            raise ValueError("per_head needs at least one pattern; got an empty list")
        for p in self.patterns:
            if not isinstance(p, Pattern):
                raise TypeError(f"per_head takes Pattern objects; got {type(p).__name__}")
            if p.num_heads is not None:
                raise ValueError("per_head patterns cannot themselves be per-head stacks")

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
    q_lengths = _int_tuple("lengths", lengths)
    kv = q_lengths if kv_lengths is None else _int_tuple("kv_lengths", kv_lengths)
    return Documents(q_lengths, kv, causal)


def modality_mutual(
    segments: Sequence[tuple[tuple[int, int], tuple[int, int]]] | tuple[tuple[int, int], ...],
) -> Pattern:
    """Causal attention where each pair ``((a0, a1), (b0, b1))`` of segments sees each other.

    AKI (Wang et al. 2025): ``modality_mutual([((img_start, img_stop), (img_stop, assistant))])``
    lets the image tokens see the question tokens but not the answer.
    """
    pairs = tuple(segments)
    if len(pairs) == 2 and all(isinstance(s, int) for s in pairs[0]):
        pairs = (pairs,)  # a single pair was given
    normalised = []
    for pair in pairs:
        try:
            (a0, a1), (b0, b1) = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"segments must be pairs of (start, stop) ranges; got {pair!r}"
            ) from None
        normalised.append(((int(a0), int(a1)), (int(b0), int(b1))))
    return ModalityMutual(tuple(normalised))


def block_sparse(layout: torch.Tensor, block_size: int | tuple[int, int] = 128) -> Pattern:
    """Block-level pattern: ``layout[(h,) r, c]`` says whether query block r sees key block c."""
    layout = torch.as_tensor(layout)
    if layout.dim() == 2:
        layout = layout[None]
    if layout.dim() != 3:
        raise ValueError(
            f"layout must be (n_q_blocks, n_kv_blocks) or (H, nq, nk); got {tuple(layout.shape)}"
        )
    block = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block_size must be a positive int or pair; got {block_size!r}")
    flat = layout.to(torch.bool).contiguous().cpu()
    return BlockSparse(flat.numpy().tobytes(), tuple(flat.shape), (int(block[0]), int(block[1])))


def per_head(patterns: Sequence[Pattern]) -> Pattern:
    """Stack one pattern per head: head ``h`` follows ``patterns[h]``."""
    return PerHead(tuple(patterns))


def _int_tuple(name: str, values) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D; got shape {tuple(values.shape)}")
        values = values.tolist()
    return tuple(_check_count(f"every entry of {name}", int(v)) for v in values)
