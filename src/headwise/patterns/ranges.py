"""Key ranges: a pattern's rows as unions of half-open key ranges, and the arithmetic on them.

Most patterns show each query a few runs of consecutive keys: causal attention ``[0, p + 1)``, a
sliding window ``[p - left, p + right + 1)``, a packed document its own keys (Zeng et al. 2022,
"Boosting Distributed Training Performance of the Unpadded BERT Model"), sinks beside a window two
runs. Plans and block layouts built from these ranges cost O(rows x ranges) instead of
evaluating the predicate on every (query, key) pair (O(Lq x Lk)). :meth:`Pattern._key_ranges`
gives them; :func:`merge_ranges` unites ranges group by group (a row's own, or every row's of a
tile) into sorted disjoint runs, which :func:`row_sizes` counts.
"""

from __future__ import annotations

import torch

#: a pattern whose rows would need more ranges than this (intersections multiply them) is
#: evaluated through its predicate instead
MAX_RANGES = 16


def merge_ranges(
    lo: torch.Tensor, hi: torch.Tensor, group: torch.Tensor, span: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The union, per group, of ranges ``[lo, hi)`` (1-D int64, ``0 <= lo, hi <= span - 1``;
    ``hi <= lo``: empty): ``(group, start, stop)`` of its disjoint runs, sorted by group, then
    start. Touching ranges (``[a, b)``, ``[b, c)``) form one run, as consecutive keys do.

    Ranges are sorted on ``group * span + lo``; a running maximum of ``group * span + hi`` then
    tells where a run ends (a range starting past it opens a new run), and never carries over
    from one group to the next because ``hi < span``."""
    keep = hi > lo
    lo, hi, group = lo[keep], hi[keep], group[keep]
    base = group * span
    starts, order = torch.sort(base + lo)
    reach = torch.cummax((base + hi)[order], 0).values
    opens = torch.ones(len(starts), dtype=torch.bool)
    opens[1:] = starts[1:] > reach[:-1]
    closes = torch.ones_like(opens)
    closes[:-1] = opens[1:]
    owner = group[order][opens]
    return owner, starts[opens] - owner * span, reach[closes] - owner * span


def row_sizes(lo: torch.Tensor, hi: torch.Tensor, span: int) -> torch.Tensor:
    """How many keys each row sees: ``lo``, ``hi`` ``(H, n, K)`` ranges (``[lo, hi)``, maybe
    overlapping) clamped to ``[0, span)``; returns ``(H, n)`` int64."""
    heads, n, ranges = lo.shape
    if ranges == 1:
        return (hi - lo).clamp(min=0)[..., 0]
    group = torch.arange(heads * n).repeat_interleave(ranges)
    owner, start, stop = merge_ranges(lo.flatten(), hi.flatten(), group, span)
    sizes = torch.zeros(heads * n, dtype=torch.long).index_add_(0, owner, stop - start)
    return sizes.view(heads, n)
