"""Distributed attention on ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

* :func:`ring_attention` - context parallelism: K/V shards circulate, LSE-merged, exact, with
  gradients; zig-zag layout for causal balance; any pattern (evaluated at global positions).
* :func:`ulysses_attention` - head parallelism: all-to-all sequence shards -> head shards.
* :func:`place_heads` / :func:`s2_attention` - S2-Attention heads placed so each rank keeps only
  the KV blocks its heads read, with a per-rank KV memory report.
* :func:`balance`, :class:`BalancedBatchSampler`, :func:`exchange_balanced` - Unpadded BERT's
  length-balanced packing over data-parallel ranks, with the global loss normalizer.
* :func:`context_parallel` - a :class:`headwise.MultiHeadAttention` on a sharded sequence;
  :func:`hf_context_parallel` - a Hugging Face model (through :mod:`headwise.hf`) the same way.
* :func:`init_distributed` / :class:`PeerTimeoutError` - finite timeouts: a dead or missing rank
  raises instead of hanging. :func:`launch` runs a function on local processes (tests, benches).

Layouts and the padding rule: :mod:`headwise.distributed.sharding`.
"""

from headwise.distributed._comm import PeerTimeoutError, init_distributed
from headwise.distributed.hf import hf_context_parallel
from headwise.distributed.launch import RankResult, launch
from headwise.distributed.packing import (
    Assignment,
    BalancedBatchSampler,
    PackedBatch,
    balance,
    collate_packed,
    exchange_balanced,
)
from headwise.distributed.ring import ring_attention
from headwise.distributed.s2_sharding import S2Placement, gather_heads, place_heads, s2_attention
from headwise.distributed.sharding import (
    gather_sequence,
    padded_length,
    shard_positions,
    shard_sequence,
)
from headwise.distributed.ulysses import ulysses_attention
from headwise.distributed.wrap import ContextParallel, context_parallel
from headwise.ops.attention.merge import merge_partials

__all__ = [
    "Assignment",
    "BalancedBatchSampler",
    "ContextParallel",
    "PackedBatch",
    "PeerTimeoutError",
    "RankResult",
    "S2Placement",
    "balance",
    "collate_packed",
    "context_parallel",
    "exchange_balanced",
    "gather_heads",
    "gather_sequence",
    "hf_context_parallel",
    "init_distributed",
    "launch",
    "merge_partials",
    "padded_length",
    "place_heads",
    "ring_attention",
    "s2_attention",
    "shard_positions",
    "shard_sequence",
    "ulysses_attention",
]
