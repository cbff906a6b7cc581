"""What a public method of patterns/ or ops/ returns is the caller's own: editing it in place
changes neither the next call nor any attention result. Layouts, masks and plans are cached per
(pattern, lengths), and equal patterns share the cache: handing out the cached object itself let
one caller's edit change every later call with an equal pattern (flex was off by 2.7)."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from headwise.ops.attention import attention
from headwise.ops.attention.blockwise.heads import group_heads
from headwise.ops.attention.native import available, tile_plan

L = 256
#: backends that read the cached layouts, plans or BlockMasks
BACKENDS = ["flex", "blockwise"] + (["native"] if available() else [])


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, L, 2, 16, generator=gen) for _ in range(3))


def _results(pattern) -> dict[str, torch.Tensor]:
    q, k, v = _inputs()
    return {b: attention(q, k, v, pattern, backend=b) for b in ["reference", *BACKENDS]}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name))


def _scribble(value) -> None:
    """Overwrite every tensor ``value`` holds (a BlockMask's, a plan's) with junk, and every
    list with nothing."""
    tensors = list(_tensors(value))
    if type(value).__name__ == "BlockMask":  # its tensors are attributes
        tensors = [t for t in vars(value).values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        t.fill_(True if t.dtype == torch.bool else 2)
    if isinstance(value, list):
        value.clear()


def _same(a, b) -> None:
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert a == b


PUBLIC = {
    "block_layout": lambda p: p.block_layout(L, L, 128),
    "block_layout_small_blocks": lambda p: p.block_layout(L, L, 32),
    "block_mask": lambda p: p.block_mask(L, L, block_size=128),
    "dense_mask": lambda p: p.dense_mask(L, L),
    "tile_plan": lambda p: tile_plan(p, L, L) if available() else None,
    "group_heads": lambda p: group_heads(p, L, L, 32),
}
PATTERNS = {
    "window": lambda: P.sliding_window(3),
    "per_head": lambda: P.per_head([P.sliding_window(3), P.block_sparse([[1, 0], [0, 1]], 128)]),
    "block_sparse": lambda: P.block_sparse([[1, 0], [1, 1]], 128),
}


def _snapshot(value):
    """What a layout, BlockMask, plan or head grouping holds, as plain comparable data."""
    if type(value).__name__ == "BlockMask":
        return value.to_dense()
    if isinstance(value, torch.Tensor) or hasattr(value, "__dataclass_fields__"):
        return [t.clone() for t in _tensors(value)]
    return repr(value)


@pytest.mark.parametrize("method", list(PUBLIC))
@pytest.mark.parametrize("make", list(PATTERNS))
def test_editing_what_a_public_method_returns_changes_no_later_call(method, make):
    get = PUBLIC[method]
    before = _results(PATTERNS[make]())
    expected = _snapshot(get(PATTERNS[make]()))
    _scribble(get(PATTERNS[make]()))
    _same(_snapshot(get(PATTERNS[make]())), expected)  # an equal pattern, not the same object
    for backend, out in _results(PATTERNS[make]()).items():
        torch.testing.assert_close(out, before[backend], msg=backend)
    torch.testing.assert_close(before["flex"], before["reference"])


def test_a_block_sparse_layout_is_the_callers_copy():
    pattern = P.block_sparse([[1, 0], [1, 1]], 128)
    before = _results(pattern)
    pattern.layout(torch.device("cpu")).fill_(True)
    assert pattern.layout(torch.device("cpu")).tolist() == [[[True, False], [True, True]]]
    assert pattern == P.block_sparse([[1, 0], [1, 1]], 128)
    for backend, out in _results(pattern).items():
        torch.testing.assert_close(out, before[backend], msg=backend)
