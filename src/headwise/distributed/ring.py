"""Ring attention (context parallelism): exact softmax attention over a sequence sharded on ranks.

Rank ``r`` of ``P`` holds the queries, keys and values of its shard (see
:mod:`headwise.distributed.sharding` for the layouts and the padding rule). For steps
``s = 0 .. P-1`` it holds the K/V shard of rank ``(r - s) mod P``, attends its queries to it with
the global pattern evaluated at the two shards' positions, and merges the partial result
(:func:`headwise.ops.attention.merge_partials`)::

    lse = logaddexp(lse_a, lse_b)
    out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse)        (empty rows: 0 and -inf)

while the K/V shard already travels to rank ``r + 1`` (``batch_isend_irecv``), so transfer
overlaps compute. Steps whose block the pattern leaves empty (later shards under causal) are
skipped; with the zig-zag layout every rank then does the same work.

Backward circulates K/V again together with their gradient accumulators: each rank adds the
``dK, dV`` of its queries against the shard it holds and passes both on; after ``P`` shifts each
accumulator is back at its owner. Per block, the gradient of the merged result is recovered from
the block's own ``(out_s, lse_s)`` (recomputed, as FlashAttention recomputes scores)::

    w_s = exp(lse_s - lse),  dout_s = w_s dout,  dlse_s = w_s (rowsum(dout * (out_s - out)) + dlse)

which makes every block's ``dS = P (dout V^T - rowsum(dout * out) + dlse)`` with the global ``P``.
Memory per rank is ``O(L / P)``; each step moves ``2 (L / P) H_kv D`` elements per batch row.

After Liu et al., "Ring Attention with Blockwise Transformers" (2023); zig-zag balancing as in
Megatron-LM's context parallelism and Brandon et al., "Striped Attention" (2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.distributed._comm import PeerTimeoutError, ProcessGroup, Ring, rank_and_size
from headwise.distributed.sharding import Layout, block_pattern, padded_length, shard_runs
from headwise.ops.attention import Backend, attention, merge_partials
from headwise.patterns import Pattern

_KV_TAG, _GRAD_TAG = 0, 1


@dataclass(frozen=True)
class _Spec:
    pattern: Pattern | None
    seq_len: int
    layout: Layout
    scale: float | None
    backend: Backend
    group: ProcessGroup | None
    timeout: float | None

    def block(self, rank: int, world: int, source: int) -> tuple[Pattern | None, bool]:
        return block_pattern(
            self.pattern,
            self.seq_len,
            shard_runs(self.seq_len, world, rank, self.layout),
            shard_runs(self.seq_len, world, source, self.layout),
        )


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # One message per step: K and V travel together.
    return torch.cat((k.reshape(-1), v.reshape(-1)))


def _unpack(flat: torch.Tensor, k_shape, v_shape) -> tuple[torch.Tensor, torch.Tensor]:
    k_numel = k_shape.numel()
    return flat[:k_numel].view(k_shape), flat[k_numel:].view(v_shape)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: _Spec):
        ring = Ring(spec.group, spec.timeout, "ring_attention")
        flat = _pack(k, v)
        out = lse = None
        for step in range(ring.size):
            pending = ring.shift(flat, _KV_TAG, "K/V") if step < ring.size - 1 else None
            pattern, visible = spec.block(ring.rank, ring.size, (ring.rank - step) % ring.size)
            if visible:
                k_s, v_s = _unpack(flat, k.shape, v.shape)
                out_s, lse_s = attention(
                    q, k_s, v_s, pattern, scale=spec.scale, return_lse=True, backend=spec.backend
                )
                out, lse = merge_partials(out, lse, out_s, lse_s)
            if pending is not None:
                flat = pending.result()
        if out is None:  # this shard's queries see nothing at all
            lse_dtype = torch.promote_types(q.dtype, torch.float32)
            out = q.new_zeros(*q.shape[:3], v.shape[3], dtype=lse_dtype)
            lse = torch.full(
                (q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=lse_dtype
            ).to(q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        spec: _Spec = ctx.spec
        ring = Ring(spec.group, spec.timeout, "ring_attention backward")
        acc = out.dtype
        grad_out = grad_out.to(acc)
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        grad_q = torch.zeros_like(q, dtype=acc)
        flat = _pack(k, v)
        pending_grad = None
        for step in range(ring.size):
            pending = ring.shift(flat, _KV_TAG, "K/V") if step < ring.size - 1 else None
            pattern, visible = spec.block(ring.rank, ring.size, (ring.rank - step) % ring.size)
            grads = None
            if visible:
                k_s, v_s = _unpack(flat, k.shape, v.shape)
                dq, dk, dv = _block_grads(
                    q, k_s, v_s, pattern, spec, out, safe_lse, grad_out, grad_lse
                )
                grad_q += dq
                grads = (dk, dv)
            # The accumulator arrives while this block was computed; add into it in place.
            if pending_grad is None:
                grad_flat = torch.zeros(flat.numel(), dtype=acc, device=flat.device)
            else:
                grad_flat = pending_grad.result()
            if grads is not None:
                grad_k, grad_v = _unpack(grad_flat, k.shape, v.shape)
                grad_k += grads[0]
                grad_v += grads[1]
            pending_grad = ring.shift(grad_flat, _GRAD_TAG, "dK/dV")
            if pending is not None:
                flat = pending.result()
        grad_k, grad_v = _unpack(pending_grad.result(), k.shape, v.shape)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None


def _block_grads(q, k_s, v_s, pattern, spec, out, safe_lse, grad_out, grad_lse):
    """Gradients of the merged output with respect to one block's ``q``, ``k_s``, ``v_s``."""
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k_s, v_s))
        out_s, lse_s = attention(
            q_, k_, v_, pattern, scale=spec.scale, return_lse=True, backend=spec.backend
        )
    weight = torch.exp(lse_s.detach() - safe_lse)  # (B, H, L); 0 for rows the block misses
    weight_rows = weight.transpose(1, 2).unsqueeze(-1)
    d_out_s = grad_out * weight_rows
    drift = (grad_out * (out_s.detach().to(out.dtype) - out)).sum(-1).transpose(1, 2)
    d_lse_s = weight * (drift if grad_lse is None else drift + grad_lse.to(weight.dtype))
    return torch.autograd.grad(
        (out_s, lse_s), (q_, k_, v_), (d_out_s.to(out_s.dtype), d_lse_s.to(lse_s.dtype))
    )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    seq_len: int | None = None,
    layout: Layout = "zigzag",
    scale: float | None = None,
    return_lse: bool = False,
    backend: Backend = "auto",
    group: ProcessGroup | None = None,
    timeout: float | None = None,
):
    """Softmax attention of a sequence sharded over the ranks of ``group``, exact, with gradients.

    Args:
        q, k, v: this rank's shards ``(B, L_pad / P, H, D)``, ``(B, L_pad / P, H_kv, D)``,
            ``(B, L_pad / P, H_kv, Dv)`` as :func:`shard_sequence` cuts them (same ``layout``).
        pattern: a :mod:`headwise.patterns` object for the whole length-``seq_len`` sequence
            (self-attention; ``None`` = full). Any pattern works, since each block evaluates it
            at global positions; blocks it leaves empty cost nothing.
        seq_len: the true global length (default ``P * L_local``, i.e. no padding).
        layout: ``"zigzag"`` (balanced under causal) or ``"contiguous"``.
        return_lse: also return this shard's LSE ``(B, H, L_pad / P)``.
        backend: the local attention backend; it must return LSE with gradients (``auto`` does).
        timeout: seconds to wait for a peer before :class:`PeerTimeoutError` (default: the
            process group's timeout).

    Returns:
        ``out`` ``(B, L_pad / P, H, Dv)`` for this shard (zeros at padded positions), or
        ``(out, lse)``.
    """
    _, world = rank_and_size(group)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, L_local, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise ValueError(
            f"ring attention is self-attention: q, k, v shards must share L_local; got "
            f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}"
        )
    local = q.shape[1]
    seq_len = local * world if seq_len is None else seq_len
    if padded_length(seq_len, world, layout) != local * world:
        raise ValueError(
            f"a {layout} shard of seq_len={seq_len} over {world} ranks has "
            f"{padded_length(seq_len, world, layout) // world} tokens; got L_local={local}"
        )
    if pattern is not None:
        pattern.check_lengths(seq_len, seq_len)
    spec = _Spec(pattern, seq_len, layout, scale, backend, group, timeout)
    out, lse = _RingAttention.apply(q, k, v, spec)
    return (out, lse) if return_lse else out


__all__ = ["PeerTimeoutError", "ring_attention"]
