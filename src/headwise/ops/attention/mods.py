"""Score mods: how scores change before the softmax (FlexAttention's ``score_mod``, one place).

A score mod is ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on whole blocks of scores and
broadcasting index tensors (:data:`headwise.types.ScoreMod`); every backend that takes one calls
it the same way. This module holds the ones headwise itself uses:

* :func:`softcap` - ``cap * tanh(s / cap)`` (Gemma 2's logit softcapping);
* :func:`alibi_slopes` - ALiBi's per-head slopes ``2^(-8h/H)`` (Press et al., 2022), also the
  rates of TransNormerLLM's decay (:func:`headwise.ops.linear.tnl_decay`);
* :func:`relative_position_bias` - a neighborhood's learnable relative-position table (NAT/DiNAT's
  ``rpb``), carrying the table as a :class:`RelativePositionTable` so that a kernel (the
  ``native`` backend) can add it without calling the function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from headwise._checks import ArgumentTypeError, check_int, check_real
from headwise.patterns import Pattern
from headwise.patterns.neighborhood import Neighborhood
from headwise.types import ScoreMod


def softcap(cap: float) -> ScoreMod:
    """A ``score_mod`` giving ``cap * tanh(score / cap)``: scores squashed into ``(-cap, cap)``."""
    cap = check_real("cap", cap, positive=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


def alibi_slopes(num_heads: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi slopes ``s_h = 2^(-8h/H)``, ``h = 1..H`` (Press et al., 2022), ``(H,)`` of ``dtype``.

    For ``H`` not a power of two, the ALiBi fallback: the slopes of the closest smaller power of
    two ``n``, then every other slope of ``2n`` heads.
    """
    num_heads = check_int("num_heads", num_heads, minimum=1)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(n) + power_of_two(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=dtype)


@dataclass(frozen=True, eq=False)
class RelativePositionTable:
    """What a relative-position-bias ``score_mod`` adds (``score_mod.relative_position``), in a
    form a kernel can take without calling it: ``table`` ``(H, 2k_1 - 1, ...)`` read at
    ``pattern.relative_index(q_idx, kv_idx)`` (:func:`relative_position_bias`; the ``native``
    backend uses it)."""

    pattern: Pattern
    table: torch.Tensor


def relative_position_of(
    score_mod: ScoreMod | None, pattern: Pattern | None
) -> RelativePositionTable | None:
    """The :class:`RelativePositionTable` ``score_mod`` carries for ``pattern``, else ``None``."""
    relative = getattr(score_mod, "relative_position", None)
    # `is` first: under torch.compile the same pattern object is not compared field by field
    if isinstance(relative, RelativePositionTable) and (
        relative.pattern is pattern or relative.pattern == pattern
    ):
        return relative
    return None


def relative_position_bias(pattern: Neighborhood, table: torch.Tensor) -> ScoreMod:
    """A ``score_mod`` adding ``table[h, (j - i)/d + k - 1 per axis]`` to the scores; it carries
    the table as ``score_mod.relative_position`` (:class:`RelativePositionTable`)."""
    if not isinstance(table, torch.Tensor) or not table.is_floating_point():
        got = table.dtype if isinstance(table, torch.Tensor) else type(table).__name__
        raise ArgumentTypeError(f"rpb must be a floating-point tensor; got {got}")
    expected = tuple(2 * k - 1 for k in pattern.kernel_size)
    if table.dim() != 1 + len(expected) or tuple(table.shape[1:]) != expected:
        raise ValueError(
            f"rpb must be (heads, {', '.join(map(str, expected))}) for kernel_size "
            f"{pattern.kernel_size}; got {tuple(table.shape)}"
        )
    if any(s > 1 for s in pattern.stride):
        raise ValueError(f"rpb is defined for stride 1 only; got stride={pattern.stride}")

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table.flatten(1)[h, pattern.relative_index(q_idx, kv_idx)].to(score.dtype)

    score_mod.relative_position = RelativePositionTable(pattern, table)
    return score_mod


__all__ = [
    "RelativePositionTable",
    "alibi_slopes",
    "relative_position_bias",
    "relative_position_of",
    "softcap",
]
