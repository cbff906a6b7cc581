"""MoA model-level tooling: find a per-head sparse plan for a whole model.

Above :mod:`headwise.layers` (whose :mod:`~headwise.layers.moa` keeps the rule, the pattern, the
plan, the cache and the layer): :func:`profile_influence` records the loss influence of every
attention block on a calibration batch through the layers' hook points, :func:`search_plan`
turns influence profiles into a :class:`~headwise.layers.moa.MoAPlan` under a KV-density budget
(a MILP with MoA's constraints), and :func:`plan_density` / :func:`plan_loss` score a plan.
Hugging Face models are profiled by :func:`headwise.hf.moa_profile`.
"""

from headwise.moa.profile import attention_influence, profile_influence
from headwise.moa.search import candidate_grid, plan_density, plan_loss, search_plan

__all__ = [
    "attention_influence",
    "candidate_grid",
    "plan_density",
    "plan_loss",
    "profile_influence",
    "search_plan",
]
