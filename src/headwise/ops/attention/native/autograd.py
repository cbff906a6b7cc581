"""The native backend as PyTorch custom operators: :func:`native_attention` over
``headwise::native_attention_fwd`` and ``headwise::native_attention_bwd``.

Both passes run on the C tile kernel (:mod:`.call`), every head group in one call; heads are
grouped by pattern as on the blockwise path (:func:`headwise.ops.attention.blockwise.heads.
head_passes`). The operators are registered with ``torch.library`` (``custom_op``, fake
implementations giving the output shapes, ``register_autograd``), so ``torch.compile`` sees each
pass as one opaque node and traces no plan, ctypes call, cache or lock (PyTorch's custom-operator
guide, "Python custom operators"). An operator takes tensors and scalars only: the pattern
travels as a string key into a process-wide registry
(:func:`headwise.ops.attention.pattern_keys.pattern_key`), filled outside the traced region, and
the head groups and plans are built inside the operator's implementation.
The one ``score_mod`` taken is a neighborhood's relative-position table
(:func:`headwise.ops.attention.mods.relative_position_bias`): a tensor input, whose gradient
the kernel computes; ``bias`` is an optional tensor without gradient. The non-finite rule of
:mod:`headwise.ops.attention.api` is applied inside the operators (:mod:`..nonfinite`), so its
data-dependent branch is never traced; its screen (:func:`.call.has_non_finite`) is read by the
kernel in place, one pass over each tensor's bits. The backward pass is hand-written and not
differentiable: ``create_graph=True`` raises :class:`headwise._checks.Unsupported`. bfloat16 and
float16 inputs are read by the kernel as they are (gradients accumulate in float32 and are rounded
once); attention dropout (``dropout_p`` > 0) regenerates its keep mask in the backward pass from
the seed (:mod:`headwise.ops.attention.dropout`). The seed is a 0-d int64 tensor input, saved for
the backward pass and read only in the operators' implementations: a seed drawn in a compiled
graph (:func:`~headwise.ops.attention.dropout.draw_seed_tensor`) never breaks it.
"""

from __future__ import annotations

from typing import Optional

import torch

from headwise.ops.attention.blockwise.heads import head_passes
from headwise.ops.attention.blockwise.plan import DEFAULT_BLOCK
from headwise.ops.attention.dropout import (
    NO_SEED,
    check_dropout,
    draw_seed_tensor,
    from_int64,
    seed_tensor,
)
from headwise.ops.attention.mods import RelativePositionTable, relative_position_of
from headwise.ops.attention.native.build import available
from headwise.ops.attention.native.call import (
    has_non_finite,
    supports,
    tiles_backward,
    tiles_forward,
)
from headwise.ops.attention.nonfinite import poisoned_rows, run_poisoned
from headwise.ops.attention.pattern_keys import intern, pattern_key, pattern_of
from headwise.ops.attention.problem import hides_keys, refuse_double_backward
from headwise.patterns import Pattern, full
from headwise.types import ScoreMod


def _runner(key, q, k, bias, table, scale, dropout_p, seed):
    """``(pattern, run, run_backward, dropout)``: ``run(q, k, v, *ignored, dropout) -> (out,
    lse)`` (a backend's ``run`` for :mod:`..nonfinite`, which passes ``dropout`` ``None`` for its
    weight pass) and :func:`.call.tiles_backward` on the kernel with the pattern's head groups,
    the table, the bias and ``dropout``: ``(dropout_p, seed)``, ``None`` when ``dropout_p`` is
    0 (``seed``: the operator's 0-d int64 tensor, read here)."""
    pattern = pattern_of(key)
    passes = head_passes(pattern, q.shape[1], k.shape[1], DEFAULT_BLOCK)
    groups = [(p or full(), heads) for p, heads in passes]
    relative = None if table is None else RelativePositionTable(pattern, table)

    # the seed tensor is int64: seeds at or above 2^63 travel as their two's complement
    dropout = (dropout_p, from_int64(int(seed))) if dropout_p > 0 else None

    def run(q, k, v, _pattern=None, _scale=None, _bias=None, _mod=None, dropout=dropout):
        return tiles_forward(q, k, v, groups, scale, relative=relative, bias=bias, dropout=dropout)

    def run_backward(grad_out, grad_lse, q, k, v, out, lse, grads):
        return tiles_backward(grad_out, grad_lse, q, k, v, out, lse, groups, scale, grads,
                              relative, bias, dropout)  # fmt: skip

    return pattern, run, run_backward, dropout


@torch.library.custom_op("headwise::native_attention_fwd", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads the annotation)
    table: Optional[torch.Tensor],  # noqa: UP045
    pattern_key: str,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Lq, H, Dv), lse (B, H, Lq))`` of ``(B, L, H, D)`` inputs (float32, bfloat16
    or float16; ``out`` in their dtype, ``lse`` float32)."""
    pattern, run, _, dropout = _runner(pattern_key, q, k, bias, table, scale, dropout_p, seed)
    if hides_keys(pattern, bias, table) and has_non_finite(q, k, v):
        return run_poisoned(run, q, k, v, None, None, None, None, dropout)
    return run(q, k, v)


@_forward.register_fake
def _(q, k, v, bias, table, pattern_key, scale, dropout_p, seed):
    batch, q_len, heads = q.shape[:3]
    lse = q.new_empty(batch, heads, q_len, dtype=torch.float32)
    return q.new_empty(batch, q_len, heads, v.shape[3]), lse


@torch.library.custom_op("headwise::native_attention_bwd", mutates_args=())
def _backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],  # noqa: UP045
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    table: Optional[torch.Tensor],  # noqa: UP045
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern_key: str,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dtable)`` of :func:`_forward` (``dtable`` empty without a table). Under
    the non-finite rule the backward is that of the clean inputs with the poisoned rows' output
    gradients zeroed (their forward outputs, recomputed): bad entries, seen by poisoned rows
    only (the kernel flushes weights below the poison threshold to 0), get gradient 0."""
    pattern, run, run_backward, _ = _runner(pattern_key, q, k, bias, table, scale, dropout_p, seed)
    found = None
    if hides_keys(pattern, bias, table) and has_non_finite(q, k, v):
        found = poisoned_rows(run, q, k, v, None, None, None, None)
    if found is not None:
        q, k, v, poisoned = found
        out, lse = run(q, k, v)
        grad_out = grad_out.masked_fill(poisoned[..., None], 0)
        if grad_lse is not None:
            grad_lse = grad_lse.masked_fill(poisoned.transpose(1, 2), 0)
    if grad_lse is not None and not grad_lse.any():
        grad_lse = None
    grads = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    d_table = run_backward(grad_out, grad_lse, q, k, v, out, lse, grads)
    return *grads, q.new_zeros(0) if table is None else d_table.to(table.dtype)


@_backward.register_fake
def _(grad_out, grad_lse, q, k, v, bias, table, out, lse, pattern_key, scale, dropout_p, seed):
    d_table = q.new_empty(0) if table is None else torch.empty_like(table)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_table


def _setup_context(ctx, inputs, output):
    q, k, v, bias, table, key, scale, dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, bias, table, *output, seed)
    ctx.pattern, ctx.scale, ctx.dropout_p = pattern_of(key), scale, dropout_p


def _gradients(ctx, grad_out, grad_lse):
    refuse_double_backward("the 'native' backend")
    q, k, v, bias, table, out, lse, seed = ctx.saved_tensors
    bias = None if bias is None else bias.detach()
    # the key again: an eager call's key may have made way for newer patterns since
    key = intern(ctx.pattern, pin=False)
    dq, dk, dv, d_table = torch.ops.headwise.native_attention_bwd(
        grad_out, grad_lse, q, k, v, bias, table, out, lse, key, ctx.scale, ctx.dropout_p, seed
    )
    return dq, dk, dv, None, None if table is None else d_table, None, None, None, None


_forward.register_autograd(_gradients, setup_context=_setup_context)


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
    seed: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out (B, Lq, H, Dv), lse (B, H, Lq))`` of CPU ``(B, L, H, D)`` inputs of one
    dtype (float32, bfloat16 or float16; ``out`` in it, ``lse`` float32) on headwise's C tile
    kernel (the ``headwise::native_attention_fwd`` operator): a bias without gradient; no
    ``score_mod`` but a relative-position table of the pattern. Applies the non-finite rule of
    :func:`headwise.ops.attention.attention` itself. ``dropout_p``: attention dropout on the
    normalized probabilities with the keep mask
    :func:`~headwise.ops.attention.dropout.keep_mask` of ``seed`` (an int or a 0-d int64 tensor;
    ``None``: drawn from torch's default generator by
    :func:`~headwise.ops.attention.dropout.draw_seed_tensor`, so ``torch.manual_seed`` fixes it);
    0 is exactly no dropout."""
    relative = relative_position_of(score_mod, pattern)
    plain_mod = score_mod is None or relative is not None
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
    seed = NO_SEED if p == 0 else seed_tensor(draw_seed_tensor() if seed is None else seed)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    table = None if relative is None else relative.table
    return torch.ops.headwise.native_attention_fwd(
        q, k, v, bias, table, pattern_key(pattern), scale, p, seed
    )
