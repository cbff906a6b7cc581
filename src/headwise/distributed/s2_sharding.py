"""S2-Attention head sharding across ranks: each rank keeps only the KV blocks its heads read.

Lin et al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (2024): heads of
a sparse layer read different residue classes of key blocks (``strided(v, offset_h, block=b)``)
plus a local window, so the KV cache one head needs is about ``L / v + window`` tokens instead of
``L``. Splitting heads over ranks (tensor / head parallelism), a rank needs the **union** of its
heads' blocks; heads that share blocks should therefore sit on the same rank.

The needed blocks are read off the pattern's block layout: the key blocks visible from the last
query block, ``pattern.block_layout(L, L, b)[h, -1] != EMPTY``, i.e. the KV cache that serves
decoding at the end of a length-``L`` prefix (for stripes with absolute positions, the S2 paper's
"KV-cache efficient" patterns, no later query needs a block dropped here). GQA: placement unit is
a KV head, whose needs are the union over its query heads.

Placement is greedy and deterministic: each rank takes ``H_kv / P`` KV heads, seeded with the
remaining head that needs most blocks, then repeatedly the head that grows the rank's union least
(ties: lowest head index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from headwise.distributed._comm import ProcessGroup, peer_errors, rank_and_size, wait
from headwise.distributed.sharding import AtPositions, Runs
from headwise.ops.attention import Backend, attention
from headwise.patterns import EMPTY, Pattern
from headwise.patterns.base import check_pattern


@dataclass(frozen=True)
class S2Placement:
    """Heads and kept KV blocks per rank (``kv_heads[r]``, ``heads[r]``, ``kv_blocks[r]``)."""

    seq_len: int
    block: int
    num_heads: int
    num_kv_heads: int
    kv_heads: tuple[tuple[int, ...], ...]
    kv_blocks: tuple[tuple[int, ...], ...]
    contiguous_kv_blocks: tuple[tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.kv_heads)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def heads(self) -> tuple[tuple[int, ...], ...]:
        """Query heads per rank, grouped by KV head so local GQA indexing holds."""
        g = self.group
        return tuple(tuple(h * g + i for h in kv for i in range(g)) for kv in self.kv_heads)

    def kv_runs(self, rank: int) -> Runs:
        """Kept key positions of ``rank`` as ``(start, length)`` runs of consecutive blocks."""
        return _runs(self.kv_blocks[rank], self.block, self.seq_len)

    def kv_positions(self, rank: int) -> torch.Tensor:
        """Kept key positions of ``rank``, increasing."""
        return torch.cat([torch.arange(s, s + n) for s, n in self.kv_runs(rank)])

    def kv_tokens(self, rank: int) -> int:
        return sum(n for _, n in self.kv_runs(rank))

    def local_q(self, q: torch.Tensor, rank: int) -> torch.Tensor:
        """``rank``'s query heads of ``q`` ``(B, Lq, H, D)``."""
        return q[:, :, list(self.heads[rank])]

    def local_kv(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """``rank``'s KV heads and kept positions of a full ``(B, L, H_kv, D)`` key or value."""
        index = self.kv_positions(rank).to(x.device)
        return x.index_select(1, index)[:, :, list(self.kv_heads[rank])]

    def kv_bytes(self, rank: int, *, batch: int, head_dim: int, element_size: int = 2) -> int:
        """Bytes of ``rank``'s K and V cache (default 2-byte elements: fp16 / bf16)."""
        return 2 * batch * len(self.kv_heads[rank]) * self.kv_tokens(rank) * head_dim * element_size

    def report(self, *, batch: int = 1, head_dim: int = 128, element_size: int = 2) -> str:
        """Per-rank KV memory: this placement vs contiguous head blocks vs the dense cache."""
        share = self.num_kv_heads // self.world_size
        dense = 2 * batch * share * self.seq_len * head_dim * element_size
        lines = [
            f"S2 placement: L={self.seq_len}, block={self.block}, H={self.num_heads}, "
            f"H_kv={self.num_kv_heads}, {self.world_size} ranks, B={batch}, D={head_dim}, "
            f"{element_size}-byte elements",
            "rank | kv heads | kept tokens | KV bytes | contiguous heads | dense",
        ]
        for r in range(self.world_size):
            naive = _runs(self.contiguous_kv_blocks[r], self.block, self.seq_len)
            naive_bytes = 2 * batch * share * sum(n for _, n in naive) * head_dim * element_size
            mine = self.kv_bytes(r, batch=batch, head_dim=head_dim, element_size=element_size)
            lines.append(
                f"{r} | {list(self.kv_heads[r])} | {self.kv_tokens(r)} | {mine:,} | "
                f"{naive_bytes:,} | {dense:,}"
            )
        return "\n".join(lines)


def _runs(blocks: tuple[int, ...], block: int, seq_len: int) -> Runs:
    runs: list[list[int]] = []
    for b in blocks:
        start, stop = b * block, min(seq_len, (b + 1) * block)
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += stop - start
        else:
            runs.append([start, stop - start])
    return tuple((s, n) for s, n in runs)


def place_heads(
    pattern: Pattern,
    seq_len: int,
    world_size: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    block: int = 64,
) -> S2Placement:
    """Place KV heads on ``world_size`` ranks so each keeps as few KV blocks as possible."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide num_heads; got {num_heads}, {num_kv_heads}")
    if num_kv_heads % world_size:
        raise ValueError(
            f"S2 head sharding gives each rank whole KV heads: num_kv_heads must divide by the "
            f"world size; got H_kv={num_kv_heads} on {world_size} ranks"
        )
    check_pattern(pattern, num_heads, "num_heads")
    layout = pattern.block_layout(seq_len, seq_len, block)[:, -1] != EMPTY  # (H_p, nK)
    per_query = layout.expand(num_heads, -1)
    needs = per_query.view(num_kv_heads, num_heads // num_kv_heads, -1).any(1)
    share = num_kv_heads // world_size
    remaining = list(range(num_kv_heads))
    placed: list[tuple[int, ...]] = []
    for _ in range(world_size):
        seed = max(remaining, key=lambda h: (int(needs[h].sum()), -h))
        mine, union = [seed], needs[seed].clone()
        remaining.remove(seed)
        while len(mine) < share:
            best = min(remaining, key=lambda h: (int((union | needs[h]).sum()), h))
            mine.append(best)
            union |= needs[best]
            remaining.remove(best)
        placed.append(tuple(sorted(mine)))

    def blocks_of(heads: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(torch.nonzero(needs[list(heads)].any(0)).flatten().tolist())

    contiguous = [tuple(range(r * share, (r + 1) * share)) for r in range(world_size)]
    return S2Placement(
        seq_len=seq_len,
        block=block,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        kv_heads=tuple(placed),
        kv_blocks=tuple(blocks_of(h) for h in placed),
        contiguous_kv_blocks=tuple(blocks_of(h) for h in contiguous),
    )


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    placement: S2Placement,
    *,
    rank: int | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """This rank's heads of the last ``Lq`` queries over its compacted KV cache.

    ``q`` ``(B, Lq, H_r, D)`` from :meth:`S2Placement.local_q` (``Lq`` at most the last query
    block), ``k``/``v`` from :meth:`S2Placement.local_kv`. Equals the same rows and heads of
    ``headwise.attention`` on the whole sequence; no communication.
    """
    rank = rank_and_size(None)[0] if rank is None else rank
    q_len = q.shape[1]
    last_block = placement.seq_len - (placement.seq_len - 1) // placement.block * placement.block
    if q_len > last_block:
        raise ValueError(
            f"the kept KV blocks serve the last query block ({last_block} queries); got Lq={q_len}"
        )
    local = AtPositions(
        pattern,
        placement.seq_len,
        ((placement.seq_len - q_len, q_len),),
        placement.kv_runs(rank),
        placement.heads[rank],
    )
    return attention(q, k, v, local, scale=scale, backend=backend)


def gather_heads(
    out: torch.Tensor,
    placement: S2Placement,
    *,
    group: ProcessGroup | None = None,
    timeout: float | None = None,
) -> torch.Tensor:
    """All ranks' head outputs ``(B, Lq, H_r, Dv)`` -> ``(B, Lq, H, Dv)`` in head order."""
    rank, world = rank_and_size(group)
    parts = [torch.empty_like(out) for _ in range(world)]
    label = f"gather_heads all-gather (rank {rank})"
    with peer_errors(label, timeout):
        work = dist.all_gather(parts, out.contiguous(), group=group, async_op=True)
    wait(work, label, timeout)
    order = torch.tensor([h for heads in placement.heads for h in heads])
    return torch.cat(parts, 2).index_select(2, torch.argsort(order).to(out.device))


__all__ = ["S2Placement", "gather_heads", "place_heads", "s2_attention"]
