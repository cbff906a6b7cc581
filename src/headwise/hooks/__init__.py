"""The hooks floor: named points in headwise's own layers and the engine that reads and steers
attention in attached models. It sits below ``layers`` and above ``ops``; ``hf``, ``distributed``
and future integrations build on it without importing each other.

* :class:`HookPoint` / :func:`hook_points` - identity modules marking activations of headwise's
  own layers (TransformerLens).
* :func:`run_attention` - an attention module's call through the hooks of its :class:`Site`
  (pattern swaps, ``attend`` overrides, scores and probabilities of the requested heads and rows
  recomputed from the LSE, edits, observation); :class:`Hook`, :class:`Call`, :class:`Request`,
  :class:`HeadGate`; :func:`install` names the sites of a model, :func:`hooked` adds a hook for
  a block, :func:`choose_sites` picks sites by layer index or name.
"""

from headwise.hooks.engine import (
    Call,
    HeadGate,
    Hook,
    Layers,
    Request,
    Site,
    add_hook,
    choose_sites,
    hooked,
    install,
    normalize,
    positions,
    remove_hook,
    run_attention,
    site_of,
    sites_of,
)
from headwise.hooks.point import HookPoint, hook_points

__all__ = [
    "Call",
    "HeadGate",
    "Hook",
    "HookPoint",
    "Layers",
    "Request",
    "Site",
    "add_hook",
    "choose_sites",
    "hook_points",
    "hooked",
    "install",
    "normalize",
    "positions",
    "remove_hook",
    "run_attention",
    "site_of",
    "sites_of",
]
