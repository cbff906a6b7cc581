"""Linear attention: one entry point, a reference next to every fast path.

Layout (library-wide): ``q, k: (B, L, H, D)``, ``v: (B, L, H, E)``; packed variable-length inputs
are ``(T, H, D)`` / ``(T, H, E)`` with ``cu_seqlens``. The recurrent state is ``(B, H, D', E)``
(``D'`` = feature dimension after the feature map; ``E + 1`` columns with ``normalize=True``, the
last column holding the key sum ``z``), one per sequence for packed inputs.

Files: ``naive.py`` (quadratic and recurrent references), ``chunk.py`` (Lightning Attention-2 in
PyTorch plus the shared autograd rule), ``triton_chunk.py`` (the same algorithm as a Triton
kernel), ``parallel.py`` (the quadratic form for short sequences, with its own backward),
``feature_maps.py``, ``api.py`` (the entry points: checks, dispatch, varlen).
"""

from headwise.ops.attention.mods import alibi_slopes
from headwise.ops.linear.api import (
    BACKENDS,
    linear_attention,
    linear_attention_step,
    tnl_decay,
)
from headwise.ops.linear.feature_maps import FeatureMap, InLineFeatureMap, get_feature_map, taylor

__all__ = [
    "BACKENDS",
    "FeatureMap",
    "InLineFeatureMap",
    "alibi_slopes",
    "get_feature_map",
    "linear_attention",
    "linear_attention_step",
    "taylor",
    "tnl_decay",
]
