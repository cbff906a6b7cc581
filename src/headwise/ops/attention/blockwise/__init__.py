"""Blockwise softmax attention in PyTorch: any pattern, forward and backward, on any device.

Queries are processed in groups of about ``block`` (consecutive rows, or the pattern's own
grouping: spatial tiles for neighborhoods). Each group reads exactly the keys at least one of its
queries may see, so hidden keys cost nothing and no ``Lq x Lk`` tensor is built (peak extra memory
is ``B * H * block * keys_selected``); element masks of partial groups are cached with the plan.
Within a group the softmax is exact: on CPU one call of PyTorch's fused attention kernel with the
pattern as an additive mask, otherwise the same ``masked_softmax_av`` as the reference. Backward
is FlashAttention-2 style: it keeps only ``out`` and ``lse`` and recomputes each group.

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

The pattern hides scores with ``where``, not by adding ``-inf``, so a NaN or ``+inf`` bias entry
at a hidden key stays hidden (non-finite Q, K, V are handled before any backend runs:
:mod:`headwise.ops.attention.api`). On CPU without bias or ``score_mod`` the ``native`` backend
(:mod:`headwise.ops.attention.native`) is faster; this path serves everything else: bias and
``score_mod`` with their gradients, float64, other devices, machines without a C compiler.

Thread count (``torch.set_num_threads``): on the fused CPU path (float32/bfloat16 without
``score_mod``; backward without bias or LSE gradient) results are bitwise the same for any
number of threads; on the step-by-step path they agree to a few ulps only.

``torch.compile``: without a ``score_mod`` a call is one custom operator
(``headwise::blockwise_attention_fwd``, its backward ``headwise::blockwise_attention_bwd``), so a
model compiles into one graph with ``fullgraph=True``; the plan is built inside the operator, as
in eager calls, and the non-finite rule is applied there too. A ``score_mod`` (a Python function)
runs through an autograd Function instead, its plan built while tracing (a constant of the
graph): without gradients the groups are traced, and the non-finite screen's branch is the one
break; with gradients dynamo runs the Function eagerly (its backward, score_mod's local
autograd, is not traceable), one more break.

Files, in reading order (the oracle is :mod:`headwise.ops.attention.reference`):
``plan.py`` (plan structures and the planner), ``fused.py`` (the fused CPU kernel path),
``stepwise.py`` (the softmax written out, forward and backward), ``heads.py`` (heads grouped by
pattern), ``function.py`` (both passes over head groups; the autograd Function of the
``score_mod`` path), ``operators.py`` (the custom operators), ``api.py``
(:func:`blockwise_attention`).
"""

from headwise.ops.attention.blockwise.api import blockwise_attention
from headwise.ops.attention.blockwise.heads import heads_first
from headwise.ops.attention.blockwise.plan import (
    BACKWARD_BLOCK_FACTOR,
    DEFAULT_BLOCK,
    MASK_CACHE_ELEMENTS,
)
from headwise.ops.attention.problem import captured_leaves

__all__ = [
    "BACKWARD_BLOCK_FACTOR",
    "DEFAULT_BLOCK",
    "MASK_CACHE_ELEMENTS",
    "blockwise_attention",
    "captured_leaves",
    "heads_first",
]
