"""The blockwise passes over head groups and their plans (:func:`forward_groups`,
:func:`backward_groups`), and the autograd Function that runs them with a ``score_mod``.

Each head group ``(pattern, heads)`` runs on views of its heads with its pattern's plan, on the
fused CPU path (:mod:`.fused`) where it applies, else step by step (:mod:`.stepwise`), and writes
into one output, so the backward pass fills one gradient per input. The backward pass keeps only
``out`` and ``lse`` and recomputes each group, in groups :data:`~.plan.BACKWARD_BLOCK_FACTOR`
times larger. It is hand-written and not differentiable: a backward pass that builds a graph
(``create_graph=True``) raises :class:`headwise._checks.Unsupported` instead of returning second
derivatives that treat the first ones as constants. Without a ``score_mod`` the passes run inside
custom operators (:mod:`.operators`); a ``score_mod`` (a Python function) runs through
:class:`BlockwiseFunction`.

Attention dropout runs step by step (the fused kernel would draw its own mask): each group's
block of :func:`~headwise.ops.attention.dropout.keep_mask` is generated in the forward pass and
again in the backward pass, never stored.

Tensors captured by ``score_mod`` that require grad (a learnable relative-position table, ALiBi
slopes; :func:`~headwise.ops.attention.problem.captured_leaves`) are inputs of the Function, so
they get their gradients too, by local autograd on each recomputed block; a ``score_mod`` that
depends on such tensors it does not capture is refused (:func:`check_captured`).
"""

from __future__ import annotations

import torch

from headwise._checks import Unsupported
from headwise.ops.attention.blockwise.fused import fused_backward, fused_forward, use_fused
from headwise.ops.attention.blockwise.heads import (
    head_index,
    head_views,
    renumber_heads,
    select_heads,
)
from headwise.ops.attention.blockwise.plan import (
    BACKWARD_BLOCK_FACTOR,
    add_rows,
    plan_for,
    put_rows,
)
from headwise.ops.attention.blockwise.stepwise import stepwise_backward, stepwise_forward
from headwise.ops.attention.problem import (
    bias_4d,
    probe_score_mod,
    refuse_double_backward,
    unseen_leaves,
    unseen_message,
)
from headwise.ops.attention.reference import compute_dtype


class BlockwiseFunction(torch.autograd.Function):
    """The path with a ``score_mod``: :func:`forward_groups` and :func:`backward_groups`, with
    the tensors ``score_mod`` captures as inputs
    (:func:`~headwise.ops.attention.problem.captured_leaves`)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, head_groups, scale, score_mod, block, dropout, *captured):
        out, lse = forward_groups(q, k, v, bias, head_groups, scale, score_mod, block, dropout)
        ctx.save_for_backward(q, k, v, bias, out, lse, *captured)
        ctx.params = (head_groups, scale, score_mod, block, dropout)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        refuse_double_backward("the 'blockwise' backend")
        q, k, v, bias, out, lse, *captured = ctx.saved_tensors
        bias = bias.detach() if bias is not None else None
        need_bias_grad = bias is not None and ctx.needs_input_grad[3]
        grad_q, grad_k, grad_v, grad_bias, d_captured = backward_groups(
            grad_out, grad_lse, q, k, v, bias, out, lse, *ctx.params, captured, need_bias_grad
        )
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None, *d_captured


def forward_groups(q, k, v, bias, head_groups, scale, score_mod, block, dropout):
    """``(out (B, Lq, H, Dv) in q's dtype, lse (B, H, Lq))`` of the head groups
    ``((pattern, heads), ...)`` (``heads`` ``None``: every head), each run on views of its
    heads with its pattern's plan, fused where it can."""
    fused = use_fused(q, v, score_mod) and dropout is None
    parts = []
    for pattern, heads in head_groups:
        qs, ks, vs, bs = head_views(q, k, v, bias, heads)
        plan = plan_for(pattern, q.shape[1], k.shape[1], block, str(q.device))
        if fused:
            parts.append(fused_forward(qs, ks, vs, bs, pattern, scale, plan))
        else:
            sub_mod = renumber_heads(score_mod, heads)
            dropped = dropout_blocks(dropout, q, k, heads)
            parts.append(stepwise_forward(qs, ks, vs, bs, pattern, scale, sub_mod, plan, dropped))
    if head_groups[0][1] is None:
        out, lse = parts[0]
    else:
        out = parts[0][0].new_empty(*q.shape[:3], v.shape[3])
        lse = parts[0][1].new_empty(q.shape[0], q.shape[2], q.shape[1])
        for (_, heads), (sub_out, sub_lse) in zip(head_groups, parts):
            put_rows(out, head_index(heads, out.device), sub_out, 2)
            put_rows(lse, head_index(heads, lse.device), sub_lse, 1)
    return out.to(q.dtype), lse


def backward_groups(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    bias,
    out,
    lse,
    head_groups,
    scale,
    score_mod,
    block,
    dropout,
    captured,
    need_bias_grad,
):
    """Gradients ``(dq, dk, dv, dbias, d_captured)`` of :func:`forward_groups` from its ``out``
    and ``lse``: ``dbias`` ``None`` unless ``need_bias_grad``; ``d_captured`` those of the
    tensors ``score_mod`` captures (``captured``)."""
    # Backward in groups twice as large: the kernel's dK, dV per group overlap less.
    plans = [
        plan_for(pattern, q.shape[1], k.shape[1], BACKWARD_BLOCK_FACTOR * block, str(q.device))
        for pattern, _ in head_groups
    ]
    fused = (
        use_fused(q, v, score_mod)
        and dropout is None
        and not need_bias_grad
        and (grad_lse is None or not grad_lse.any())
    )
    if head_groups[0][1] is None:
        (pattern, _), plan = head_groups[0], plans[0]
        parts = (grad_out, grad_lse, q, k, v, bias, out, lse)
        dropped = dropout_blocks(dropout, q, k, None)
        return _backward(
            fused, parts, pattern, scale, score_mod, plan, captured, need_bias_grad, dropped
        )
    grad_q = torch.empty_like(q)
    grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
    grad_bias = torch.zeros_like(bias) if need_bias_grad else None
    d_captured = [torch.zeros_like(t) for t in captured]
    group_size = q.shape[2] // k.shape[2]
    for (pattern, heads), plan in zip(head_groups, plans):
        parts = (
            select_heads(grad_out, heads, 2),
            None if grad_lse is None else select_heads(grad_lse, heads, 1),
            *head_views(q, k, v, bias, heads),
            select_heads(out, heads, 2),
            select_heads(lse, heads, 1),
        )
        sub_mod = renumber_heads(score_mod, heads)
        dropped = dropout_blocks(dropout, q, k, heads)
        grads = _backward(
            fused, parts, pattern, scale, sub_mod, plan, captured, need_bias_grad, dropped
        )
        dq, dk, dv, dbias, d_leaves = grads
        kv_heads = [h // group_size for h in heads]
        put_rows(grad_q, head_index(heads, grad_q.device), dq, 2)
        # GQA: heads sharing a K/V head repeat in kv_heads, and their dK, dV add up
        add_rows(grad_k, head_index(kv_heads, grad_k.device), dk, 2)
        add_rows(grad_v, head_index(kv_heads, grad_v.device), dv, 2)
        if dbias is not None:
            full = bias_4d(grad_bias)
            if full.shape[1] > 1:
                put_rows(full, head_index(heads, full.device), dbias, 1)
            else:
                full += dbias
        for total, part in zip(d_captured, d_leaves):
            total += part
    return grad_q, grad_k, grad_v, grad_bias, d_captured


def _backward(fused, parts, pattern, scale, score_mod, plan, captured, need_bias_grad, dropped):
    """Gradients ``(dq, dk, dv, dbias, d_captured)`` of one head group."""
    if fused:
        grad_out, _, q, k, v, bias, out, lse = parts
        dq, dk, dv = fused_backward(grad_out, q, k, v, bias, pattern, scale, plan, out, lse)
        return dq, dk, dv, None, [torch.zeros_like(t) for t in captured]
    return stepwise_backward(
        parts, pattern, scale, score_mod, plan, captured, need_bias_grad, dropped
    )


def dropout_blocks(dropout, q, k, heads):
    """``dropped(rows, keys)``: dropout's ``Z / (1 - p)`` on one group's block, for the query
    heads ``heads`` (``None``: all), ``(B, len(heads), rows, keys)`` in the compute dtype;
    ``None`` without dropout."""
    if dropout is None:
        return None
    batch, q_len, n_heads, _ = q.shape
    head_ids = None if heads is None else head_index(heads, q.device)

    def dropped(rows, keys):
        return dropout.weights(
            batch,
            n_heads,
            q_len,
            k.shape[1],
            rows=rows,
            keys=keys,
            head_ids=head_ids,
            device=q.device,
            dtype=compute_dtype(q.dtype),
        )

    return dropped


@torch.compiler.disable  # looks at autograd's graph: a graph break, in a call that has one
def check_captured(score_mod, q: torch.Tensor, k: torch.Tensor) -> None:
    """Refuse a ``score_mod`` whose scores depend on tensors requiring grad that
    :func:`~headwise.ops.attention.problem.captured_leaves` does not find: their gradients
    would silently be missing (:func:`~headwise.ops.attention.problem.unseen_leaves`)."""
    batch, q_len, heads = q.shape[:3]
    probed = probe_score_mod(score_mod, batch, heads, q_len, k.shape[1], q.dtype, q.device)
    missing = unseen_leaves(score_mod, probed)
    if missing:
        raise Unsupported(unseen_message(missing))
