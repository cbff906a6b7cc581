"""Neighborhood attention on ``(B, *spatial, H, D)`` tensors, with an optional learnable relative
positional bias (NAT/DiNAT's ``rpb``, which NATTEN >= 0.20 removed).

    o_i = sum_{j in N(i)} softmax_j(scale q_i . k_j + rpb[h, (j - i) / d + k - 1]) v_j

``N(i)`` is :func:`headwise.patterns.neighborhood`'s window (NATTEN's border rule, dilation groups,
per-axis causal and stride); the offset ``(j - i) / d`` is taken per axis in dilation-group units,
so the table has ``2k - 1`` entries per axis. The work runs through :func:`headwise.attention`
with the pattern, and the bias as a ``score_mod`` that reads the table
(:func:`headwise.ops.attention.mods.relative_position_bias`), so no L x L bias is built and the
table's gradient is computed block by block. Under ``torch.compile`` the pattern is built
outside the graph (:func:`_shared_pattern`), so the traced code only reads it.
"""

from __future__ import annotations

import torch

from headwise._deprecated import moved
from headwise.ops.attention import mods
from headwise.ops.attention.api import attention
from headwise.patterns import Pattern
from headwise.patterns.neighborhood import neighborhood
from headwise.types import Backend

#: neighborhood patterns by their arguments (the newest kept): one object per distinct call
SHARED_PATTERNS = 256
_patterns: dict[tuple, Pattern] = {}


@torch.compiler.assume_constant_result
def _build(args: tuple) -> tuple:
    # run by dynamo while tracing (its result a constant): the pattern is built outside the graph
    if args not in _patterns:
        _patterns[args] = neighborhood(*args[:4], stride=args[4])
        while len(_patterns) > SHARED_PATTERNS:
            del _patterns[next(iter(_patterns))]
    return args


def _shared_pattern(*args) -> Pattern:
    """``neighborhood(grid, kernel_size, dilation, causal, stride=stride)``, one shared object
    per distinct arguments, read from a table that :func:`_build` fills (a compiled graph reads
    it with a guard on the entry: a dropped entry means a recompilation, never a stale
    pattern)."""
    return _patterns[_build(tuple(tuple(a) if isinstance(a, list) else a for a in args))]


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, ...],
    *,
    dilation: int | tuple[int, ...] = 1,
    stride: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Neighborhood attention; ``q``, ``k``, ``v`` are ``(B, *spatial, H, D)`` with 1-3 spatial
    axes (``k``/``v`` may have fewer heads, GQA). ``rpb`` is ``(H, 2k_1 - 1, ...)``.
    ``dropout_p``/``dropout_seed``: attention dropout as in :func:`headwise.attention` (the
    keep mask of the flattened call).

    Returns ``(B, *spatial, H, Dv)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (4, 5, 6):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be (B, *spatial, H, D) with 1-3 spatial axes; got {shape}"
            )
    spatial = tuple(q.shape[1:-2])
    if tuple(k.shape[1:-2]) != spatial or tuple(v.shape[1:-2]) != spatial:
        raise ValueError(
            f"q, k, v must share the spatial grid; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    pattern = _shared_pattern(spatial, kernel_size, dilation, causal, stride)
    score_mod = None
    if rpb is not None:
        score_mod = mods.relative_position_bias(pattern, rpb)
        if rpb.shape[0] != q.shape[-2]:
            raise ValueError(
                f"rpb must have one table per head ({q.shape[-2]}); got {tuple(rpb.shape)}"
            )

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1, *t.shape[-2:])

    out = attention(
        flat(q),
        flat(k),
        flat(v),
        pattern,
        scale=scale,
        score_mod=score_mod,
        backend=backend,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )
    return out.reshape(*q.shape[:-1], v.shape[-1])


__getattr__ = moved(__name__, {"relative_position_bias": "headwise.ops.attention.mods"})
