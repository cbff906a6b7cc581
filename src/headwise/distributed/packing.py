"""Length-balanced packing for data parallelism, after Unpadded BERT's "exchange padding".

Zeng et al., "Boosting Distributed Training Performance of the Unpadded BERT Model" (2022): with
variable-length samples a step lasts as long as the rank with the most tokens. The rule:

1. drop empty samples; sort the global batch by length, **descending**, stable (ties keep the
   global index order, so every rank computes the same assignment);
2. deal round-robin: rank ``r`` takes sorted positions ``r, r + P, r + 2P, ...``;
3. pack each rank's samples without padding (``tokens`` ``(T, ...)`` + ``cu_seqlens``).

Rank ``r``'s ``i``-th sample is at least as long as rank ``r + 1``'s ``i``-th, which is at least as
long as rank ``r``'s ``(i + 1)``-th, so token counts never increase with the rank and any two
ranks differ by **at most the longest sample**; sample counts differ by at most one; no sample is
lost. Ranks now hold different token counts, so a per-token loss must be normalized by the
global count: ``loss = sum_of_token_losses / global_tokens`` (times ``P`` when the gradients are
averaged over ranks, as DDP does), not by the local count.

Two ways to use it: :class:`BalancedBatchSampler` deals ahead of time inside the data loader (every
rank knows all lengths, no communication), and :func:`exchange_balanced` moves samples between
ranks at run time (one ``all_gather`` of lengths, one ``all_to_all`` of tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from headwise.distributed._comm import ProcessGroup, peer_errors, rank_and_size, wait


@dataclass(frozen=True)
class Assignment:
    """Which samples each rank gets: ``ranks[r]`` global indices, longest first."""

    ranks: tuple[tuple[int, ...], ...]
    tokens: tuple[int, ...]
    global_tokens: int
    bound: int
    dropped: tuple[int, ...]

    @property
    def imbalance(self) -> int:
        """Largest token-count difference between two ranks (``<= bound``)."""
        return max(self.tokens) - min(self.tokens)


def balance(lengths: Sequence[int] | torch.Tensor, world_size: int) -> Assignment:
    """Deal samples of the given lengths over ``world_size`` ranks by the sorted round-robin rule.

    ``bound`` is the longest length: the guaranteed limit on :attr:`Assignment.imbalance`.
    Zero-length samples are listed in ``dropped`` and given to no rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    lengths = torch.as_tensor(lengths, dtype=torch.long).flatten()
    if (lengths < 0).any():
        raise ValueError(f"lengths must be >= 0; got {lengths.tolist()}")
    order = torch.sort(lengths, descending=True, stable=True).indices
    valid = order[lengths[order] > 0]
    ranks = tuple(tuple(valid[r::world_size].tolist()) for r in range(world_size))
    tokens = tuple(int(lengths[list(idx)].sum()) if idx else 0 for idx in ranks)
    return Assignment(
        ranks=ranks,
        tokens=tokens,
        global_tokens=int(lengths.sum()),
        bound=int(lengths.max()) if len(lengths) else 0,
        dropped=tuple(order[lengths[order] == 0].tolist()),
    )


@dataclass(frozen=True)
class PackedBatch:
    """Samples concatenated without padding: ``tokens`` ``(T, ...)``, ``cu_seqlens`` ``(n + 1,)``
    int32 (for :func:`headwise.attention_varlen`), ``ids`` of the samples in that order, and
    ``global_tokens``, the loss normalizer (``-1`` when unknown to a local collate)."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    ids: tuple[int, ...]
    global_tokens: int = -1

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()


def collate_packed(
    samples: Sequence[torch.Tensor], ids: Sequence[int] | None = None
) -> PackedBatch:
    """Pack samples ``(L_i, ...)`` into one ``(sum L_i, ...)`` tensor with ``cu_seqlens``.

    A ``collate_fn`` for :class:`torch.utils.data.DataLoader` with :class:`BalancedBatchSampler`.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample; got none")
    lengths = torch.tensor([s.shape[0] for s in samples], dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    ids = tuple(range(len(samples))) if ids is None else tuple(ids)
    return PackedBatch(torch.cat(list(samples)), cu_seqlens, ids)


class BalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per step, deal a global batch of ``batch_size * world_size`` samples by :func:`balance`.

    Yields this rank's dataset indices, longest first. Every rank draws the same global batch
    (same ``seed`` and epoch) and computes the same assignment, so nothing is exchanged.
    ``global_tokens(step)`` gives the loss normalizer of a step.
    """

    def __init__(
        self,
        lengths: Sequence[int] | torch.Tensor,
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        default_rank, default_world = rank_and_size(None)
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}); got {self.rank}")
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (call on every rank, as with ``DistributedSampler``)."""
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        n = len(self.lengths)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(n, generator=gen)
        else:
            perm = torch.arange(n)
        step = self.batch_size * self.world_size
        batches = list(torch.split(perm, step))
        if self.drop_last and batches and len(batches[-1]) < step:
            batches.pop()
        return batches

    def global_tokens(self, step: int) -> int:
        """Tokens of the whole global batch at ``step`` of the current epoch."""
        return int(self.lengths[self._global_batches()[step]].sum())

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            assignment = balance(self.lengths[batch], self.world_size)
            yield batch[list(assignment.ranks[self.rank])].tolist()

    def __len__(self) -> int:
        return len(self._global_batches())


def exchange_balanced(
    samples: Sequence[torch.Tensor],
    *,
    group: ProcessGroup | None = None,
    timeout: float | None = None,
) -> PackedBatch:
    """Rebalance the ranks' local samples at run time and pack this rank's share.

    Every rank passes its samples ``(L_i, ...)`` (same trailing shape and dtype everywhere, any
    count, possibly none). Lengths are all-gathered, :func:`balance` is computed identically on
    every rank, and token rows move with one ``all_to_all``. ``ids`` of the result are global
    sample ids ``source_rank * max_count + local_index``; ``global_tokens`` is the normalizer.
    """
    rank, world = rank_and_size(group)
    if not samples:
        raise ValueError("exchange_balanced needs at least a template sample on every rank")
    template = samples[0]
    local_lengths = torch.tensor([s.shape[0] for s in samples], dtype=torch.long)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    _all_gather(counts, torch.tensor([len(samples)]), group, timeout, "sample counts")
    width = max(int(c) for c in counts)
    padded = torch.full((width,), 0, dtype=torch.long)
    padded[: len(samples)] = local_lengths
    gathered = [torch.empty_like(padded) for _ in range(world)]
    _all_gather(gathered, padded, group, timeout, "sample lengths")
    lengths = torch.cat(gathered)  # global id = source * width + local index; padding has length 0
    assignment = balance(lengths, world)
    # Send: my non-empty samples grouped by destination, in the destination's order.
    outgoing = [[i for i in assignment.ranks[dest] if i // width == rank] for dest in range(world)]
    send_rows = [samples[i - rank * width] for dest in range(world) for i in outgoing[dest]]
    send_sizes = [int(lengths[outgoing[dest]].sum()) for dest in range(world)]
    mine = assignment.ranks[rank]
    recv_sizes = [
        int(lengths[[i for i in mine if i // width == src]].sum()) for src in range(world)
    ]
    trailing = template.shape[1:]
    send = torch.cat(send_rows) if send_rows else template.new_empty(0, *trailing)
    recv = template.new_empty(sum(recv_sizes), *trailing)
    label = f"exchange_balanced all-to-all (rank {rank})"
    with peer_errors(label, timeout):
        work = dist.all_to_all_single(
            recv, send.contiguous(), recv_sizes, send_sizes, group=group, async_op=True
        )
    wait(work, label, timeout)
    # Received rows arrive grouped by source; reorder them to the assignment's order.
    by_source: dict[int, list[int]] = {src: [] for src in range(world)}
    for i in mine:
        by_source[i // width].append(i)
    pieces: dict[int, torch.Tensor] = {}
    offset = 0
    for src in range(world):
        for i in by_source[src]:
            n = int(lengths[i])
            pieces[i] = recv[offset : offset + n]
            offset += n
    if not mine:  # more ranks than non-empty samples
        return PackedBatch(recv, torch.zeros(1, dtype=torch.int32), (), assignment.global_tokens)
    batch = collate_packed([pieces[i] for i in mine], mine)
    return PackedBatch(batch.tokens, batch.cu_seqlens, batch.ids, assignment.global_tokens)


def _all_gather(out, tensor, group, timeout, what) -> None:
    label = f"exchange_balanced all-gather of {what}"
    with peer_errors(label, timeout):
        work = dist.all_gather(out, tensor, group=group, async_op=True)
    wait(work, label, timeout)


__all__ = [
    "Assignment",
    "BalancedBatchSampler",
    "PackedBatch",
    "balance",
    "collate_packed",
    "exchange_balanced",
]
