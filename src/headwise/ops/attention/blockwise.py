"""Blockwise softmax attention in PyTorch: any pattern, forward and backward, on any device.

Queries are processed in groups of about ``block`` (consecutive rows, or the pattern's own
grouping: spatial tiles for neighborhoods). Each group gathers exactly the keys at least one of its
queries may see, so hidden keys cost nothing and no ``Lq x Lk`` tensor is built (peak extra memory
is ``B * H * block * keys_selected``); element masks of partial groups are cached with the plan.
Within a group the softmax is exact: on CPU one call of PyTorch's fused attention kernel with the
pattern as an additive mask, otherwise the same ``masked_softmax_av`` as the reference. Backward
is FlashAttention-2 style: it keeps only ``out`` and ``lse`` and recomputes each group,

    dP = dO V^T,  dS = P * (dP - rowsum(dO * O) + dlse),  dQ = scale dS K,  dK = scale dS^T Q,
    dV = P^T dO,  dbias = dS (reduced over broadcast dims).

Tensors captured by ``score_mod`` that require grad (a learnable relative-position table, ALiBi
slopes) get their gradients too, by local autograd on each recomputed block.

This is the CPU training path for sparse patterns (FlexAttention has no CPU backward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from headwise.ops.attention.problem import ScoreMod, bias_4d
from headwise.ops.attention.reference import compute_dtype, masked_softmax_av, score_indices
from headwise.patterns import EMPTY, Pattern

DEFAULT_BLOCK = 64
#: partial query groups keep their masks (float32) in the cached plan up to this many entries
MASK_CACHE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class _RowGroup:
    rows: slice | torch.Tensor  # query positions processed together
    keys: slice | torch.Tensor  # every key position at least one of them may see
    needs_mask: bool  # False when every selected key is visible to every row and head
    mask: torch.Tensor | None = None  # additive (H_p, rows, keys): 0 or -inf, when cached
    has_empty_rows: bool = True  # whether some row of some head sees none of the keys


# At most 16 plans x MASK_CACHE_ELEMENTS float32 masks (1 GiB) stay cached.
@functools.lru_cache(maxsize=16)
def _plan(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int, device: str
) -> tuple[_RowGroup, ...]:
    if pattern is None:
        return tuple(
            _RowGroup(slice(s, min(q_len, s + block)), slice(0, kv_len), False)
            for s in range(0, q_len, block)
        )
    groups = []
    budget = MASK_CACHE_ELEMENTS
    all_keys = torch.arange(kv_len)
    for rows in pattern.query_groups(q_len, block):
        visible = pattern.visible(_positions(rows), all_keys, q_len, kv_len)
        cols = torch.nonzero(visible.any(0).any(0)).flatten()
        keys = _as_slice(cols) if len(cols) else slice(0, 0)
        visible = visible[:, :, keys]
        needs_mask = not bool(visible.all())
        has_empty_rows = not bool(visible.any(-1).all())
        mask = None
        if needs_mask and visible.numel() <= budget:
            # Evaluating the predicate costs as much as the scores; do it once per plan.
            budget -= visible.numel()
            mask = _additive(visible).to(device)
        if isinstance(keys, torch.Tensor):
            keys = keys.to(device)
        if isinstance(rows, torch.Tensor):
            rows = rows.to(device)
        groups.append(_RowGroup(rows, keys, needs_mask, mask, has_empty_rows))
    return tuple(groups)


def _as_slice(index: torch.Tensor) -> slice | torch.Tensor:
    """A slice when the sorted ``index`` is one contiguous range, else the index itself."""
    if int(index[-1] - index[0]) + 1 == len(index):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _positions(index: slice | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(index, slice):
        return torch.arange(index.start, index.stop, device=device)
    return index


class _Blockwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, pattern, scale, score_mod, block, *captured):
        batch, q_len, heads, _ = q.shape
        kv_len, kv_heads = k.shape[1], k.shape[2]
        group = heads // kv_heads
        dtype = compute_dtype(q.dtype)
        plan = _plan(pattern, q_len, kv_len, block, str(q.device))
        # (B, Hkv, G, L, D) so GQA needs no copy of K/V per query head.
        qg = _grouped_q(q, kv_heads, dtype)
        kg = k.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
        vg = v.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
        out = torch.zeros(batch, kv_heads, group, q_len, v.shape[3], dtype=dtype, device=q.device)
        lse = torch.full((batch, heads, q_len), float("-inf"), dtype=dtype, device=q.device)
        ctx.fused = _use_fused(q, v, score_mod)
        if ctx.fused:
            _fused_forward(q, k, v, bias, pattern, scale, plan, out, lse)
        else:
            for row in plan:
                if _count(row.keys) == 0:
                    continue
                scores = _scores(qg, kg, bias, pattern, scale, score_mod, row, q_len, kv_len)
                block_out, block_lse = masked_softmax_av(scores, vg[:, :, :, row.keys])
                out[:, :, :, row.rows] = block_out
                lse[:, :, row.rows] = block_lse.reshape(batch, heads, -1)
        ctx.save_for_backward(q, k, v, bias, out, lse, *captured)
        ctx.params = (pattern, scale, score_mod, plan)
        out = out.reshape(batch, heads, q_len, -1).transpose(1, 2).to(q.dtype)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, bias, out, lse, *captured = ctx.saved_tensors
        bias = bias.detach() if bias is not None else None
        pattern, scale, score_mod, plan = ctx.params
        need_bias_grad = bias is not None and ctx.needs_input_grad[3]
        if ctx.fused and not need_bias_grad and (grad_lse is None or not grad_lse.any()):
            grads = _fused_backward(grad_out, q, k, v, bias, pattern, scale, plan, out, lse)
            return *grads, None, None, None, None
        batch, q_len, heads, _ = q.shape
        kv_len, kv_heads = k.shape[1], k.shape[2]
        group = heads // kv_heads
        dtype = out.dtype
        qg = _grouped_q(q, kv_heads, dtype)
        kg = k.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
        vg = v.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
        dout = _grouped_q(grad_out, kv_heads, dtype)
        delta = (dout * out).sum(-1)  # (B, Hkv, G, Lq)
        lse = lse.view(batch, kv_heads, group, q_len)
        if grad_lse is not None:
            delta = delta - grad_lse.to(dtype).view(batch, kv_heads, group, q_len)
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        dq = torch.zeros_like(qg)
        dk = torch.zeros_like(kg.squeeze(2))
        dv = torch.zeros_like(vg.squeeze(2))
        dbias = torch.zeros_like(bias_4d(bias), dtype=dtype) if need_bias_grad else None
        d_captured = [torch.zeros_like(t) for t in captured]
        for row in plan:
            if _count(row.keys) == 0:
                continue
            rows = row.rows
            q_blk = qg[:, :, :, rows]
            with torch.enable_grad():
                raw = (q_blk @ kg[:, :, :, row.keys].transpose(-1, -2)) * scale
                raw = raw.detach().requires_grad_(score_mod is not None)
                scores = _finish_scores(raw, bias, pattern, score_mod, row, q_len, kv_len)
            probs = torch.exp(scores.detach() - safe_lse[:, :, :, rows, None])
            d_out = dout[:, :, :, rows]
            dv_sel = (probs.transpose(-1, -2) @ d_out).sum(2)
            d_probs = d_out @ vg[:, :, :, row.keys].transpose(-1, -2)
            d_scores = probs * (d_probs - delta[:, :, :, rows, None])
            if dbias is not None:
                _accumulate_bias_grad(
                    dbias, d_scores.reshape(batch, heads, *d_scores.shape[3:]), row
                )
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
            _add_keys(dk, dk_sel, row.keys)
            _add_keys(dv, dv_sel, row.keys)
        grad_q = dq.reshape(batch, heads, q_len, -1).transpose(1, 2).to(q.dtype)
        grad_k = dk.transpose(1, 2).to(k.dtype)
        grad_v = dv.transpose(1, 2).to(v.dtype)
        grad_bias = dbias.reshape(bias.shape).to(bias.dtype) if dbias is not None else None
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, *d_captured


# PyTorch's fused CPU attention kernel with its log-sum-exp (what SDPA runs on CPU). Each query
# group is one call over its gathered keys with the pattern as an additive mask: several times
# faster than the step-by-step softmax above, which remains for score_mod, bias gradients, LSE
# gradients and other devices.
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


def _use_fused(q: torch.Tensor, v: torch.Tensor, score_mod: ScoreMod | None) -> bool:
    return (
        _FUSED is not None
        and _FUSED_BACKWARD is not None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.shape[-1] == v.shape[-1]  # the kernel takes one head dim for q, k and v
        and score_mod is None
    )


def heads_first(q, k, v):
    """``(B, L, H, D)`` views as ``(B, H, L, D)``, K/V heads repeated to the query heads."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if group > 1:
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    return qh, kh, vh


def _additive_mask(bias, pattern, row, q_len, kv_len, dtype, device):
    """The pattern (as 0 / -inf) plus the bias for one query group, ``(B|1, H|1, rows, keys)``."""
    mask = None
    if pattern is not None and row.needs_mask:
        mask = _pattern_mask(pattern, row, q_len, kv_len, device).to(dtype)[None]
    if bias is not None:
        block = _bias_block(bias_4d(bias), row).to(dtype)
        mask = block if mask is None else mask + block
    return mask


def _fused_forward(q, k, v, bias, pattern, scale, plan, out, lse):
    batch, q_len, heads, _ = q.shape
    qh, kh, vh = heads_first(q, k, v)
    out_h = out.view(batch, heads, q_len, -1)
    for row in plan:
        if _count(row.keys) == 0:
            continue
        mask = _additive_mask(bias, pattern, row, q_len, k.shape[1], q.dtype, q.device)
        block_out, block_lse = _FUSED(
            qh[:, :, row.rows],
            kh[:, :, row.keys],
            vh[:, :, row.keys],
            0.0,
            False,
            attn_mask=mask,
            scale=scale,
        )
        if mask is not None and (row.has_empty_rows or bias is not None):
            # the kernel reports 0, not -inf, for rows that see no key
            block_lse = block_lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
        out_h[:, :, row.rows] = block_out.to(out.dtype)
        lse[:, :, row.rows] = block_lse.to(lse.dtype)


def _fused_backward(grad_out, q, k, v, bias, pattern, scale, plan, out, lse):
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    qh, kh, vh = heads_first(q, k, v)
    d_out = grad_out.transpose(1, 2).to(q.dtype)
    out_h = out.view(batch, heads, q_len, -1).to(q.dtype)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dq = torch.zeros(qh.shape, dtype=out.dtype, device=q.device)
    dk = torch.zeros(kh.shape, dtype=out.dtype, device=q.device)
    dv = torch.zeros(vh.shape, dtype=out.dtype, device=q.device)
    for row in plan:
        if _count(row.keys) == 0:
            continue
        mask = _additive_mask(bias, pattern, row, q_len, kv_len, q.dtype, q.device)
        dq_b, dk_b, dv_b = _FUSED_BACKWARD(
            d_out[:, :, row.rows],
            qh[:, :, row.rows],
            kh[:, :, row.keys],
            vh[:, :, row.keys],
            out_h[:, :, row.rows],
            safe_lse[:, :, row.rows],
            0.0,
            False,
            attn_mask=mask,
            scale=scale,
        )
        dq[:, :, row.rows] = dq_b.to(dq.dtype)
        _add_keys(dk, dk_b.to(dk.dtype), row.keys)
        _add_keys(dv, dv_b.to(dv.dtype), row.keys)

    def per_kv_head(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        grad = grad.view(batch, kv_heads, heads // kv_heads, kv_len, -1).sum(2)
        return grad.transpose(1, 2).to(like.dtype)

    return dq.transpose(1, 2).to(q.dtype), per_kv_head(dk, k), per_kv_head(dv, v), None


def _grouped_q(t: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    batch, length, heads, dim = t.shape
    return (
        t.reshape(batch, length, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4).to(dtype)
    )


def _count(keys: slice | torch.Tensor) -> int:
    return keys.stop - keys.start if isinstance(keys, slice) else len(keys)


def _scores(qg, kg, bias, pattern, scale, score_mod, row, q_len, kv_len):
    raw = (qg[:, :, :, row.rows] @ kg[:, :, :, row.keys].transpose(-1, -2)) * scale
    return _finish_scores(raw, bias, pattern, score_mod, row, q_len, kv_len)


def _finish_scores(raw, bias, pattern, score_mod, row, q_len, kv_len):
    """score_mod, bias and mask on a ``(B, Hkv, G, rows, keys)`` block of raw scores."""
    batch, kv_heads, group, n_rows, n_keys = raw.shape
    heads = kv_heads * group
    scores = raw.reshape(batch, heads, n_rows, n_keys)
    q_idx = _positions(row.rows, raw.device)
    kv_idx = _positions(row.keys, raw.device)
    if score_mod is not None:
        scores = score_mod(scores, *score_indices(batch, heads, q_idx, kv_idx))
    if bias is not None:
        scores = scores + _bias_block(bias_4d(bias), row).to(scores.dtype)
    if pattern is not None and row.needs_mask:
        scores = scores + _pattern_mask(pattern, row, q_len, kv_len, raw.device).to(scores.dtype)
    return scores.reshape(batch, kv_heads, group, n_rows, n_keys)


def _additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, float("-inf"))


def _pattern_mask(pattern, row, q_len, kv_len, device) -> torch.Tensor:
    """The pattern on one query group as an additive float32 mask ``(H_p, rows, keys)``."""
    if row.mask is not None:
        return row.mask
    q_idx, kv_idx = _positions(row.rows, device), _positions(row.keys, device)
    return _additive(pattern.visible(q_idx, kv_idx, q_len, kv_len))


def _bias_block(bias: torch.Tensor, row: _RowGroup) -> torch.Tensor:
    block = bias[:, :, row.rows] if bias.shape[2] > 1 else bias
    return block[..., row.keys] if bias.shape[3] > 1 else block


def _accumulate_bias_grad(dbias: torch.Tensor, d_scores: torch.Tensor, row: _RowGroup) -> None:
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


def _add_keys(grad: torch.Tensor, update: torch.Tensor, keys: slice | torch.Tensor) -> None:
    if isinstance(keys, slice):
        grad[:, :, keys] += update
    else:
        grad.index_add_(2, keys, update)


def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out (B, Lq, H, Dv), lse (B, H, Lq))``; inputs ``(B, L, H, D)``.

    ``lse`` is float32 (float64 for float64 inputs).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    captured = captured_leaves(score_mod) if torch.is_grad_enabled() else ()
    groups = _head_groups(pattern, q.shape[1], k.shape[1], block)
    if groups is None:
        return _Blockwise.apply(q, k, v, bias, pattern, scale, score_mod, block, *captured)
    # Heads with different patterns: one pass per distinct pattern, each skipping its own empty
    # blocks, instead of one pass over the union of all heads' blocks.
    group_size = q.shape[2] // k.shape[2]
    outs, lses, order = [], [], []
    for sub_pattern, heads in groups:
        index = torch.tensor(heads, device=q.device)
        kv_index = index // group_size
        sub_bias = None
        if bias is not None:
            full = bias_4d(bias)
            sub_bias = full[:, index] if full.shape[1] > 1 else full
        out, lse = _Blockwise.apply(
            q[:, :, index],
            k[:, :, kv_index],
            v[:, :, kv_index],
            sub_bias,
            sub_pattern,
            scale,
            _renumber_heads(score_mod, index),
            block,
            *captured,
        )
        outs.append(out)
        lses.append(lse)
        order.extend(heads)
    inverse = torch.argsort(torch.tensor(order, device=q.device))
    return torch.cat(outs, 2)[:, :, inverse], torch.cat(lses, 1)[:, inverse]


@functools.lru_cache(maxsize=64)
def _head_groups(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int
) -> list[tuple[Pattern, list[int]]] | None:
    """Heads grouped by pattern when that saves at least a fifth of the block work."""
    per_head = pattern.head_patterns() if pattern is not None else None
    if per_head is None or len(set(per_head)) == 1:
        return None
    groups: dict[Pattern, list[int]] = {}
    for h, p in enumerate(per_head):
        groups.setdefault(p, []).append(h)
    union_work = len(per_head) * _visited_blocks(pattern, q_len, kv_len, block, union=True)
    grouped_work = sum(
        len(heads) * _visited_blocks(p, q_len, kv_len, block) for p, heads in groups.items()
    )
    return list(groups.items()) if grouped_work < 0.8 * union_work else None


def _visited_blocks(pattern: Pattern, q_len: int, kv_len: int, block: int, union=False) -> int:
    layout = pattern.block_layout(q_len, kv_len, block)
    return int((layout != EMPTY).any(0).sum()) if union else int((layout != EMPTY).sum())


def _renumber_heads(score_mod: ScoreMod | None, heads: torch.Tensor) -> ScoreMod | None:
    """``score_mod`` seen from a subset of heads: local head ``h`` is global head ``heads[h]``."""
    if score_mod is None:
        return None

    def renumbered(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, heads[h], q_idx, kv_idx)

    return renumbered


def captured_leaves(fn: object) -> tuple[torch.Tensor, ...]:
    """Tensors requiring grad that ``fn`` closes over (e.g. learnable ALiBi slopes or a relative
    position table), including the parameters of a captured ``nn.Module``. Their gradients are
    computed block by block in the backward pass."""
    if fn is None:
        return ()
    found: dict[int, torch.Tensor] = {}
    owners = [getattr(fn, "__self__", None)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            owners.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    for owner in owners:
        if isinstance(owner, torch.Tensor):
            tensors = [owner]
        elif isinstance(owner, torch.nn.Module):
            tensors = list(owner.parameters())
        else:
            continue
        for t in tensors:
            if t.requires_grad:
                found[id(t)] = t
    return tuple(found.values())
