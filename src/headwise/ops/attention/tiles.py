"""Deprecated: the native kernel moved to :mod:`headwise.ops.attention.native`."""

from __future__ import annotations

from headwise._deprecated import moved

#: old name -> the module of :mod:`headwise.ops.attention.native` that owns it now
_MOVED = {
    "available": "build",
    "lanes": "build",
    "TilePlan": "plan",
    "tile_plan": "plan",
    "HeadGroups": "call",
    "LONG_TILE_KEYS": "call",
    "supports": "call",
    "tiles_backward": "call",
    "tiles_forward": "call",
}


__getattr__ = moved(
    __name__, {name: f"headwise.ops.attention.native.{home}" for name, home in _MOVED.items()}
)
