"""Run a :class:`headwise.MultiHeadAttention` context-parallel: ``context_parallel(mha)``.

The wrapper shares the module's parameters and runs its project and position steps on this
rank's shard (rotary at the tokens' **global** positions), then :func:`ring_attention` (or
:func:`ulysses_attention`) with the module's pattern on the whole sequence, then its merge step.
Parameter gradients are this rank's share: sum them over ranks (DDP / FSDP do). The module's
hook points see this rank's shard; a hooked ``hook_scores`` or ``hook_pattern`` is refused
with :class:`headwise.Unsupported` (no rank forms the whole score matrix, so they cannot fire).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from headwise._checks import Unsupported
from headwise.distributed._comm import ProcessGroup, rank_and_size
from headwise.distributed.ring import ring_attention
from headwise.distributed.sharding import Layout, shard_positions
from headwise.distributed.ulysses import ulysses_attention
from headwise.layers.multihead import MultiHeadAttention

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
        # Checked before any communication, so every rank refuses alike.
        hooked = [n for n in ("hook_scores", "hook_pattern") if getattr(m, n).is_hooked]
        if hooked:
            raise Unsupported(
                f"{' and '.join(hooked)} of the wrapped layer are hooked, but ContextParallel "
                "never forms the (B, H, L, L) scores (each rank sees one shard of the keys at a "
                "time), so the hooks would not fire; remove them or run the layer unwrapped"
            )
        rank, world = rank_and_size(self.group)
        if x.dim() != 3 or x.shape[-1] != m.embed_dim:
            raise ValueError(f"x must be (B, L_local, E={m.embed_dim}); got {tuple(x.shape)}")
        local = x.shape[1]
        seq_len = local * world if seq_len is None else seq_len
        q, k, v = m.project(x)
        if m.rotary:
            q, k = m.position(q, k, shard_positions(seq_len, world, rank, self.layout))
        run = ring_attention if self.mode == "ring" else ulysses_attention
        z = run(
            q,
            k,
            v,
            m.effective_pattern(),
            seq_len=seq_len,
            layout=self.layout,
            scale=m.scale,
            backend=m.backend,
            group=self.group,
            timeout=self.timeout,
        )
        return m.merge(m.hook_z(z))


def context_parallel(module: MultiHeadAttention, **options) -> ContextParallel:
    """Wrap ``module`` to run context-parallel; ``options`` as :class:`ContextParallel`."""
    return ContextParallel(module, **options)


__all__ = ["ContextParallel", "context_parallel"]
