"""The pattern registry of headwise's custom attention operators (``native`` and
``blockwise``): a ``torch.library`` operator takes tensors and scalars only, so a pattern travels
as a string key (:func:`pattern_key`), made outside the traced region, and the operator's
implementation finds the pattern again (:func:`pattern_of`). Equal patterns share one key.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading

import torch

from headwise.patterns import Pattern

#: patterns of eager calls keep their keys while among this many most recently used
RECENT_PATTERNS = 256

_LOCK = threading.Lock()
_patterns: dict[str, Pattern | None] = {}  # key -> pattern
_recent: collections.OrderedDict[Pattern | None, str] = collections.OrderedDict()
_pinned: dict[Pattern | None, str] = {}  # patterns of compiled graphs: kept for good
_serial = itertools.count()


def intern(pattern: Pattern | None, pin: bool) -> str:
    with _LOCK:
        key = _pinned.get(pattern) or _recent.get(pattern)
        if key is None:
            key = f"pattern-{next(_serial)}"
            _patterns[key] = pattern
        if pattern in _pinned:
            return key
        if pin:
            _pinned[pattern] = key
            _recent.pop(pattern, None)
            return key
        _recent[pattern] = key
        _recent.move_to_end(pattern)
        while len(_recent) > RECENT_PATTERNS:
            del _patterns[_recent.popitem(last=False)[1]]
        return key


def _whole(pattern: Pattern | None) -> bool:
    """Whether ``pattern`` holds its fields: a pattern built inside the code dynamo traces
    reaches :func:`_pinned_key` as an empty shell (its fields are pending side effects)."""
    if pattern is None:
        return True
    if dataclasses.is_dataclass(pattern):
        return all(f.name in vars(pattern) for f in dataclasses.fields(pattern))
    return bool(vars(pattern))


@torch.compiler.assume_constant_result
def _pinned_key(pattern: Pattern | None) -> str | None:
    # run by dynamo while tracing, its result a constant of the graph
    return intern(pattern, pin=True) if _whole(pattern) else None


@torch.compiler.disable
def _key_outside(pattern: Pattern | None) -> str:
    # a graph break: dynamo hands over the pattern built while tracing as a real object
    return intern(pattern, pin=True)


def pattern_key(pattern: Pattern | None) -> str:
    """The operators' key for ``pattern`` (equal patterns share one). While ``torch.compile``
    traces, the key is made outside the graph and kept for good (the graph holds it as a
    constant): with no graph break for a pattern built before the traced code runs (a layer's),
    with one for a pattern built inside it. In eager calls the key is kept while among the
    :data:`RECENT_PATTERNS` most recently used (fresh ``documents`` patterns every batch do not
    pile up)."""
    if torch.compiler.is_compiling():
        key = _pinned_key(pattern)
        return _key_outside(pattern) if key is None else key
    return intern(pattern, pin=False)


def pattern_of(key: str) -> Pattern | None:
    try:
        return _patterns[key]
    except KeyError:
        raise RuntimeError(
            f"attention operators: no pattern is registered under {key!r} (keys come from "
            "pattern_key and are dropped once it has served RECENT_PATTERNS newer patterns in "
            "eager calls)"
        ) from None
