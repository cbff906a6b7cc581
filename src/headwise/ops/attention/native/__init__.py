"""The ``native`` backend: headwise's C kernel for sparse patterns, exact attention on tiles of 16
(or 8) queries, forward and backward, on CPU, computed in float32 (float32, bfloat16 or float16
inputs, read as they are), with attention dropout drawn in the kernel.

Files, in reading order (the oracle is :mod:`headwise.ops.attention.reference`): ``tiles.c``
(the kernel), ``build.py`` (compile, private cache, load), ``plan.py`` (query tiles, key runs,
lane bits), ``call.py`` (operands checked and bound, :func:`tiles_forward`,
:func:`tiles_backward`), ``autograd.py`` (:func:`native_attention` over the
``headwise::native_attention_fwd``/``_bwd`` custom operators, which ``torch.compile`` keeps whole).
"""

from headwise.ops.attention.native.autograd import native_attention
from headwise.ops.attention.native.build import available, lanes, why_not
from headwise.ops.attention.native.call import supports, tiles_backward, tiles_forward
from headwise.ops.attention.native.plan import TilePlan, tile_plan

__all__ = [
    "TilePlan",
    "available",
    "lanes",
    "native_attention",
    "supports",
    "tile_plan",
    "tiles_backward",
    "tiles_forward",
    "why_not",
]
