"""Deprecated: the interventions live one file per paper method, and ``headwise.hf`` exports them.

Gates and ablation: :mod:`headwise.hf.ablation`; pruning: :mod:`headwise.hf.pruning`; VHR:
:mod:`headwise.hf.vhr`; VAR: :mod:`headwise.hf.var`; PAINT: :mod:`headwise.hf.paint`; pattern
swaps: :mod:`headwise.hf.swap`. Importing a name from here still works, with a
``DeprecationWarning`` naming its new module.
"""

from __future__ import annotations

from headwise._deprecated import moved

#: every public name of the former module: its module under ``headwise.hf``
_MOVED = {
    "gate_heads": "ablation",
    "ablate_heads": "ablation",
    "Pruning": "pruning",
    "prune_heads": "pruning",
    "vhr_select": "vhr",
    "reinforce_heads": "vhr",
    "VHRReinforcement": "vhr",
    "vision_head_reinforcement": "vhr",
    "vhr_inputs": "vhr",
    "VHRResult": "vhr",
    "vhr_generate": "vhr",
    "redistribute": "var",
    "visual_attention_redistribution": "var",
    "emphasize_tokens": "paint",
    "SwapPattern": "swap",
    "swap_pattern": "swap",
    "Drift": "swap",
    "pattern_drift": "swap",
}


__getattr__ = moved(__name__, {name: f"headwise.hf.{home}" for name, home in _MOVED.items()})
