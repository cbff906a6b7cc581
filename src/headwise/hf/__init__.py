"""Heads as first-class objects in Hugging Face transformers models.

``attach(model)`` runs every attention module of a transformers (>= 5.0) model through
:func:`headwise.attention` (registering the ``"headwise"`` attention and mask functions);
``capture`` records chosen heads and rows; :mod:`headwise.hf.scores` scores heads and
:mod:`headwise.hf.interventions` steers them. Requires the optional ``transformers`` dependency
(``pip install headwise[hf]``); the report needs ``matplotlib``.
"""

from headwise.hf.capture import ActivationCache, capture
from headwise.hf.interventions import (
    Drift,
    Pruning,
    VHRReinforcement,
    VHRResult,
    ablate_heads,
    emphasize_tokens,
    gate_heads,
    pattern_drift,
    prune_heads,
    redistribute,
    reinforce_heads,
    swap_pattern,
    vhr_generate,
    vhr_inputs,
    vhr_select,
    vision_head_reinforcement,
    visual_attention_redistribution,
)
from headwise.hf.registry import NAME, Hook, Site, attach, register, select_sites
from headwise.hf.scores import (
    Sinks,
    attention_entropy,
    attention_flow,
    attention_rollout,
    distance_profile,
    find_sinks,
    head_importance_ablation,
    head_importance_gradient,
    massive_dimensions,
    mean_attention_distance,
    sink_share,
    sink_values,
    vision_head_divergence,
    vlsam_head_weights,
    vlsam_map,
)

__all__ = [
    "NAME",
    "ActivationCache",
    "Drift",
    "Hook",
    "Pruning",
    "Sinks",
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
