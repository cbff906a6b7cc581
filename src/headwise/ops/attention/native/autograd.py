"""The native backend's autograd: :func:`native_attention` and its Function.

Both passes run on the C tile kernel (:mod:`.call`), every head group in one call; heads are
grouped by pattern as on the blockwise path (:func:`headwise.ops.attention.blockwise.heads.
head_passes`). The one ``score_mod`` it takes is a neighborhood's relative-position table
(:func:`headwise.ops.attention.mods.relative_position_bias`), whose gradient the kernel computes.
The backward pass is hand-written and not differentiable: ``create_graph=True`` raises
:class:`headwise._checks.Unsupported`. bfloat16 and float16 inputs are read by the kernel as they
are (gradients accumulate in float32 and are rounded once); attention dropout regenerates its mask
in the backward pass from the seed (:mod:`headwise.ops.attention.dropout`).
"""

from __future__ import annotations

import torch

from headwise.ops.attention.blockwise.function import captured_leaves
from headwise.ops.attention.blockwise.heads import head_passes
from headwise.ops.attention.blockwise.plan import DEFAULT_BLOCK
from headwise.ops.attention.dropout import check_dropout, draw_seed
from headwise.ops.attention.mods import relative_position_of
from headwise.ops.attention.native.build import available
from headwise.ops.attention.native.call import supports, tiles_backward, tiles_forward
from headwise.ops.attention.problem import refuse_double_backward
from headwise.patterns import Pattern, full
from headwise.types import ScoreMod


class NativeFunction(torch.autograd.Function):
    """``head_groups``: ``((pattern, heads), ...)``; ``heads`` ``None`` means every head."""

    @staticmethod
    def forward(ctx, q, k, v, bias, head_groups, scale, score_mod, dropout, *captured):
        relative = relative_position_of(score_mod, head_groups[0][0])
        groups = [(pattern or full(), heads) for pattern, heads in head_groups]
        out, lse = tiles_forward(
            q, k, v, groups, scale, relative=relative, bias=bias, dropout=dropout
        )
        ctx.save_for_backward(q, k, v, bias, out, lse, *captured)
        ctx.params = (groups, scale, relative, dropout)
        # which captured tensor (if any) is the relative-position table
        ctx.table_at = [relative is not None and c is relative.table for c in captured]
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        refuse_double_backward("the 'native' backend")
        q, k, v, bias, out, lse, *captured = ctx.saved_tensors
        bias = bias.detach() if bias is not None else None
        groups, scale, relative, dropout = ctx.params
        # in the inputs' dtype: the kernel sums dK, dV in float32 and rounds once
        grads = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if grad_lse is not None and not grad_lse.any():
            grad_lse = None
        d_table = tiles_backward(
            grad_out, grad_lse, q, k, v, out, lse, groups, scale, grads, relative, bias, dropout
        )
        d_captured = [d_table.to(c.dtype) if at else None for c, at in zip(captured, ctx.table_at)]
        return *grads, None, None, None, None, None, *d_captured


def native_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out (B, Lq, H, Dv), lse (B, H, Lq))`` of CPU ``(B, L, H, D)`` inputs of one
    dtype (float32, bfloat16 or float16; ``out`` in it, ``lse`` float32) on headwise's C tile
    kernel: a bias without gradient; no ``score_mod`` but a relative-position table of the
    pattern. ``dropout_p``: attention dropout on the normalized probabilities with the keep mask
    :func:`~headwise.ops.attention.dropout.keep_mask` of ``seed`` (``None``: drawn from torch's
    default generator by :func:`~headwise.ops.attention.dropout.draw_seed`, so
    ``torch.manual_seed`` fixes it); 0 is exactly no dropout."""
    plain_mod = score_mod is None or relative_position_of(score_mod, pattern) is not None
    fixed_bias = bias is None or not (bias.requires_grad and torch.is_grad_enabled())
    if not (fixed_bias and plain_mod and supports(q, k, v)):
        raise ValueError(
            "native attention needs float32, bfloat16 or float16 CPU tensors of one dtype, a "
            "bias without gradient, no score_mod "
            f"but a relative-position table, and the compiled tile kernel (available: "
            f"{available()}); got {q.dtype} on {q.device}, bias requires grad: "
            f"{not fixed_bias}, score_mod={score_mod is not None}"
        )
    p = check_dropout(dropout_p)
    dropout = None if p == 0 else (p, draw_seed() if seed is None else seed)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    captured = captured_leaves(score_mod) if torch.is_grad_enabled() else ()
    head_groups = head_passes(pattern, q.shape[1], k.shape[1], DEFAULT_BLOCK)
    return NativeFunction.apply(q, k, v, bias, head_groups, scale, score_mod, dropout, *captured)
