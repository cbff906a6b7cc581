"""Heads as first-class objects in Hugging Face transformers models.

``attach(model)`` runs every attention module of a transformers (>= 5.0) model through
:func:`headwise.attention` (registering the ``"headwise"`` attention and mask functions);
``capture`` records chosen heads and rows. Requires the optional ``transformers`` dependency
(``pip install headwise[hf]``); plots need ``matplotlib``.
"""

from headwise.hf.capture import ActivationCache, capture
from headwise.hf.registry import NAME, Hook, Site, attach, register, select_sites

__all__ = [
    "NAME",
    "ActivationCache",
    "Hook",
    "Site",
    "attach",
    "capture",
    "register",
    "select_sites",
]
