"""Head-parallel attention (DeepSpeed-Ulysses): trade sequence shards for head shards.

Input shards ``(B, L_pad / P, H, D)`` (any layout of :mod:`headwise.distributed.sharding`). One
all-to-all gives every rank the whole sequence for ``H / P`` heads, ``(B, L, H / P, D)``; the
local :func:`headwise.attention` then runs unchanged with any backend and pattern; a second
all-to-all restores ``(B, L_pad / P, H, Dv)``. The backward of an all-to-all is the inverse
all-to-all. Communication per rank per all-to-all is ``(P - 1) / P`` of its shard,
``B (L / P) H D`` elements: constant when ``L / P`` is.

GQA: key/value heads are split the same way when ``H_kv`` divides by ``P``; otherwise each KV
head is repeated just enough (to ``lcm(H_kv, P)`` heads) that every rank gets whole groups.

After Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme
Long Sequence Transformer Models" (2023).
"""

from __future__ import annotations

import math

import torch

from headwise.distributed._comm import ProcessGroup, all_to_all, rank_and_size
from headwise.distributed.sharding import AtPositions, Layout, padded_length, shard_positions
from headwise.ops.attention import Backend, attention
from headwise.patterns import Pattern


def _seq_to_heads(x: torch.Tensor, group, timeout) -> torch.Tensor:
    """``(B, Lc, H, D)`` on each rank -> ``(B, P Lc, H / P, D)``, rank-major along the length."""
    _, world = rank_and_size(group)
    batch, chunk, heads, dim = x.shape
    parts = x.reshape(batch, chunk, world, heads // world, dim).permute(2, 0, 1, 3, 4)
    received = all_to_all(parts, group, timeout, "ulysses all-to-all (sequence -> heads)")
    return received.permute(1, 0, 2, 3, 4).reshape(batch, world * chunk, heads // world, dim)


def _heads_to_seq(x: torch.Tensor, group, timeout) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`."""
    _, world = rank_and_size(group)
    batch, length, heads, dim = x.shape
    parts = x.reshape(batch, world, length // world, heads, dim).permute(1, 0, 2, 3, 4)
    received = all_to_all(parts, group, timeout, "ulysses all-to-all (heads -> sequence)")
    return received.permute(1, 2, 0, 3, 4).reshape(batch, length // world, world * heads, dim)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timeout):
        ctx.comm = (group, timeout)
        return _seq_to_heads(x, group, timeout)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, *ctx.comm), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timeout):
        ctx.comm = (group, timeout)
        return _heads_to_seq(x, group, timeout)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, *ctx.comm), None, None


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    seq_len: int | None = None,
    layout: Layout = "zigzag",
    scale: float | None = None,
    backend: Backend = "auto",
    group: ProcessGroup | None = None,
    timeout: float | None = None,
) -> torch.Tensor:
    """Attention of a sequence sharded over ``group`` by exchanging heads for sequence.

    Args:
        q, k, v: this rank's shards ``(B, L_pad / P, H, D)`` / ``(B, L_pad / P, H_kv, D)`` as
            :func:`shard_sequence` cuts them. ``H`` must divide by ``P``.
        pattern: any :mod:`headwise.patterns` object for the length-``seq_len`` sequence; a
            per-head pattern is split with the heads.
        seq_len: the true global length (default ``P * L_local``); padding is dropped before
            the local attention and comes back as zeros.
        backend: passed to :func:`headwise.attention` for the local call.
        timeout: seconds to wait for a peer before :class:`PeerTimeoutError`.

    Returns:
        ``(B, L_pad / P, H, Dv)``, this rank's shard.
    """
    rank, world = rank_and_size(group)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % world:
        raise ValueError(
            f"ulysses_attention splits heads over ranks: num_heads must divide by the world "
            f"size; got H={heads} heads on {world} ranks (use ring_attention instead)"
        )
    if heads % kv_heads:
        raise ValueError(f"q heads must be a multiple of k/v heads; got H={heads}, H_kv={kv_heads}")
    local = q.shape[1]
    seq_len = local * world if seq_len is None else seq_len
    if padded_length(seq_len, world, layout) != local * world:
        raise ValueError(
            f"a {layout} shard of seq_len={seq_len} over {world} ranks has "
            f"{padded_length(seq_len, world, layout) // world} tokens; got L_local={local}"
        )
    if pattern is not None:
        pattern.check_lengths(seq_len, seq_len)
    if kv_heads % world:
        # Repeat whole KV heads so that each rank's query heads find their groups locally.
        repeat = math.lcm(kv_heads, world) // kv_heads
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    if world == 1:
        q_all, k_all, v_all = q, k, v
    else:
        q_all, k_all, v_all = (_SeqToHeads.apply(t, group, timeout) for t in (q, k, v))
    # The all-to-all concatenates the ranks' shards; put the tokens back in sequence order.
    order = torch.cat([shard_positions(seq_len, world, r, layout) for r in range(world)])
    to_sequence = torch.argsort(order)[:seq_len].to(q.device)
    q_all, k_all, v_all = (t.index_select(1, to_sequence) for t in (q_all, k_all, v_all))
    local_pattern = pattern
    if pattern is not None and pattern.num_heads is not None:
        share = heads // world
        whole = ((0, seq_len),)
        heads_here = tuple(range(rank * share, (rank + 1) * share))
        local_pattern = AtPositions(pattern, seq_len, whole, whole, heads_here)
    out = attention(q_all, k_all, v_all, local_pattern, scale=scale, backend=backend)
    # Padding rows come back as zeros: scatter the real tokens into the all-to-all order.
    padded = out.new_zeros(out.shape[0], world * local, *out.shape[2:])
    padded = padded.index_copy(1, to_sequence, out)
    return padded if world == 1 else _HeadsToSeq.apply(padded, group, timeout)


__all__ = ["ulysses_attention"]
