"""MoA model-level tooling: find a per-head sparse plan for a whole model.

Above :mod:`headwise.layers` (whose :mod:`~headwise.layers.moa` keeps the rule, the pattern, the
plan, the cache and the layer): :func:`profile_influence` records the loss influence of every
attention block on a calibration batch through the layers' hook points, and
:func:`search_plan` turns it into a :class:`~headwise.layers.moa.MoAPlan` under a budget.
"""

from headwise.moa.profile import attention_influence, profile_influence
from headwise.moa.search import candidate_grid, search_plan

__all__ = ["attention_influence", "candidate_grid", "profile_influence", "search_plan"]
