"""A Hugging Face model run context-parallel: each rank holds a shard of the sequence.

Inside :func:`hf_context_parallel` every attention module of the model runs
:func:`headwise.distributed.ring_attention` over the process group, so the whole model sees the
full sequence while each rank computes only its shard. The model must be attached first
(:func:`headwise.hf.attach`); this module reaches it only through the hook engine of
:mod:`headwise.hooks`, never through :mod:`headwise.hf`. The model's own attention mask describes
the local shard only and is replaced by the global rule of the module: causal for decoders, full
for encoders. Feed each rank its shard of the inputs and the matching global ``position_ids``
(:func:`headwise.distributed.shard_positions`); padding inside the sequence is not supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from headwise.distributed._comm import ProcessGroup
from headwise.distributed.ring import ring_attention
from headwise.distributed.sharding import Layout
from headwise.hooks import Hook, hooked
from headwise.patterns import causal


class _RingHook(Hook):
    def __init__(self, seq_len: int, layout: Layout, group: ProcessGroup | None, timeout):
        self.seq_len, self.layout, self.group, self.timeout = seq_len, layout, group, timeout

    def attend(self, module, q, k, v, pattern, scale, bias, score_mod):
        if score_mod is not None:
            raise ValueError("context-parallel HF attention does not support softcapping")
        is_causal = bool(getattr(module, "is_causal", False))
        return ring_attention(
            q,
            k,
            v,
            causal() if is_causal else None,
            seq_len=self.seq_len,
            layout=self.layout,
            scale=scale,
            group=self.group,
            timeout=self.timeout,
        )


@contextmanager
def hf_context_parallel(
    model: nn.Module,
    *,
    seq_len: int,
    layout: Layout = "zigzag",
    group: ProcessGroup | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """Run ``model`` (a transformers model attached with :func:`headwise.hf.attach`)
    context-parallel over ``group`` for the block.

    ``seq_len`` is the global length; inputs on this rank are its ``layout`` shard, with
    ``position_ids`` set to the shard's global positions.
    """
    with hooked(model, _RingHook(seq_len, layout, group, timeout)):
        yield
