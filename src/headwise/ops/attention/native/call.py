"""Calling the native kernel: operands checked and bound to ``struct problem``, then run.

:func:`tiles_forward` and :func:`tiles_backward` take ``(B, L, H, D)`` CPU tensors of one
dtype, float32, bfloat16 or float16 (GQA allowed) and a pattern or head groups
``((pattern, heads), ...)``, each with its own plan (:mod:`.plan`), all in one call. Every
tensor handed to C is checked (dtype, device, shape, overlap) with an error naming it, and given
to C with a contiguous last dim (copied where it is not, and copied back for outputs); results do
not depend on the thread count.

The kernel puts a tile's queries in the lanes of one vector register (16 floats with AVX-512,
else 8) and, per key, computes every lane's score with one broadcast FMA per head dimension, so a
query costs the keys of its tile's window union and no more: a 4 x 4 tile of a 2-D neighborhood
(k = 16) reads 19 x 19 keys, 1.41x the 16 x 16 each query needs, where a 32-query group of
PyTorch's fused kernel reads 1.71x, and no K block is packed per tile. The softmax of each lane
is exact (two passes over the tile's scores); ``lse`` is in natural log like the other paths. The
backward pass recomputes P from ``lse`` (FlashAttention-2 style) and splits work by K/V head, so
no two threads add into the same dK, dV rows. Scores may carry an additive bias (no gradient) and
a neighborhood's relative-position table (with its gradient).

Half precision is not copied to float32: the kernel widens q and dO rows per tile and K and V
rows once per thread and (batch, K/V head), computes in float32 and writes ``out`` in the input
dtype; ``lse`` and the gradients are float32. Attention dropout (``dropout=(p, seed)``) draws the
keep mask of :mod:`headwise.ops.attention.dropout` inside the kernel, bit for bit
:func:`~headwise.ops.attention.dropout.keep_mask`, in both passes.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import itertools
from collections.abc import Sequence

import torch

from headwise.ops.attention import nonfinite
from headwise.ops.attention.dropout import check_dropout, threshold
from headwise.ops.attention.mods import RelativePositionTable
from headwise.ops.attention.native.build import PlanStruct, ProblemStruct, available, library
from headwise.ops.attention.native.plan import _shared_tile_plan, relative_index_plan
from headwise.patterns import Pattern

#: the forward pass takes tiles that see more keys than this in groups that share each chunk of
#: K and V (online softmax), instead of one tile streaming all its keys (0: never)
LONG_TILE_KEYS = 1024


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="headwise-tiles")


#: the element types the kernel reads q, k, v, out and dO in (``struct problem``'s dtype codes)
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can take these inputs: CPU tensors of one dtype among float32,
    bfloat16 and float16, and the kernel compiled."""
    cpu = all(t.device.type == "cpu" and t.dtype == q.dtype for t in (q, k, v))
    return cpu and q.dtype in DTYPES and available()


def has_non_finite(*tensors: torch.Tensor) -> bool:
    """Whether some entry of these tensors is inf or NaN: the screen of the non-finite rule
    (:func:`headwise.ops.attention.nonfinite.has_non_finite`) read by the kernel in place, one
    pass over the bits of each element, for 4-D CPU tensors of the kernel's dtypes (others go to
    that function). Exact: a sum that overflows is no false alarm here."""
    lib = library()
    for t in tensors:
        native = t.dim() == 4 and t.dtype in DTYPES and t.layout == torch.strided
        if lib is None or not native or t.device.type != "cpu":
            if nonfinite.has_non_finite(t):
                return True
        elif not lib.headwise_all_finite(t.data_ptr(), DTYPES[t.dtype], *t.shape, *t.stride()):
            return True
    return False


# Every tensor handed to C goes through _operand (read by C) or _target (written by C): the
# kernel assumes the dtype the struct gives (float32, or the call's dtype for q, k, v, out and
# dO) on the CPU, the shape of its ``struct problem`` comment and a last dim of stride 1 (the
# other strides are passed along). Shapes use None for any size.


def _check(
    name: str,
    t,
    spec: str,
    shape: tuple[int | None, ...],
    float32: bool,
    dtype: torch.dtype | tuple[torch.dtype, ...] = torch.float32,
) -> None:
    """``float32``: ``t`` must have ``dtype`` (float32 unless given; a tuple: one of them)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if float32 and (t.device.type != "cpu" or t.dtype not in dtypes):
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        names = " or ".join(names.rsplit(", ", 1))
        raise ValueError(f"{name} must be a {names} CPU tensor; got {t.dtype} on {t.device}")
    if t.device.type != "cpu" or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point CPU tensor; got {t.dtype} on {t.device}")
    if t.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, t.shape)):
        sizes = ", ".join("*" if n is None else str(n) for n in shape)
        raise ValueError(f"{name} must be {spec} = ({sizes}); got {tuple(t.shape)}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _operand(
    name: str,
    t,
    spec: str,
    shape: tuple[int | None, ...],
    float32: bool = True,
    dtype: torch.dtype = torch.float32,
):
    """``t`` as the kernel reads it: of ``dtype`` (a copy when ``float32`` is false and it is
    another floating dtype), its last dim contiguous (a copy when not)."""
    _check(name, t, spec, shape, float32, dtype)
    return _last_dim_contiguous(t.detach().to(t.dtype if isinstance(dtype, tuple) else dtype))


def _target(
    name: str, t, spec: str, shape: tuple[int | None, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Where the kernel writes what belongs in ``t`` (of ``dtype``): ``t`` itself, or a
    contiguous copy of it when its last dim is strided or its elements might share memory
    (:func:`_write_back` puts it into ``t``). An expanded ``t`` (a stride 0) cannot hold a
    result."""
    _check(name, t, spec, shape, float32=True, dtype=dtype)
    if any(n > 1 and stride == 0 for n, stride in zip(t.shape, t.stride())):
        raise ValueError(
            f"{name} must not overlap itself (an expanded tensor: elements share memory); got "
            f"shape {tuple(t.shape)}, strides {t.stride()}"
        )
    # elements are distinct when each dim steps past everything the smaller strides reach
    reach = 0
    for stride, n in sorted((stride, n) for n, stride in zip(t.shape, t.stride()) if n > 1):
        if stride <= reach:
            return t.contiguous()
        reach += stride * (n - 1)
    return _last_dim_contiguous(t)


def _write_back(*pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``(t, buffer)`` of :func:`_target`: the buffer's values into ``t`` where they differ."""
    for t, buffer in pairs:
        if buffer is not t:
            t.copy_(buffer)


def _view(t: torch.Tensor | None, dims: int = 3) -> list:
    """A tensor as the pointer and leading strides of ``struct problem`` (0s for ``None``)."""
    if t is None:
        return [None] + [0] * dims
    return [t.data_ptr(), *t.stride()[:dims]]


HeadGroups = Sequence[tuple[Pattern, Sequence[int] | None]]


def _check_dropout(dropout) -> tuple[float, int] | None:
    """``dropout`` as ``(p, seed)``, or ``None`` for no dropout (also when ``p`` is 0)."""
    if dropout is None:
        return None
    if not isinstance(dropout, tuple) or len(dropout) != 2:
        raise TypeError(f"dropout must be None or a tuple (p, seed); got {dropout!r}")
    p, seed = check_dropout(dropout[0], "dropout p"), dropout[1]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"the dropout seed must be an int; got {type(seed).__name__}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"the dropout seed must be in [0, 2**64); got {seed}")
    return None if p == 0 else (p, seed)


class _Call:
    """One kernel call over head groups ``((pattern, heads), ...)`` (``heads``: indices into the
    tensors' head dim, ``None``: all), each head with its pattern's plan, the tensors bound to
    ``struct problem``."""

    def __init__(
        self,
        groups: Pattern | HeadGroups,
        q,
        k,
        v,
        scale: float,
        relative: RelativePositionTable | None = None,
        bias: torch.Tensor | None = None,
        dropout: tuple[float, int] | None = None,
    ):
        lib = library()
        if lib is None:
            raise RuntimeError("the native tile kernel is not available on this machine")
        self.lib, self.scale = lib, scale
        self.dropout = _check_dropout(dropout)
        self.q = _operand("q", q, "(B, Lq, H, D)", (None,) * 4, dtype=tuple(DTYPES))
        self.dtype = self.q.dtype  # of q, k, v, out and dO
        self.batch, self.q_len, all_heads, self.dim = self.q.shape
        q_len = self.q_len
        shape = (self.batch, None, None, self.dim)
        self.k = _operand("k", k, "(B, Lk, Hkv, D)", shape, dtype=self.dtype)
        self.kv_len, kv_heads = self.k.shape[1:3]
        kv_len = self.kv_len
        shape = (self.batch, kv_len, kv_heads, None)
        self.v = _operand("v", v, "(B, Lk, Hkv, Dv)", shape, dtype=self.dtype)
        self.all_heads = all_heads
        if kv_heads == 0 or all_heads % kv_heads:
            raise ValueError(
                f"the heads of q ({all_heads}) must be a multiple of the heads of k ({kv_heads})"
            )
        self.group = all_heads // kv_heads
        if isinstance(groups, Pattern):
            groups = ((groups, None),)
        heads, head_plan, head_rank, self.plans = [], [], [], []
        for index, (pattern, members) in enumerate(groups):
            members = list(range(all_heads) if members is None else members)
            heads += members
            head_plan += [index] * len(members)
            head_rank += range(len(members))
            plan = None if q_len * kv_len == 0 else _shared_tile_plan(pattern, q_len, kv_len)
            self.plans.append(plan)
            if self.plans[-1] is not None and self.plans[-1].bits.shape[0] not in (1, len(members)):
                raise ValueError(
                    f"pattern {pattern} has {self.plans[-1].bits.shape[0]} heads; its group "
                    f"has {len(members)}"
                )
        if len(set(heads)) != len(heads) or not all(0 <= h < all_heads for h in heads):
            raise ValueError(f"head groups must name distinct heads < {all_heads}; got {heads}")
        self.empty = self.batch * q_len * kv_len * len(heads) == 0
        if self.empty:
            self.heads = torch.tensor(heads, dtype=torch.int32)
            return
        tiles = tuple(plan.tiles for plan in self.plans)
        layout = _head_layout(tuple(heads), tuple(head_plan), tuple(head_rank), tiles, self.group)
        self.heads, self.head_plan, self.head_rank, self.tile_offsets = layout[:4]
        self.unit_heads, self.unit_offsets = layout[4:]
        self.rpb = self.rpb_index = None
        if relative is not None:
            if len(self.plans) != 1 or groups[0][0] != relative.pattern:
                raise ValueError("a relative-position table needs the call's one pattern")
            self.rpb_index, entries = relative_index_plan(relative.pattern, q_len, kv_len)
            table = relative.table
            _check("the relative-position table", table, "", tuple(table.shape), float32=False)
            if table.dim() < 2 or table.shape[0] != all_heads or table[0].numel() < entries:
                raise ValueError(
                    f"the relative-position table must be (H, ...) = ({all_heads}, ...) with at "
                    f"least {entries} entries per head; got {tuple(table.shape)}"
                )
            self.rpb = table.detach().float().flatten(1).contiguous()
        # a broadcastable additive bias, seen as (B, H, Lq, Lk) with stride 0 where it broadcasts
        # (C reads it through all four strides)
        self.bias = None
        if bias is not None:
            shape = (self.batch, all_heads, q_len, kv_len)
            _check("bias", bias, "a tensor", tuple(bias.shape), float32=False)
            sizes = zip(bias.shape[::-1], shape[::-1])
            if bias.dim() > 4 or any(n not in (1, m) for n, m in sizes):
                raise ValueError(f"bias must broadcast to {shape}; got {tuple(bias.shape)}")
            full = bias.detach().float().reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
            self.bias = full.expand(shape)
        structs = [
            p.struct if self.rpb_index is None else p.as_struct(self.rpb_index) for p in self.plans
        ]
        self.plan_structs = (PlanStruct * len(self.plans))(*structs)

    def problem(
        self, out, lse, dout=None, dlse=None, dq=None, dk=None, dv=None, drpb=None
    ) -> ProblemStruct:
        grad_dtype = self.dtype if dq is not None and dq.dtype == self.dtype else torch.float32
        return ProblemStruct(
            *_view(self.q), *_view(self.k), *_view(self.v), *_view(out), *_view(lse, 2),
            *_view(dout), *_view(dlse, 2), *_view(dq), *_view(dk), *_view(dv),
            self.batch, self.group, self.dim, self.v.shape[3],
            self.heads.data_ptr(), len(self.heads), self.head_plan.data_ptr(),
            self.head_rank.data_ptr(), self.tile_offsets.data_ptr(),
            self.unit_offsets.data_ptr(), self.unit_heads.data_ptr(), len(self.unit_offsets) - 1,
            self.scale,
            max(plan.max_keys for plan in self.plans), ctypes.addressof(self.plan_structs),
            *_view(self.rpb, 1), *_view(drpb, 1), *_view(self.bias, 4), LONG_TILE_KEYS,
            DTYPES[self.dtype], DTYPES[grad_dtype], self.kv_len, *self._dropout_fields(),
        )  # fmt: skip

    def _dropout_fields(self) -> tuple:
        """``dropout threshold all_heads q_len seed keep_scale`` of ``struct problem``."""
        if self.dropout is None:
            return 0, 0, 0, 0, 0, 1.0
        p, seed = self.dropout
        return 1, threshold(p), self.all_heads, self.q_len, seed, 1 / (1 - p)

    def threads(self, backward: bool) -> int:
        per_batch = len(self.unit_offsets) - 1 if backward else int(self.tile_offsets[-1])
        return max(1, min(torch.get_num_threads(), self.batch * per_batch))

    def run(self, problem: ProblemStruct, backward: bool) -> None:
        lib = self.lib
        items = self.batch * (problem.n_units if backward else int(self.tile_offsets[-1]))
        threads = self.threads(backward)
        entry = lib.headwise_tiles_backward if backward else lib.headwise_tiles_forward
        if lib.headwise_tiles_openmp() or threads == 1:
            status = [entry(ctypes.byref(problem), threads)]
        else:
            ranged = (
                lib.headwise_tiles_backward_range if backward else lib.headwise_tiles_forward_range
            )
            bounds = [items * i // threads for i in range(threads + 1)]
            call = functools.partial(ranged, ctypes.byref(problem))
            status = list(_pool(threads).map(call, bounds[:-1], bounds[1:]))
        if any(status):
            raise MemoryError("the native tile kernel could not allocate its scratch memory")


@functools.lru_cache(maxsize=256)
def _head_layout(
    heads: tuple[int, ...],
    head_plan: tuple[int, ...],
    head_rank: tuple[int, ...],
    tiles: tuple[int, ...],
    group: int,
) -> tuple[torch.Tensor, ...]:
    """``struct problem``'s head arrays, int32 ``heads, head_plan, head_rank`` and int64
    ``tile_offsets`` (each head's first forward item per batch; ``tiles``: each plan's tile
    count), int32 ``unit_heads`` and int64 ``unit_offsets`` (the backward units: the heads of
    each K/V head, in K/V head order). Built once per layout (the kernel only reads them)."""
    offsets = list(itertools.accumulate((tiles[index] for index in head_plan), initial=0))
    kv = [h // group for h in heads]
    units = [[i for i, j in enumerate(kv) if j == unit] for unit in sorted(set(kv))]
    unit_offsets = list(itertools.accumulate(map(len, units), initial=0))
    return (
        torch.tensor(heads, dtype=torch.int32),
        torch.tensor(head_plan, dtype=torch.int32),
        torch.tensor(head_rank, dtype=torch.int32),
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor([i for members in units for i in members], dtype=torch.int32),
        torch.tensor(unit_offsets, dtype=torch.int64),
    )


def _pairwise_sum(parts: torch.Tensor) -> torch.Tensor:
    """``parts.sum(0)`` as elementwise adds of halves: the order depends only on ``len(parts)``
    (a reduction kernel may split the sum among threads)."""
    while len(parts) > 1:
        half = len(parts) // 2
        folded = parts[:half] + parts[half : 2 * half]
        parts = torch.cat([folded, parts[2 * half :]]) if len(parts) % 2 else folded
    return parts[0]


def tiles_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | HeadGroups,
    scale: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    relative: RelativePositionTable | None = None,
    bias: torch.Tensor | None = None,
    dropout: tuple[float, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``pattern`` for CPU ``(B, L, H, D)`` tensors of one dtype (float32,
    bfloat16 or float16; GQA allowed): ``out`` ``(B, Lq, H, Dv)`` in that dtype, ``lse``
    ``(B, H, Lq)`` float32; rows that see no key give 0 and -inf.

    ``pattern`` may be head groups ``((pattern, heads), ...)`` (``heads`` ``None``: all heads),
    all run in one call; heads in no group are left as they are in ``out`` (``(out, lse)``
    tensors to write into instead of new ones). ``relative``: a relative-position table added to
    the scores (one pattern only); ``bias``: an additive bias broadcastable to ``(B, H, Lq, Lk)``
    (no gradient); ``dropout``: ``(p, seed)`` for attention dropout on the normalized
    probabilities, ``O = sum_j P_ij Z_ij / (1 - p) v_j`` with ``Z`` = :func:`~headwise.ops.
    attention.dropout.keep_mask` ``(seed, p, B, H, Lq, Lk)`` (``lse`` stays the undropped one;
    ``None`` or ``p`` = 0: none)."""
    call = _Call(pattern, q, k, v, scale, relative, bias, dropout)
    batch, q_len, n_heads = call.q.shape[:3]
    shape = (batch, q_len, n_heads, call.v.shape[3])
    if out is None:
        out = (call.q.new_empty(shape), call.q.new_empty(batch, n_heads, q_len).float())
    result, lse = out
    if call.empty:
        _check("out", result, "(B, Lq, H, Dv)", shape, float32=True, dtype=call.dtype)
        _check("lse", lse, "(B, H, Lq)", (batch, n_heads, q_len), float32=True)
        result[:, :, call.heads.long()] = 0
        lse[:, call.heads.long()] = float("-inf")
        return result, lse
    targets = (
        _target("out", result, "(B, Lq, H, Dv)", shape, call.dtype),
        _target("lse", lse, "(B, H, Lq)", (batch, n_heads, q_len)),
    )
    call.run(call.problem(*targets), backward=False)
    _write_back(*zip(out, targets))
    return result, lse


def tiles_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern: Pattern | HeadGroups,
    scale: float,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    relative: RelativePositionTable | None = None,
    bias: torch.Tensor | None = None,
    dropout: tuple[float, int] | None = None,
) -> torch.Tensor | None:
    """Gradients of :func:`tiles_forward` (same ``pattern`` or head groups, same ``dropout``,
    whose mask is regenerated): dQ written into the rows of their heads in ``grads[0]``, dK and
    dV added into ``grads[1]``, ``grads[2]`` (shaped like q, k, v; all float32, or all of q's
    dtype: then dK and dV are summed in float32 and rounded once; ``out`` and ``grad_out`` are
    read in q's dtype). ``grad_lse`` may be ``None``.
    Returns the gradient of the relative-position table when ``relative`` is given (float32,
    shaped like it)."""
    call = _Call(pattern, q, k, v, scale, relative, bias, dropout)
    specs = ("(B, Lq, H, D)", "(B, Lk, Hkv, D)", "(B, Lk, Hkv, Dv)")
    batch, q_len, n_heads = call.q.shape[:3]
    rows = (batch, q_len, n_heads, call.v.shape[3])
    d_table = None if relative is None else torch.zeros(relative.table.shape)
    # the gradients' dtype: float32, or the inputs' (all three alike)
    grad_dtype = grads[0].dtype if isinstance(grads[0], torch.Tensor) else torch.float32
    grad_dtype = grad_dtype if grad_dtype in (call.dtype, torch.float32) else torch.float32
    if call.empty:
        for name, grad, spec, like in zip(("dq", "dk", "dv"), grads, specs, (q, k, v)):
            _check(name, grad, spec, tuple(like.shape), float32=True, dtype=grad_dtype)
        grads[0][:, :, call.heads.long()] = 0
        return d_table
    targets = [
        _target(name, grad, spec, tuple(like.shape), grad_dtype)
        for name, grad, spec, like in zip(("dq", "dk", "dv"), grads, specs, (q, k, v))
    ]
    read = (
        _operand("out", out, "(B, Lq, H, Dv)", rows, float32=False, dtype=call.dtype),
        _operand("lse", lse, "(B, H, Lq)", (batch, n_heads, q_len), float32=False),
        _operand("grad_out", grad_out, "(B, Lq, H, Dv)", rows, float32=False, dtype=call.dtype),
        None
        if grad_lse is None
        else _operand("grad_lse", grad_lse, "(B, H, Lq)", (batch, n_heads, q_len), False),
    )
    # one table gradient per batch (threads handle different batches of the same head), added
    # in an order fixed by the batch size alone: the same sum whatever the thread count
    per_batch = None if relative is None else torch.zeros(call.batch, *call.rpb.shape)
    call.run(call.problem(*read, *targets, per_batch), backward=True)
    _write_back(*zip(grads, targets))
    return None if relative is None else _pairwise_sum(per_batch).view(relative.table.shape)
