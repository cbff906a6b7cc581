"""Run a :class:`headwise.MultiHeadAttention` context-parallel: ``context_parallel(mha)``.

The wrapper shares the module's parameters and runs its projections, qk-norm and rotary on this
rank's shard (rotary at the tokens' **global** positions), then :func:`ring_attention` (or
:func:`ulysses_attention`) with the module's pattern on the whole sequence, then the output
projection. Parameter gradients are this rank's share: sum them over ranks (DDP / FSDP do).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from headwise import patterns
from headwise.distributed._comm import ProcessGroup, rank_and_size
from headwise.distributed.ring import ring_attention
from headwise.distributed.sharding import Layout, shard_positions
from headwise.distributed.ulysses import ulysses_attention
from headwise.layers.multihead import MultiHeadAttention, apply_rotary

Mode = Literal["ring", "ulysses"]


class ContextParallel(nn.Module):
    """``module`` applied to a sequence sharded over ``group`` (self-attention).

    Call as ``cp(x_shard, seq_len=L)`` with ``x_shard`` ``(B, L_pad / P, E)`` from
    :func:`shard_sequence` (same ``layout``); returns this rank's ``(B, L_pad / P, E)``.
    """

    def __init__(
        self,
        module: MultiHeadAttention,
        *,
        mode: Mode = "ring",
        layout: Layout = "zigzag",
        group: ProcessGroup | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, MultiHeadAttention):
            raise ValueError(
                f"module must be a headwise MultiHeadAttention; got {type(module).__name__}"
            )
        if mode not in ("ring", "ulysses"):
            raise ValueError(f"mode must be 'ring' or 'ulysses'; got {mode!r}")
        self.module = module
        self.mode = mode
        self.layout = layout
        self.group = group
        self.timeout = timeout

    def forward(self, x: torch.Tensor, *, seq_len: int | None = None) -> torch.Tensor:
        m = self.module
        rank, world = rank_and_size(self.group)
        if x.dim() != 3 or x.shape[-1] != m.embed_dim:
            raise ValueError(f"x must be (B, L_local, E={m.embed_dim}); got {tuple(x.shape)}")
        batch, local, _ = x.shape
        seq_len = local * world if seq_len is None else seq_len
        shape = (batch, local, -1, m.head_dim)
        q = m.q_norm(m.q_proj(x).view(shape))
        k = m.k_norm(m.k_proj(x).view(shape))
        v = m.v_proj(x).view(shape)
        if m.rotary:
            positions = shard_positions(seq_len, world, rank, self.layout).to(x.device)
            q = apply_rotary(q, positions, m.rope_base)
            k = apply_rotary(k, positions, m.rope_base)
        pattern = m.pattern
        if m.causal:
            pattern = patterns.causal() if pattern is None else pattern & patterns.causal()
        run = ring_attention if self.mode == "ring" else ulysses_attention
        out = run(
            q,
            k,
            v,
            pattern,
            seq_len=seq_len,
            layout=self.layout,
            scale=m.scale,
            backend=m.backend,
            group=self.group,
            timeout=self.timeout,
        )
        return m.out_proj(out.reshape(batch, local, m.num_heads * m.head_dim))


def context_parallel(module: MultiHeadAttention, **options) -> ContextParallel:
    """Wrap ``module`` to run context-parallel; ``options`` as :class:`ContextParallel`."""
    return ContextParallel(module, **options)


__all__ = ["ContextParallel", "context_parallel"]
