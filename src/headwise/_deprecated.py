"""Old names that moved: one module ``__getattr__`` factory for every deprecation shim.

A module whose public names moved keeps serving them, with a ``DeprecationWarning`` naming the new
place: ``__getattr__ = moved(__name__, {"old": "new.module:new_name", ...})`` (``:new_name`` may be
left out when the name is unchanged). The new module is imported only when an old name is used,
so a shim adds no dependency between floors.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping


def moved(module: str, names: Mapping[str, str], note: str = "") -> Callable[[str], object]:
    """The ``__getattr__`` of ``module`` serving ``names`` (old name -> ``"place[:new]"``)."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        place, _, new = names[name].partition(":")
        new = new or name
        warnings.warn(
            f"{module}.{name} is deprecated; use {place}.{new}{note}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(place), new)

    return __getattr__
