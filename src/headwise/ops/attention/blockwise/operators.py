"""The blockwise passes as PyTorch custom operators: ``headwise::blockwise_attention_fwd`` and
``headwise::blockwise_attention_bwd``, the path of every call without a ``score_mod``.

The plan of a call is data: which query groups run together, which keys each reads (slices or
index tensors) and the masks of partial groups, built from the pattern and the lengths
(:mod:`.plan`) and walked by Python loops. Traced by ``torch.compile``, each plan lookup, each
tensor turned into a slice and each loop bound is a graph break. As operators registered with
``torch.library`` (``custom_op``, fake implementations giving the output shapes,
``register_autograd``; PyTorch's custom-operator guide, "Python custom operators"), each pass is
one opaque node of the graph: the plans and head groups are built inside, as in eager calls, and
the layers around it compile into one graph. The pattern travels as a string key
(:func:`headwise.ops.attention.pattern_keys.pattern_key`, the registry the ``native``
operators use too). The non-finite rule of :mod:`headwise.ops.attention.api` is applied inside the
operators (:mod:`..nonfinite`), so its data-dependent branch is never traced.

Why not trace the passes with their plans as constants: measured (2-core CPU, loaded, one
thread; L=1024, H=4, D=64, a window of 64, forward), the loop over the plan's groups took 74 s
to compile with inductor and ran no faster compiled than eager (15.8 vs 14.7 ms; this operator
12.2 ms, batched runs included): the time is in the fused kernel's calls, which inductor keeps as
they are, and the graph grows with the number of groups.

Inputs are ``(B, L, H, D)`` tensors of any dtype and device the blockwise path serves; ``bias``
is optional and gets its gradient when it requires one; attention dropout is ``(dropout_p,
seed)`` (:class:`~headwise.ops.attention.dropout.Dropout`), the seed a 0-d int64 tensor input,
saved for the backward pass and read only in the operators' implementations, so a seed drawn in a
compiled graph (:func:`~headwise.ops.attention.dropout.draw_seed_tensor`) never breaks it. The
backward pass is hand-written and not differentiable: ``create_graph=True`` raises
:class:`headwise._checks.Unsupported`.
"""

from __future__ import annotations

from typing import Optional

import torch

from headwise.ops.attention.blockwise.function import backward_groups, forward_groups
from headwise.ops.attention.blockwise.heads import head_passes
from headwise.ops.attention.dropout import NO_SEED, Dropout, from_int64, seed_tensor
from headwise.ops.attention.nonfinite import has_non_finite, poisoned_rows, run_poisoned
from headwise.ops.attention.pattern_keys import pattern_key, pattern_of
from headwise.ops.attention.problem import hides_keys, refuse_double_backward
from headwise.ops.attention.reference import compute_dtype
from headwise.patterns import Pattern


def _runner(key, q, k, block, dropout_p, seed):
    """``(pattern, run, dropout)``: ``run`` is a backend's ``run`` (for :mod:`..nonfinite`) over
    :func:`.function.forward_groups` with the pattern's head groups; ``dropout`` ``None`` when
    ``dropout_p`` is 0 (``seed``: the operator's 0-d int64 tensor, read here)."""
    pattern = pattern_of(key)
    groups = head_passes(pattern, q.shape[1], k.shape[1], block)
    # the seed tensor is int64: seeds at or above 2^63 travel as their two's complement
    dropout = Dropout(dropout_p, from_int64(int(seed))) if dropout_p > 0 else None

    def run(q, k, v, _pattern, scale, bias, _score_mod, dropout):
        return forward_groups(q, k, v, bias, groups, scale, None, block, dropout)

    return pattern, run, dropout


@torch.library.custom_op("headwise::blockwise_attention_fwd", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads the annotation)
    pattern_key: str,
    scale: float,
    block: int,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (B, Lq, H, Dv) in q's dtype, lse (B, H, Lq) float32, float64 for float64,
    screened)``: ``screened`` (a bool scalar) tells the backward pass whether the non-finite rule
    has inputs to look at, so that it looks only then."""
    pattern, run, dropout = _runner(pattern_key, q, k, block, dropout_p, seed)
    screened = hides_keys(pattern, bias, None) and has_non_finite(q, k, v)
    if screened:
        out, lse = run_poisoned(run, q, k, v, pattern, scale, bias, None, dropout)
    else:
        out, lse = run(q, k, v, pattern, scale, bias, None, dropout)
    # contiguous, as the fake implementation says (the step-by-step path gives a transpose)
    return out.contiguous(), lse.contiguous(), torch.tensor(screened)


@_forward.register_fake
def _(q, k, v, bias, pattern_key, scale, block, dropout_p, seed):
    batch, q_len, heads = q.shape[:3]
    lse = q.new_empty(batch, heads, q_len, dtype=compute_dtype(q.dtype))
    return q.new_empty(batch, q_len, heads, v.shape[3]), lse, torch.empty((), dtype=torch.bool)


@torch.library.custom_op("headwise::blockwise_attention_bwd", mutates_args=())
def _backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],  # noqa: UP045
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    out: torch.Tensor,
    lse: torch.Tensor,
    screened: torch.Tensor,
    pattern_key: str,
    scale: float,
    block: int,
    dropout_p: float,
    seed: torch.Tensor,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dbias)`` of :func:`_forward` (``dbias`` empty unless ``bias_grad``).
    Where the forward pass ``screened`` its inputs, under the non-finite rule, the backward is
    that of the clean inputs with the poisoned rows' output gradients zeroed (their forward
    outputs, recomputed), and the bad entries get gradient 0."""
    pattern, run, dropout = _runner(pattern_key, q, k, block, dropout_p, seed)
    found = poisoned_rows(run, q, k, v, pattern, scale, bias, None) if screened.item() else None
    if found is not None:
        bad = [~torch.isfinite(t) for t in (q, k, v)]
        q, k, v, poisoned = found
        out, lse = run(q, k, v, pattern, scale, bias, None, dropout)
        grad_out = grad_out.masked_fill(poisoned[..., None], 0)
        if grad_lse is not None:
            grad_lse = grad_lse.masked_fill(poisoned.transpose(1, 2), 0)
    if grad_lse is not None and not grad_lse.any():
        grad_lse = None
    groups = head_passes(pattern, q.shape[1], k.shape[1], block)
    dq, dk, dv, dbias, _ = backward_groups(
        grad_out, grad_lse, q, k, v, bias, out, lse, groups, scale, None, block, dropout, (),
        bias_grad,
    )  # fmt: skip
    if found is not None:
        dq, dk, dv = (d.masked_fill(b, 0) for d, b in zip((dq, dk, dv), bad))
    # contiguous, as the fake implementation says
    d_bias = q.new_zeros(0) if dbias is None else dbias.contiguous()
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), d_bias


@_backward.register_fake
def _(grad_out, grad_lse, q, k, v, bias, out, lse, screened, key, scale, block, p, seed, bias_grad):
    d_bias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_bias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, key, scale, block, dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, bias, *output, seed)
    ctx.pattern, ctx.params = pattern_of(key), (scale, block, dropout_p)


def _gradients(ctx, grad_out, grad_lse, _):
    refuse_double_backward("the 'blockwise' backend")
    q, k, v, bias, out, lse, screened, seed = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    bias = None if bias is None else bias.detach()
    # the key again: an eager call's key may have made way for newer patterns since
    key = pattern_key(ctx.pattern)
    dq, dk, dv, d_bias = torch.ops.headwise.blockwise_attention_bwd(
        grad_out, grad_lse, q, k, v, bias, out, lse, screened, key, *ctx.params, seed, bias_grad
    )
    return dq, dk, dv, d_bias if bias_grad else None, None, None, None, None, None


_forward.register_autograd(_gradients, setup_context=_setup_context)


def blockwise_operator(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None,
    scale: float,
    bias: torch.Tensor | None,
    block: int,
    dropout: Dropout | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``headwise::blockwise_attention_fwd``, the non-finite rule applied."""
    p, seed = (0.0, NO_SEED) if dropout is None else (dropout.p, seed_tensor(dropout.seed))
    out, lse, _ = torch.ops.headwise.blockwise_attention_fwd(
        q, k, v, bias, pattern_key(pattern), scale, block, p, seed
    )
    return out, lse
