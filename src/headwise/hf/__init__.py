"""Heads as first-class objects in Hugging Face transformers models.

``attach(model)`` runs every attention module of a transformers (>= 5.0) model through
:func:`headwise.attention` (registering the ``"headwise"`` attention and mask functions) and the
hook engine of :mod:`headwise.hooks`; ``capture`` records chosen heads and rows. One module per
method: pattern-shape scores (:mod:`~headwise.hf.scores`: entropy, distances), head importance,
gates and pruning (Michel et al.: :mod:`~headwise.hf.importance`, :mod:`~headwise.hf.ablation`,
:mod:`~headwise.hf.pruning`), VAR sinks and redistribution (:mod:`~headwise.hf.sinks`,
:mod:`~headwise.hf.var`), VHD/VHR (:mod:`~headwise.hf.vhr`), PAINT (:mod:`~headwise.hf.paint`),
rollout/flow (:mod:`~headwise.hf.rollout`), VL-SAM (:mod:`~headwise.hf.vlsam`), pattern swaps
(:mod:`~headwise.hf.swap`), MoA plans for a model (:mod:`~headwise.hf.moa`) and a KV cache that
follows a pattern in ``generate`` (:class:`~headwise.hf.cache.PatternCache`, imported on first
use). Requires the optional ``transformers`` dependency (``pip install headwise[hf]``); the
report needs ``matplotlib``.
"""

from headwise._deprecated import moved
from headwise.hf.ablation import ablate_heads, gate_heads
from headwise.hf.capture import ActivationCache, capture
from headwise.hf.importance import head_importance_ablation, head_importance_gradient
from headwise.hf.moa import moa_calibration, moa_plan, moa_profile
from headwise.hf.paint import emphasize_tokens
from headwise.hf.pruning import Pruning, prune_heads
from headwise.hf.registry import NAME, attach, register, select_sites
from headwise.hf.rollout import attention_flow, attention_rollout
from headwise.hf.scores import attention_entropy, distance_profile, mean_attention_distance
from headwise.hf.sinks import SinkTokens, find_sinks, massive_dimensions, sink_share, sink_values
from headwise.hf.swap import Drift, pattern_drift, swap_pattern
from headwise.hf.var import redistribute, visual_attention_redistribution
from headwise.hf.vhr import (
    VHRReinforcement,
    VHRResult,
    reinforce_heads,
    vhr_generate,
    vhr_inputs,
    vhr_select,
    vision_head_divergence,
    vision_head_reinforcement,
)
from headwise.hf.vlsam import vlsam_head_weights, vlsam_map
from headwise.hooks import Hook, Site

__all__ = [
    "NAME",
    "ActivationCache",
    "Drift",
    "Hook",
    "PatternCache",
    "Pruning",
    "SinkTokens",
    "Site",
    "VHRReinforcement",
    "VHRResult",
    "ablate_heads",
    "attach",
    "attention_entropy",
    "attention_flow",
    "attention_rollout",
    "capture",
    "distance_profile",
    "emphasize_tokens",
    "find_sinks",
    "gate_heads",
    "head_importance_ablation",
    "head_importance_gradient",
    "massive_dimensions",
    "mean_attention_distance",
    "moa_calibration",
    "moa_plan",
    "moa_profile",
    "pattern_drift",
    "prune_heads",
    "redistribute",
    "register",
    "reinforce_heads",
    "select_sites",
    "sink_share",
    "sink_values",
    "swap_pattern",
    "vhr_generate",
    "vhr_inputs",
    "vhr_select",
    "vision_head_divergence",
    "vision_head_reinforcement",
    "visual_attention_redistribution",
    "vlsam_head_weights",
    "vlsam_map",
]


_moved = moved(
    __name__,
    {"Sinks": "headwise.hf.sinks:SinkTokens"},
    " (the result of find_sinks; headwise.patterns.Sinks is the attention pattern)",
)


def __getattr__(name: str) -> object:
    # PatternCache subclasses transformers' Cache: imported on first use, so that headwise.hf
    # itself imports without transformers
    if name == "PatternCache":
        from headwise.hf.cache import PatternCache

        return PatternCache
    return _moved(name)
