"""Softmax attention: one entry point over every pattern, with an explaining dispatcher.

Layout: ``q`` ``(B, Lq, H, D)``, ``k`` ``(B, Lk, H_kv, D)``, ``v`` ``(B, Lk, H_kv, Dv)`` with
``H % H_kv == 0`` (query head ``h`` uses key/value head ``h // (H / H_kv)``); packed varlen
tensors are ``(T, H, D)``. Output ``(B, Lq, H, Dv)``; LSE ``(B, H, Lq)`` in float32.

    S = score_mod(scale * Q K^T) + bias,  hidden by the pattern where it says no,
    O = softmax(S) V,  lse = logsumexp(S)

Rows with no visible key give O = 0 and lse = -inf.

Files: ``reference.py`` (the oracle), ``problem.py`` (validation), ``dispatch.py`` and
``backends.py`` (which backend serves a call), ``blockwise/`` and ``native/`` (headwise's own
kernels), ``mods.py`` (score mods: softcap, ALiBi slopes, relative-position bias), ``merge.py``
(the LSE merge of partial results), ``varlen.py``, ``gather.py``, ``neighborhood.py``, ``api.py``.
"""

from headwise.ops.attention.api import Backend, attention, attention_varlen, explain
from headwise.ops.attention.backends import BACKENDS, REFERENCE_AUTO_LIMIT
from headwise.ops.attention.dispatch import Explanation
from headwise.ops.attention.gather import gathered_attention
from headwise.ops.attention.merge import merge_partials
from headwise.ops.attention.neighborhood import neighborhood_attention
from headwise.ops.attention.varlen import Packed, pack, unpack

__all__ = [
    "BACKENDS",
    "REFERENCE_AUTO_LIMIT",
    "Backend",
    "Explanation",
    "Packed",
    "attention",
    "attention_varlen",
    "explain",
    "gathered_attention",
    "merge_partials",
    "neighborhood_attention",
    "pack",
    "unpack",
]
