"""Blockwise softmax attention in PyTorch: any pattern, forward and backward, on any device.

Queries are processed in groups of about ``block`` (consecutive rows, or the pattern's own
grouping: spatial tiles for neighborhoods). Each group reads exactly the keys at least one of its
queries may see, so hidden keys cost nothing and no ``Lq x Lk`` tensor is built (peak extra memory
is ``B * H * block * keys_selected``); element masks of partial groups are cached with the plan.
Within a group the softmax is exact: on CPU one call of PyTorch's fused attention kernel with the
pattern as an additive mask, otherwise the same ``masked_softmax_av`` as the reference. Backward
is FlashAttention-2 style: it keeps only ``out`` and ``lse`` and recomputes each group,

    dP = dO V^T,  dS = P * (dP - rowsum(dO * O) + dlse),  dQ = scale dS K,  dK = scale dS^T Q,
    dV = P^T dO,  dbias = dS (reduced over broadcast dims).

What keeps the CPU path close to the FLOP bound (``bench/bench_sparse.py``):

* **panels** - a pattern may name key orders in which each group's keys are one contiguous run
  (:meth:`Pattern.key_panels`; a 2-D neighborhood's band of tiles, column-major). A panel is
  gathered once into a reused buffer and its groups read slices of it in place, instead of each
  tile gathering its own window union;
* **runs** - in the forward pass, consecutive groups with equal query and key counts, the same
  mask and evenly spaced key offsets (the interior of a sliding window or of a neighborhood band,
  block-sparse rows keeping as many blocks) go to the kernel as one batch of strided views: one
  call instead of dozens. The backward kernel is faster called group by group (measured), so
  the backward pass does that, in groups twice as large;
* ``block = 32``: below 192 queries the kernel works on 32 queries at a time anyway, so groups
  of 32 cost no GEMM efficiency and cover smaller key unions than groups of 64.

Tensors captured by ``score_mod`` that require grad (a learnable relative-position table, ALiBi
slopes) get their gradients too, by local autograd on each recomputed block.

On CPU without bias or ``score_mod`` the ``native`` backend (:mod:`.tiles`, a C kernel for tiles
of 16 or 8 queries, forward and backward, computing in float32) is faster and runs through this
module's autograd Function (``native=True``); this path serves everything else: bias and
``score_mod`` with their gradients, float64, other devices, machines without a C compiler.

Both backward passes are hand-written and not differentiable: a backward pass that builds a graph
(``create_graph=True``) raises :class:`headwise._checks.Unsupported` instead of returning second
derivatives that treat the first ones as constants. The pattern hides scores with ``where``, not
by adding ``-inf``, so a NaN or ``+inf`` bias entry at a hidden key stays hidden (non-finite Q, K,
V are handled before any backend runs: :mod:`headwise.ops.attention.api`).

Thread count (``torch.set_num_threads``): on the fused CPU path (float32/bfloat16 without
``score_mod``; backward without bias or LSE gradient) out, lse, dQ, dK and dV are bitwise the
same for any number of threads (the kernel splits work by batch, head and query block and sums
each row in one order; groups are added in plan order). The step-by-step path (float64,
``score_mod``, bias or LSE gradients) multiplies blocks with ``torch.matmul``, whose BLAS may
split one product among threads in another order: there results agree to a few ulps only.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass

import torch

from headwise.ops.attention.plan_cache import PlanCache
from headwise.ops.attention.problem import (
    ScoreMod,
    apply_score_mod,
    bias_4d,
    refuse_double_backward,
    relative_position_of,
    score_indices,
)
from headwise.ops.attention.reference import compute_dtype, masked_softmax_av
from headwise.ops.attention.tiles import available as tiles_available
from headwise.ops.attention.tiles import supports as tiles_supported
from headwise.ops.attention.tiles import tiles_backward, tiles_forward
from headwise.patterns import EMPTY, Pattern, full

DEFAULT_BLOCK = 32
#: the backward pass runs groups this many times larger (PyTorch's CPU backward kernel does
#: better on 64-query groups: less overlapping dK/dV work between neighbouring groups)
BACKWARD_BLOCK_FACTOR = 2
#: partial query groups keep their masks (float32) in the cached plan up to this many entries
MASK_CACHE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class _RowGroup:
    rows: slice | torch.Tensor  # query positions processed together
    keys: slice | torch.Tensor  # every key position at least one of them may see
    panel_keys: slice | torch.Tensor  # the same keys as positions in the group's panel
    needs_mask: bool  # False when every selected key is visible to every row and head
    mask: torch.Tensor | None = None  # additive (H_p, rows, keys): 0 or -inf, when cached
    has_empty_rows: bool = True  # whether some row of some head sees none of the keys


@dataclass(frozen=True)
class _Run:
    """Consecutive groups of one panel that one forward kernel call can take as a batch: equal
    query and key counts, the same mask, and keys at evenly spaced offsets of the panel
    (``key_start + i * key_step``), so the batch is a strided view, not a copy."""

    groups: tuple[_RowGroup, ...]
    rows: slice | torch.Tensor  # the groups' query positions, concatenated
    key_start: int
    key_step: int


@dataclass(frozen=True)
class _Panel:
    """Keys gathered once (``keys``: their positions; ``None``: K itself, nothing gathered) and
    the query groups that read slices of them, also as batched runs."""

    keys: torch.Tensor | None
    groups: tuple[_RowGroup, ...]
    runs: tuple[_Run | _RowGroup, ...]


#: plans stay cached up to this many, while their masks hold at most this many float32 entries
#: (1 GiB) in all
_PLANS: PlanCache[tuple[_Panel, ...]] = PlanCache(
    max_plans=256,
    max_size=1 << 28,
    size=lambda plan: sum(row.mask.numel() for row in _groups(plan) if row.mask is not None),
)


def _plan(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int, device: str
) -> tuple[_Panel, ...]:
    key = (pattern, q_len, kv_len, block, device)
    return _PLANS.get(key, lambda: _build_plan(pattern, q_len, kv_len, block, device))


def _build_plan(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int, device: str
) -> tuple[_Panel, ...]:
    if pattern is None:
        groups = tuple(
            _RowGroup(slice(s, min(q_len, s + block)), slice(0, kv_len), slice(0, kv_len), False)
            for s in range(0, q_len, block)
        )
        return (_Panel(None, groups, _runs(list(groups), device)),)
    panels, mostly_scattered = _panels(pattern, q_len, kv_len, block, device)
    if mostly_scattered:
        # Scattered key sets (sinks beside a window) are copied once per group: groups twice as
        # large halve the copying per query, worth it unless they add much masked work.
        larger, _ = _panels(pattern, q_len, kv_len, 2 * block, device)
        if _work(larger) <= 1.15 * _work(panels):
            return larger
    return panels


def _work(panels: tuple[_Panel, ...]) -> int:
    return sum(_count(row.rows) * _count(row.keys) for row in _groups(panels))


def _panels(
    pattern: Pattern, q_len: int, kv_len: int, block: int, device: str
) -> tuple[tuple[_Panel, ...], bool]:
    """The plan's panels, and whether most groups of the pattern's own key order (no panel of
    its own) see scattered keys."""
    panels = []
    mostly_scattered = False
    budget = MASK_CACHE_ELEMENTS
    for panel_keys, query_groups in pattern.key_panels(q_len, kv_len, block):
        positions = torch.arange(kv_len) if panel_keys is None else panel_keys
        groups = []
        for rows in query_groups:
            visible = pattern.visible(_positions(rows), positions, q_len, kv_len)
            cols = torch.nonzero(visible.any(0).any(0)).flatten()
            in_panel = _as_slice(cols) if len(cols) else slice(0, 0)
            visible = visible[:, :, in_panel]
            keys = in_panel if panel_keys is None else _as_slice(panel_keys[in_panel], sort=False)
            needs_mask = not bool(visible.all())
            has_empty_rows = not bool(visible.any(-1).all())
            mask = None
            if needs_mask and visible.numel() <= budget:
                # Evaluating the predicate costs as much as the scores; do it once per plan.
                budget -= visible.numel()
                mask = _additive(visible).to(device)
            groups.append(
                _RowGroup(
                    _to(rows, device),
                    _to(keys, device),
                    _to(in_panel, device),
                    needs_mask,
                    mask,
                    has_empty_rows,
                )
            )
        if panel_keys is None:
            scattered_rows = sum(isinstance(row.keys, torch.Tensor) for row in groups)
            mostly_scattered = 2 * scattered_rows > len(groups)
            groups, scattered = _gather_scattered(groups, kv_len, device)
            panels.extend(scattered)
        panels.append(_Panel(_to(panel_keys, device), tuple(groups), _runs(groups, device)))
    return tuple(panels), mostly_scattered


def _gather_scattered(
    groups: list[_RowGroup], kv_len: int, device: str
) -> tuple[list[_RowGroup], list[_Panel]]:
    """Groups whose keys are no contiguous range (block-sparse rows, sinks beside a window) move
    to panels holding their key sets back to back, sorted by size, so that groups of equal size
    run as one batched call instead of one gather and one call each. A panel holds at most
    ``kv_len`` keys (one K's worth), so the gather buffer stays small and in cache."""
    scattered = sorted(
        (row for row in groups if isinstance(row.keys, torch.Tensor)), key=lambda r: len(r.keys)
    )
    if len(scattered) < 2:
        return groups, []
    kept = [row for row in groups if not isinstance(row.keys, torch.Tensor)]
    chunks: list[list[_RowGroup]] = [[]]
    for row in scattered:
        if chunks[-1] and sum(len(r.keys) for r in chunks[-1]) + len(row.keys) > kv_len:
            chunks.append([])
        chunks[-1].append(row)
    panels = []
    for chunk in chunks:
        starts = itertools.accumulate((len(row.keys) for row in chunk), initial=0)
        moved = [
            dataclasses.replace(row, panel_keys=slice(start, start + len(row.keys)))
            for row, start in zip(chunk, starts)
        ]
        keys = torch.cat([row.keys for row in chunk])
        panels.append(_Panel(keys, tuple(moved), _runs(moved, device)))
    return kept, panels


def _runs(groups: list[_RowGroup], device: str) -> tuple[_Run | _RowGroup, ...]:
    """Split ``groups`` into maximal batchable runs; a group that batches with no neighbour
    stays as it is."""
    runs: list[list[_RowGroup]] = []
    for row in groups:
        if runs and _extends(runs[-1], row):
            runs[-1].append(row)
        else:
            runs.append([row])
    return tuple(_as_run(run, device) if len(run) > 1 else run[0] for run in runs)


def _extends(run: list[_RowGroup], row: _RowGroup) -> bool:
    last = run[-1]
    if not (isinstance(row.panel_keys, slice) and isinstance(last.panel_keys, slice)):
        return False
    if _count(row.rows) != _count(last.rows) or _count(row.keys) != _count(last.keys):
        return False
    if _count(row.keys) == 0 or row.needs_mask != last.needs_mask:
        return False
    if row.needs_mask and (
        row.mask is None or last.mask is None or not torch.equal(row.mask, last.mask)
    ):
        return False
    step = row.panel_keys.start - last.panel_keys.start
    if len(run) > 1 and step != last.panel_keys.start - run[-2].panel_keys.start:
        return False
    return step >= 0


def _as_run(run: list[_RowGroup], device: str) -> _Run:
    starts = [row.panel_keys.start for row in run]
    if all(isinstance(row.rows, slice) for row in run) and all(
        a.rows.stop == b.rows.start for a, b in itertools.pairwise(run)
    ):
        rows = slice(run[0].rows.start, run[-1].rows.stop)
    else:
        rows = torch.cat([_positions(row.rows, torch.device(device)) for row in run])
    step = starts[1] - starts[0]
    return _Run(tuple(run), rows, starts[0], step)


def _to(index, device: str):
    return index.to(device) if isinstance(index, torch.Tensor) else index


def _as_slice(index: torch.Tensor, sort: bool = True) -> slice | torch.Tensor:
    """A slice when ``index`` (sorted, unless ``sort=False``) is one increasing contiguous range,
    else the index itself."""
    if not sort:
        if len(index) and bool((index == index[0] + torch.arange(len(index))).all()):
            return slice(int(index[0]), int(index[-1]) + 1)
        return index
    if int(index[-1] - index[0]) + 1 == len(index):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _positions(index: slice | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(index, slice):
        return torch.arange(index.start, index.stop, device=device)
    return index


def _groups(plan: tuple[_Panel, ...]):
    return (row for panel in plan for row in panel.groups)


class _Blockwise(torch.autograd.Function):
    """``head_groups``: ``((pattern, heads), ...)``; ``heads`` ``None`` means every head. Each
    group runs on views of its heads and writes into one output, so the backward pass fills one
    gradient per input instead of a zero-padded one per group."""

    @staticmethod
    def forward(ctx, q, k, v, bias, head_groups, scale, score_mod, block, native, *captured):
        ctx.fused = _use_fused(q, v, score_mod)
        ctx.native = native
        if native:
            relative = relative_position_of(score_mod, head_groups[0][0])
            out, lse = _native_forward(q, k, v, head_groups, scale, relative, bias)
            ctx.save_for_backward(q, k, v, bias, out, lse, *captured)
            ctx.params = (head_groups, scale, score_mod, block)
            # which captured tensor (if any) is the relative-position table
            ctx.table_at = [relative is not None and c is relative.table for c in captured]
            return out, lse
        parts = []
        for pattern, heads in head_groups:
            qs, ks, vs, bs = _head_views(q, k, v, bias, heads)
            plan = _plan(pattern, q.shape[1], k.shape[1], block, str(q.device))
            if ctx.fused:
                parts.append(_fused_forward(qs, ks, vs, bs, pattern, scale, plan))
            else:
                sub_mod = _renumber_heads(score_mod, heads)
                parts.append(_stepwise_forward(qs, ks, vs, bs, pattern, scale, sub_mod, plan))
        if head_groups[0][1] is None:
            out, lse = parts[0]
        else:
            out = parts[0][0].new_empty(*q.shape[:3], v.shape[3])
            lse = parts[0][1].new_empty(q.shape[0], q.shape[2], q.shape[1])
            for (_, heads), (sub_out, sub_lse) in zip(head_groups, parts):
                _put_rows(out, _head_index(heads, out.device), sub_out, 2)
                _put_rows(lse, _head_index(heads, lse.device), sub_lse, 1)
        ctx.save_for_backward(q, k, v, bias, out, lse, *captured)
        ctx.params = (head_groups, scale, score_mod, block)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        refuse_double_backward("the 'native' backend" if ctx.native else "the 'blockwise' backend")
        q, k, v, bias, out, lse, *captured = ctx.saved_tensors
        bias = bias.detach() if bias is not None else None
        head_groups, scale, score_mod, block = ctx.params
        if ctx.native:
            relative = relative_position_of(score_mod, head_groups[0][0])
            parts = (grad_out, grad_lse, q, k, v, out, lse)
            *grads, d_table = _native_backward(*parts, head_groups, scale, relative, bias)
            d_captured = [
                d_table.to(c.dtype) if at else None for c, at in zip(captured, ctx.table_at)
            ]
            return *grads, None, None, None, None, None, None, *d_captured
        # Backward in groups twice as large: the kernel's dK, dV per group overlap less.
        plans = [
            _plan(pattern, q.shape[1], k.shape[1], BACKWARD_BLOCK_FACTOR * block, str(q.device))
            for pattern, _ in head_groups
        ]
        need_bias_grad = bias is not None and ctx.needs_input_grad[3]
        fused = ctx.fused and not need_bias_grad and (grad_lse is None or not grad_lse.any())
        if head_groups[0][1] is None:
            (pattern, _), plan = head_groups[0], plans[0]
            parts = (grad_out, grad_lse, q, k, v, bias, out, lse)
            grads = _backward(
                fused, parts, pattern, scale, score_mod, plan, captured, need_bias_grad
            )
            grad_q, grad_k, grad_v, grad_bias, d_captured = grads
            return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None, *d_captured
        grad_q = torch.empty_like(q)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        grad_bias = torch.zeros_like(bias) if need_bias_grad else None
        d_captured = [torch.zeros_like(t) for t in captured]
        group_size = q.shape[2] // k.shape[2]
        for (pattern, heads), plan in zip(head_groups, plans):
            parts = (
                _select_heads(grad_out, heads, 2),
                None if grad_lse is None else _select_heads(grad_lse, heads, 1),
                *_head_views(q, k, v, bias, heads),
                _select_heads(out, heads, 2),
                _select_heads(lse, heads, 1),
            )
            sub_mod = _renumber_heads(score_mod, heads)
            grads = _backward(fused, parts, pattern, scale, sub_mod, plan, captured, need_bias_grad)
            dq, dk, dv, dbias, d_leaves = grads
            kv_heads = [h // group_size for h in heads]
            _put_rows(grad_q, _head_index(heads, grad_q.device), dq, 2)
            # GQA: heads sharing a K/V head repeat in kv_heads, and their dK, dV add up
            _add_rows(grad_k, _head_index(kv_heads, grad_k.device), dk, 2)
            _add_rows(grad_v, _head_index(kv_heads, grad_v.device), dv, 2)
            if dbias is not None:
                full = bias_4d(grad_bias)
                if full.shape[1] > 1:
                    _put_rows(full, _head_index(heads, full.device), dbias, 1)
                else:
                    full += dbias
            for total, part in zip(d_captured, d_leaves):
                total += part
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None, *d_captured


def _native_forward(q, k, v, head_groups, scale, relative, bias):
    """The tile kernel, all head groups in one call."""
    groups = [(pattern or full(), heads) for pattern, heads in head_groups]
    return tiles_forward(q, k, v, groups, scale, relative=relative, bias=bias)


def _native_backward(grad_out, grad_lse, q, k, v, out, lse, head_groups, scale, relative, bias):
    """``(dq, dk, dv, d_table)``; ``d_table`` is ``None`` without a relative-position table."""
    grads = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if grad_lse is not None and not grad_lse.any():
        grad_lse = None
    groups = [(pattern or full(), heads) for pattern, heads in head_groups]
    d_table = tiles_backward(
        grad_out, grad_lse, q, k, v, out, lse, groups, scale, grads, relative, bias
    )
    return *grads, d_table


def _head_views(q, k, v, bias, heads):
    """q, k, v and bias restricted to the query heads ``heads`` (``None``: all of them)."""
    if heads is None:
        return q, k, v, bias
    kv_heads = [h // (q.shape[2] // k.shape[2]) for h in heads]
    if bias is not None:
        full = bias_4d(bias)
        bias = _select_heads(full, heads, 1) if full.shape[1] > 1 else full
    return (
        _select_heads(q, heads, 2),
        _select_heads(k, kv_heads, 2),
        _select_heads(v, kv_heads, 2),
        bias,
    )


def _backward(fused, parts, pattern, scale, score_mod, plan, captured, need_bias_grad):
    """Gradients ``(dq, dk, dv, dbias, d_captured)`` of one head group."""
    grad_out, grad_lse, q, k, v, bias, out, lse = parts
    if fused:
        dq, dk, dv = _fused_backward(grad_out, q, k, v, bias, pattern, scale, plan, out, lse)
        return dq, dk, dv, None, [torch.zeros_like(t) for t in captured]
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
    for row in _groups(plan):
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
        _add_rows(dk, row.keys, dk_sel, 2)
        _add_rows(dv, row.keys, dv_sel, 2)
    grad_q = dq.reshape(batch, heads, q_len, -1).transpose(1, 2).to(q.dtype)
    grad_k = dk.transpose(1, 2).to(k.dtype)
    grad_v = dv.transpose(1, 2).to(v.dtype)
    grad_bias = dbias.reshape(bias.shape).to(bias.dtype) if dbias is not None else None
    return grad_q, grad_k, grad_v, grad_bias, d_captured


def _stepwise_forward(q, k, v, bias, pattern, scale, score_mod, plan):
    """The softmax written out group by group: ``(out (B, Lq, H, Dv), lse (B, H, Lq))``."""
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype)
    # (B, Hkv, G, L, D) so GQA needs no copy of K/V per query head.
    qg = _grouped_q(q, kv_heads, dtype)
    kg = k.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
    vg = v.permute(0, 2, 1, 3).to(dtype).unsqueeze(2)
    out = q.new_zeros(batch, kv_heads, heads // kv_heads, q_len, v.shape[3], dtype=dtype)
    lse = torch.full((batch, heads, q_len), float("-inf"), dtype=dtype, device=q.device)
    for row in _groups(plan):
        if _count(row.keys) == 0:
            continue
        scores = _scores(qg, kg, bias, pattern, scale, score_mod, row, q_len, kv_len)
        block_out, block_lse = masked_softmax_av(scores, vg[:, :, :, row.keys])
        out[:, :, :, row.rows] = block_out
        lse[:, :, row.rows] = block_lse.reshape(batch, heads, -1)
    return out.reshape(batch, heads, q_len, -1).transpose(1, 2), lse


# PyTorch's fused CPU attention kernel with its log-sum-exp (what SDPA runs on CPU). Each query
# group is one call over its keys with the pattern as an additive mask: several times faster than
# the step-by-step softmax above, which remains for score_mod, bias gradients, LSE gradients and
# other devices. The kernel takes (B, H, L, D) views with any strides, so groups read slices of
# K, V (or of a panel gathered once) in place; only index-selected keys are copied.
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
        # where, not +: a NaN or +inf bias entry at a hidden key must stay hidden
        mask = block if mask is None else torch.where(torch.isneginf(mask), float("-inf"), block)
    return mask


def _take(t: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    """Positions ``index`` of a ``(B, L, H, D)`` tensor as a ``(B, H, n, D)`` view (a slice) or
    copy (an index)."""
    part = t[:, index] if isinstance(index, slice) else t.index_select(1, index)
    return part.transpose(1, 2)


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // t.shape[2]
    return t.repeat_interleave(group, 2) if group > 1 else t


class _PanelGather:
    """Gathers each panel's keys of ``k`` and ``v`` (``(B, L, H, D)``) into one buffer reused
    by every panel: fresh multi-megabyte allocations each cost a round of page faults."""

    def __init__(self, plan: tuple[_Panel, ...], k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        longest = max((len(p.keys) for p in plan if p.keys is not None), default=0)
        self.k_buf = k.new_empty(k.shape[0], longest, *k.shape[2:])
        self.v_buf = v.new_empty(v.shape[0], longest, *v.shape[2:])

    def __call__(self, panel: _Panel) -> tuple[torch.Tensor, torch.Tensor]:
        if panel.keys is None:
            return self.k, self.v
        n = len(panel.keys)
        k_panel, v_panel = self.k_buf[:, :n], self.v_buf[:, :n]
        torch.index_select(self.k, 1, panel.keys, out=k_panel)
        torch.index_select(self.v, 1, panel.keys, out=v_panel)
        return k_panel, v_panel

    def zeros(self, panel: _Panel) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed panel-shaped buffers (gradient accumulators); ``k``, ``v`` themselves for an
        ungathered panel."""
        if panel.keys is None:
            return self.k, self.v
        n = len(panel.keys)
        return self.k_buf[:, :n].zero_(), self.v_buf[:, :n].zero_()


def _run_rows(run: _Run, t: torch.Tensor, b: int) -> torch.Tensor:
    """The run's query rows of batch element ``b`` of a ``(B, L, H, D)`` tensor as
    ``(G, H, n, D)``."""
    part = t[b, run.rows] if isinstance(run.rows, slice) else t[b].index_select(0, run.rows)
    return part.unflatten(0, (len(run.groups), -1)).transpose(1, 2)


def _run_keys(run: _Run, panel: torch.Tensor, b: int) -> torch.Tensor:
    """The run's keys of batch element ``b`` of a ``(B, P, H, D)`` panel as a strided
    ``(G, H, n, D)`` view: group ``i`` reads positions ``key_start + i * key_step`` onwards."""
    t = panel[b]
    n_keys = _count(run.groups[0].keys)
    size = (len(run.groups), n_keys, *t.shape[1:])
    stride = (run.key_step * t.stride(0), *t.stride())
    offset = t.storage_offset() + run.key_start * t.stride(0)
    return t.as_strided(size, stride, offset).transpose(1, 2)


def _run_mask(run: _Run, dtype: torch.dtype) -> torch.Tensor | None:
    first = run.groups[0]
    return first.mask.to(dtype)[None] if first.needs_mask else None


def _put_rows(t: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor, dim: int):
    """Write ``values`` at positions ``rows`` along ``dim`` of ``t``."""
    values = values.to(t.dtype)
    if isinstance(rows, slice):
        t[(slice(None),) * dim + (rows,)] = values
    else:
        t.index_copy_(dim, rows, values)


def _add_rows(t: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor, dim: int):
    """Add ``values`` at positions ``rows`` along ``dim`` of ``t``."""
    values = values.to(t.dtype)
    if isinstance(rows, slice):
        t[(slice(None),) * dim + (rows,)] += values
    else:
        t.index_add_(dim, rows, values)


def _run_forward(run, q, k_panel, v_panel, scale, out, lse):
    mask = _run_mask(run, q.dtype)
    for b in range(q.shape[0]):
        block_out, block_lse = _FUSED(
            _run_rows(run, q, b),
            _run_keys(run, k_panel, b),
            _run_keys(run, v_panel, b),
            0.0,
            False,
            attn_mask=mask,
            scale=scale,
        )
        if mask is not None and any(row.has_empty_rows for row in run.groups):
            block_lse = block_lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
        _put_rows(out[b], run.rows, block_out.transpose(1, 2).flatten(0, 1), 0)
        _put_rows(lse[b], run.rows, block_lse.transpose(0, 1).flatten(1), 1)


def _fused_forward(q, k, v, bias, pattern, scale, plan):
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    # index_select copies a strided source whole on every call: make each contiguous once
    q = q.contiguous()
    k, v = _repeat_kv(k, heads).contiguous(), _repeat_kv(v, heads).contiguous()
    out = q.new_zeros(batch, q_len, heads, v.shape[3])
    lse = torch.full((batch, heads, q_len), float("-inf"), device=q.device)
    gather = _PanelGather(plan, k, v)
    for panel in plan:
        k_panel, v_panel = gather(panel)
        # a bias differs from group to group: no batched runs then
        for row in panel.runs if bias is None else panel.groups:
            if isinstance(row, _Run):
                _run_forward(row, q, k_panel, v_panel, scale, out, lse)
                continue
            if _count(row.keys) == 0:
                continue
            mask = _additive_mask(bias, pattern, row, q_len, kv_len, q.dtype, q.device)
            block_out, block_lse = _FUSED(
                _take(q, row.rows),
                _take(k_panel, row.panel_keys),
                _take(v_panel, row.panel_keys),
                0.0,
                False,
                attn_mask=mask,
                scale=scale,
            )
            if mask is not None and (row.has_empty_rows or bias is not None):
                # the kernel reports 0, not -inf, for rows that see no key
                block_lse = block_lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
            _put_rows(out, row.rows, block_out.transpose(1, 2), 1)
            _put_rows(lse, row.rows, block_lse, 2)
    return out, lse


def _fused_backward(grad_out, q, k, v, bias, pattern, scale, plan, out, lse):
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype)
    # index_select copies a strided source whole on every call: make each contiguous once
    k_rep = _repeat_kv(k, heads).contiguous()
    v_rep = _repeat_kv(v, heads).contiguous()
    d_out = grad_out.to(q.dtype).contiguous()
    out = out.to(q.dtype).contiguous()
    q = q.contiguous()
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k_rep.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v_rep.shape, dtype=dtype, device=q.device)
    gather = _PanelGather(plan, k_rep, v_rep)
    grads = _PanelGather(plan, dk, dv)
    for panel in plan:
        k_panel, v_panel = gather(panel)
        dk_panel, dv_panel = grads.zeros(panel)
        for row in panel.groups:
            if _count(row.keys) == 0:
                continue
            mask = _additive_mask(bias, pattern, row, q_len, kv_len, q.dtype, q.device)
            rows = row.rows
            dq_b, dk_b, dv_b = _FUSED_BACKWARD(
                _take(d_out, rows),
                _take(q, rows),
                _take(k_panel, row.panel_keys),
                _take(v_panel, row.panel_keys),
                _take(out, rows),
                safe_lse[:, :, rows],
                0.0,
                False,
                attn_mask=mask,
                scale=scale,
            )
            _put_rows(dq, rows, dq_b.transpose(1, 2), 1)
            _add_rows(dk_panel, row.panel_keys, dk_b.transpose(1, 2), 1)
            _add_rows(dv_panel, row.panel_keys, dv_b.transpose(1, 2), 1)
        if panel.keys is not None:
            dk.index_add_(1, panel.keys, dk_panel)
            dv.index_add_(1, panel.keys, dv_panel)

    def per_kv_head(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return grad.view(batch, kv_len, kv_heads, heads // kv_heads, -1).sum(3).to(like.dtype)

    return dq.to(q.dtype), per_kv_head(dk, k), per_kv_head(dv, v)


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
        scores = apply_score_mod(
            score_mod, scores, *score_indices(batch, heads, q_idx, kv_idx)
        )
    if bias is not None:
        scores = scores + _bias_block(bias_4d(bias), row).to(scores.dtype)
    if pattern is not None and row.needs_mask:
        hidden = torch.isneginf(_pattern_mask(pattern, row, q_len, kv_len, raw.device))
        # where, not +: a hidden NaN or +inf score (from the bias) must not survive the mask
        scores = torch.where(hidden, float("-inf"), scores)
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
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out (B, Lq, H, Dv), lse (B, H, Lq))``; inputs ``(B, L, H, D)``.

    ``lse`` is float32 (float64 for float64 inputs). ``native=True`` runs both passes on
    headwise's C tile kernel (:mod:`headwise.ops.attention.tiles`: float32 on CPU; a bias without
    gradient; no ``score_mod`` but a relative-position table of the pattern).
    """
    plain_mod = score_mod is None or relative_position_of(score_mod, pattern) is not None
    fixed_bias = bias is None or not (bias.requires_grad and torch.is_grad_enabled())
    if native and not (fixed_bias and plain_mod and tiles_supported(q, k, v)):
        raise ValueError(
            "native=True needs float32 CPU tensors, a bias without gradient, no score_mod but a "
            f"relative-position table, and the compiled tile kernel (available: "
            f"{tiles_available()}); got {q.dtype} on {q.device}, bias requires grad: "
            f"{not fixed_bias}, score_mod={score_mod is not None}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    captured = captured_leaves(score_mod) if torch.is_grad_enabled() else ()
    groups = _head_groups(pattern, q.shape[1], k.shape[1], block)
    # Heads with different patterns: one pass per distinct pattern, each skipping its own empty
    # blocks, instead of one pass over the union of all heads' blocks.
    head_groups = ((pattern, None),) if groups is None else tuple((p, tuple(h)) for p, h in groups)
    return _Blockwise.apply(q, k, v, bias, head_groups, scale, score_mod, block, native, *captured)


def _head_index(heads, device: torch.device) -> slice | torch.Tensor:
    """``heads`` as a slice when evenly spaced and increasing (selected as a strided view), else
    as an index tensor."""
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    if step > 0 and list(heads) == list(range(heads[0], heads[-1] + 1, step)):
        return slice(heads[0], heads[-1] + 1, step)
    return torch.tensor(heads, device=device)


def _select_heads(t: torch.Tensor, heads, dim: int) -> torch.Tensor:
    """Heads ``heads`` of ``t`` along ``dim``: a strided view when evenly spaced, else a copy."""
    where = _head_index(heads, t.device)
    if isinstance(where, slice):
        return t[(slice(None),) * dim + (where,)]
    return t.index_select(dim, where)


@functools.lru_cache(maxsize=64)
def _head_groups(
    pattern: Pattern | None, q_len: int, kv_len: int, block: int
) -> list[tuple[Pattern, list[int]]] | None:
    """Heads grouped by pattern when that saves at least a fifth of the block work (the cached
    list is shared by every caller and thread: read it, never change it)."""
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


def _renumber_heads(score_mod: ScoreMod | None, heads) -> ScoreMod | None:
    """``score_mod`` seen from a subset of heads: local head ``h`` is global head ``heads[h]``."""
    if score_mod is None or heads is None:
        return score_mod

    def renumbered(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, torch.tensor(heads, device=h.device)[h], q_idx, kv_idx)

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
