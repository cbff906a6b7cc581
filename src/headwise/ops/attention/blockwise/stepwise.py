"""The step-by-step path: the softmax written out group by group, forward and backward.

Serves what the fused CPU kernel (:mod:`.fused`) cannot: ``score_mod`` (with gradients into the
tensors it captures), bias gradients, LSE gradients, float64, and every device other than the
CPU. K/V stay ``(B, Hkv, 1, L, D)`` and queries ``(B, Hkv, G, L, D)``, so GQA needs no copy of
K/V per query head. Backward is FlashAttention-2 style from the saved ``out`` and ``lse``:

    dP = dO V^T,  dS = P * (dP - rowsum(dO * O) + dlse),  dQ = scale dS K,  dK = scale dS^T Q,
    dV = P^T dO,  dbias = dS (reduced over broadcast dims).

With attention dropout each group's block ``W = Z / (1 - p)`` of the keep mask is generated
again in the backward pass (FlashAttention-2 with dropout): ``O = (P * W) V``, ``dP = W * dO V^T``,
``dV = (P * W)^T dO``; ``rowsum(dO * O)`` and ``dS`` keep their form.

Blocks are multiplied with ``torch.matmul``, whose BLAS may split one product among threads in
another order: results agree across thread counts to a few ulps only.
"""

from __future__ import annotations

import torch

from headwise.ops.attention.blockwise.plan import (
    RowGroup,
    add_rows,
    bias_block,
    count,
    pattern_mask,
    plan_groups,
    positions_of,
)
from headwise.ops.attention.problem import apply_score_mod, bias_4d, score_indices
from headwise.ops.attention.reference import compute_dtype, masked_softmax_av


def _grouped_q(t: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    batch, length, heads, dim = t.shape
    return (
        t.reshape(batch, length, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4).to(dtype)
    )


def _scores(qg, kg, bias, pattern, scale, score_mod, row, q_len, kv_len):
    raw = (qg[:, :, :, row.rows] @ kg[:, :, :, row.keys].transpose(-1, -2)) * scale
    return _finish_scores(raw, bias, pattern, score_mod, row, q_len, kv_len)


def _finish_scores(raw, bias, pattern, score_mod, row, q_len, kv_len):
    """score_mod, bias and mask on a ``(B, Hkv, G, rows, keys)`` block of raw scores."""
    batch, kv_heads, group, n_rows, n_keys = raw.shape
    heads = kv_heads * group
    scores = raw.reshape(batch, heads, n_rows, n_keys)
    q_idx = positions_of(row.rows, raw.device)
    kv_idx = positions_of(row.keys, raw.device)
    if score_mod is not None:
        scores = apply_score_mod(score_mod, scores, *score_indices(batch, heads, q_idx, kv_idx))
    if bias is not None:
        scores = scores + bias_block(bias_4d(bias), row).to(scores.dtype)
    if pattern is not None and row.needs_mask:
        hidden = torch.isneginf(pattern_mask(pattern, row, q_len, kv_len, raw.device))
        # where, not +: a hidden NaN or +inf score (from the bias) must not survive the mask
        scores = torch.where(hidden, float("-inf"), scores)
    return scores.reshape(batch, kv_heads, group, n_rows, n_keys)


def _accumulate_bias_grad(dbias: torch.Tensor, d_scores: torch.Tensor, row: RowGroup) -> None:
    """Add a ``(B, H, rows, keys)`` score gradient into ``dbias`` (broadcast dims reduced)."""
    for dim in (0, 1):
        if dbias.shape[dim] == 1:
            d_scores = d_scores.sum(dim, keepdim=True)
    if dbias.shape[3] == 1:
        d_scores = d_scores.sum(3, keepdim=True)
    elif not isinstance(row.keys, slice):
        spread = d_scores.new_zeros(*d_scores.shape[:3], dbias.shape[3])
        d_scores = spread.index_add_(3, row.keys, d_scores)
    else:
        spread = d_scores.new_zeros(*d_scores.shape[:3], dbias.shape[3])
        spread[..., row.keys] = d_scores
        d_scores = spread
    if dbias.shape[2] == 1:
        dbias += d_scores.sum(2, keepdim=True)
    elif isinstance(row.rows, slice):
        dbias[:, :, row.rows] += d_scores
    else:
        dbias.index_add_(2, row.rows, d_scores)


def _dropped_block(dropped, row, shape):
    """Dropout's ``Z / (1 - p)`` for one group, shaped like its ``(B, Hkv, G, rows, keys)``
    scores; ``None`` without dropout."""
    return None if dropped is None else dropped(row.rows, row.keys).reshape(shape)


def stepwise_forward(q, k, v, bias, pattern, scale, score_mod, plan, dropped=None):
    """The softmax written out group by group: ``(out (B, Lq, H, Dv), lse (B, H, Lq))``;
    ``dropped(rows, keys)`` gives dropout's block (``None``: no dropout)."""
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype)
    # (B, Hkv, G, L, D) so GQA needs no copy of K/V per query head.
    qg = _grouped_q(q, kv_heads, dtype)
    kg = k.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
    vg = v.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
    out = q.new_zeros(batch, kv_heads, heads // kv_heads, q_len, v.shape[3], dtype=dtype)
    lse = torch.full((batch, heads, q_len), float("-inf"), dtype=dtype, device=q.device)
    for row in plan_groups(plan):
        if count(row.keys) == 0:
            continue
        scores = _scores(qg, kg, bias, pattern, scale, score_mod, row, q_len, kv_len)
        block_out, block_lse = masked_softmax_av(
            scores, vg[:, :, :, row.keys], _dropped_block(dropped, row, scores.shape)
        )
        out[:, :, :, row.rows] = block_out
        lse[:, :, row.rows] = block_lse.reshape(batch, heads, -1)
    return out.reshape(batch, heads, q_len, -1).transpose(1, 2), lse


def stepwise_backward(parts, pattern, scale, score_mod, plan, captured, need_bias_grad, dropped):
    """Gradients ``(dq, dk, dv, dbias, d_captured)`` of one head group, group by group from the
    saved ``out`` and ``lse``; ``score_mod``'s own gradient (and that of the tensors it
    captures) by local autograd on each recomputed block."""
    grad_out, grad_lse, q, k, v, bias, out, lse = parts
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = compute_dtype(q.dtype)
    qg = _grouped_q(q, kv_heads, dtype)
    kg = k.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
    vg = v.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
    dout = _grouped_q(grad_out, kv_heads, dtype)
    delta = (dout * _grouped_q(out, kv_heads, dtype)).sum(-1)  # (B, Hkv, G, Lq)
    lse = lse.reshape(batch, kv_heads, group, q_len)
    if grad_lse is not None:
        delta = delta - grad_lse.to(dtype).reshape(batch, kv_heads, group, q_len)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dq = torch.zeros_like(qg)
    dk = torch.zeros_like(kg.squeeze(2))
    dv = torch.zeros_like(vg.squeeze(2))
    dbias = torch.zeros_like(bias_4d(bias), dtype=dtype) if need_bias_grad else None
    d_captured = [torch.zeros_like(t) for t in captured]
    for row in plan_groups(plan):
        if count(row.keys) == 0:
            continue
        rows = row.rows
        q_blk = qg[:, :, :, rows]
        with torch.enable_grad():
            raw = (q_blk @ kg[:, :, :, row.keys].transpose(-1, -2)) * scale
            raw = raw.detach().requires_grad_(score_mod is not None)
            scores = _finish_scores(raw, bias, pattern, score_mod, row, q_len, kv_len)
        probs = torch.exp(scores.detach() - safe_lse[:, :, :, rows, None])
        d_out = dout[:, :, :, rows]
        d_probs = d_out @ vg[:, :, :, row.keys].transpose(-1, -2)
        kept = _dropped_block(dropped, row, probs.shape)
        if kept is None:
            dv_sel = (probs.transpose(-1, -2) @ d_out).sum(2)
        else:
            dv_sel = ((probs * kept).transpose(-1, -2) @ d_out).sum(2)
            d_probs = d_probs * kept
        d_scores = probs * (d_probs - delta[:, :, :, rows, None])
        if dbias is not None:
            _accumulate_bias_grad(dbias, d_scores.reshape(batch, heads, *d_scores.shape[3:]), row)
        if score_mod is not None:
            d_scores, *d_leaves = torch.autograd.grad(
                scores, [raw, *captured], d_scores, allow_unused=True
            )
            for total, part in zip(d_captured, d_leaves):
                if part is not None:
                    total += part
        d_scores = d_scores * scale
        dq[:, :, :, rows] = d_scores @ kg[:, :, :, row.keys]
        dk_sel = (d_scores.transpose(-1, -2) @ q_blk).sum(2)
        add_rows(dk, row.keys, dk_sel, 2)
        add_rows(dv, row.keys, dv_sel, 2)
    grad_q = dq.reshape(batch, heads, q_len, -1).transpose(1, 2).to(q.dtype)
    grad_k = dk.transpose(1, 2).to(k.dtype)
    grad_v = dv.transpose(1, 2).to(v.dtype)
    grad_bias = dbias.reshape(bias.shape).to(bias.dtype) if dbias is not None else None
    return grad_q, grad_k, grad_v, grad_bias, d_captured
