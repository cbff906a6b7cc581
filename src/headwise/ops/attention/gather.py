"""Attention over an explicit list of keys per query (instance-dependent sparsity).

    o_i = sum_t softmax_t(scale q_i . k_{idx[i, t]}) v_{idx[i, t]}     over t with valid[i, t]

``index`` ``(B, H, Lq, K)`` names, for every batch element, head and query, the ``K`` key
positions it attends to (e.g. Sparsifiner's top-k connectivity mask), so the work is
``O(Lq K D)`` instead of ``O(Lq Lk D)`` and may differ per batch element, which a
:mod:`headwise.patterns` object (batch-agnostic) cannot express. Queries are processed in chunks;
the backward pass recomputes each chunk from the saved log-sum-exp, so memory stays
``O(chunk K D)`` beyond the inputs. Rows with no valid key give zeros and LSE = -inf.
Non-finite Q, K, V follow :func:`headwise.ops.attention.attention`'s rule: a bad key or value
sets to NaN exactly the rows that give it a positive weight. No double backward.
"""

from __future__ import annotations

import torch

from headwise._checks import check_real
from headwise.ops.attention.blockwise.heads import heads_first
from headwise.ops.attention.nonfinite import has_non_finite, run_poisoned
from headwise.ops.attention.problem import refuse_double_backward
from headwise.ops.attention.reference import compute_dtype, masked_softmax_av

_CHUNK = 256


def _gather_keys(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, H, Lk, D)`` gathered at ``index`` ``(B, H, n, K)`` -> ``(B, H, n, K, D)``."""
    batch, heads, n, count = index.shape
    flat = index.reshape(batch, heads, n * count, 1).expand(-1, -1, -1, t.shape[-1])
    return t.gather(2, flat).view(batch, heads, n, count, t.shape[-1])


def _scatter_keys(total: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``total[b, h, index[b, h, i, t]] += values[b, h, i, t]`` for ``(B, H, Lk, D)`` totals."""
    batch, heads, n, count = index.shape
    flat = index.reshape(batch, heads, n * count, 1).expand(-1, -1, -1, total.shape[-1])
    total.scatter_add_(2, flat, values.reshape(batch, heads, n * count, -1))


class _Gathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, valid, scale):
        dtype = compute_dtype(q.dtype)
        qh, kh, vh = (t.to(dtype) for t in heads_first(q, k, v))
        out = torch.empty(*qh.shape[:3], vh.shape[-1], dtype=dtype, device=q.device)
        lse = torch.empty(qh.shape[:3], dtype=dtype, device=q.device)
        for rows in _chunks(q.shape[1]):
            scores = _chunk_scores(qh, kh, index, valid, scale, rows)
            chunk_out, chunk_lse = masked_softmax_av(
                scores[..., None, :], _gather_keys(vh, index[:, :, rows])
            )
            out[:, :, rows] = chunk_out.squeeze(-2)
            lse[:, :, rows] = chunk_lse.squeeze(-1)
        ctx.save_for_backward(q, k, v, index, valid, out, lse)
        ctx.scale = scale
        return out.transpose(1, 2).to(q.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        refuse_double_backward("gathered_attention")
        q, k, v, index, valid, out, lse = ctx.saved_tensors
        dtype = out.dtype
        heads, kv_heads = q.shape[2], k.shape[2]
        qh, kh, vh = (t.to(dtype) for t in heads_first(q, k, v))
        dout = grad_out.transpose(1, 2).to(dtype)
        delta = (dout * out).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(dtype)
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        dq = torch.zeros_like(qh)
        dk = torch.zeros_like(kh)
        dv = torch.zeros_like(vh)
        for rows in _chunks(q.shape[1]):
            chunk_index = index[:, :, rows]
            scores = _chunk_scores(qh, kh, index, valid, ctx.scale, rows)
            probs = torch.exp(scores - safe_lse[:, :, rows, None])  # (B, H, n, K)
            d_out = dout[:, :, rows]
            _scatter_keys(dv, chunk_index, probs[..., None] * d_out[:, :, :, None, :])
            d_probs = (_gather_keys(vh, chunk_index) @ d_out[..., None]).squeeze(-1)
            d_scores = probs * (d_probs - delta[:, :, rows, None]) * ctx.scale
            keys = _gather_keys(kh, chunk_index)
            dq[:, :, rows] = (d_scores[..., None, :] @ keys).squeeze(-2)
            _scatter_keys(dk, chunk_index, d_scores[..., None] * qh[:, :, rows, None, :])
        group = heads // kv_heads

        def to_input(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            grad = grad.view(grad.shape[0], kv_heads, group, *grad.shape[2:]).sum(2)
            return grad.transpose(1, 2).to(like.dtype)

        return dq.transpose(1, 2).to(q.dtype), to_input(dk, k), to_input(dv, v), None, None, None


def _chunks(length: int):
    for start in range(0, length, _CHUNK):
        yield slice(start, min(length, start + _CHUNK))


def _chunk_scores(qh, kh, index, valid, scale, rows):
    keys = _gather_keys(kh, index[:, :, rows])  # (B, H, n, K, D)
    scores = (keys @ qh[:, :, rows, :, None]).squeeze(-1) * scale
    return scores.masked_fill(~valid[:, :, rows], float("-inf"))


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Attention of each query over its own ``K`` keys.

    Args:
        q, k, v: ``(B, Lq, H, D)``, ``(B, Lk, H_kv, D)``, ``(B, Lk, H_kv, Dv)``.
        index: ``(B, H, Lq, K)`` integer key positions in ``[0, Lk)``.
        valid: optional ``(B, H, Lq, K)`` bool; ``False`` entries are ignored (ragged rows).
        scale: default ``1 / sqrt(D)``.
    Returns:
        ``(B, Lq, H, Dv)``, and the LSE ``(B, H, Lq)`` when ``return_lse``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, L, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    batch, q_len, heads, _ = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != batch or heads % k.shape[2]:
        raise ValueError(
            f"k and v must be (B, Lk, H_kv, D) with H_kv dividing {heads}; got {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if index.dim() != 4 or tuple(index.shape[:3]) != (batch, heads, q_len):
        raise ValueError(
            f"index must be (B, H, Lq, K) = ({batch}, {heads}, {q_len}, K); got "
            f"{tuple(index.shape)}"
        )
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be an integer tensor; got {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= k.shape[1]):
        raise ValueError(
            f"index entries must lie in [0, Lk={k.shape[1]}); got range "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    if valid is None:
        valid = torch.ones(index.shape, dtype=torch.bool, device=index.device)
    elif valid.shape != index.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor shaped like index {tuple(index.shape)}; got "
            f"{valid.dtype} {tuple(valid.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else check_real("scale", scale)
    index = index.long()

    def run(q, k, v, *_):
        return _Gathered.apply(q, k, v, index, valid, scale)

    # each row sees only its own keys: attention's non-finite rule applies (a bad key or value
    # poisons the rows that give it weight, no other)
    if has_non_finite(q, k, v):
        out, lse = run_poisoned(run, q, k, v, None, scale, None, None)
    else:
        out, lse = run(q, k, v)
    return (out, lse) if return_lse else out
