"""The native CPU kernel for sparse patterns: exact attention on tiles of 16 (or 8) queries.

``tiles.c`` is compiled on first use with the system C compiler (``$CC`` or ``cc``; ``-O3
-march=native -fopenmp`` plus ``$HEADWISE_NATIVE_FLAGS``, cached under ``~/.cache/headwise`` or
``$HEADWISE_CACHE``) and loaded with :mod:`ctypes`; when no compiler works, or
``HEADWISE_NATIVE=0`` is set, :func:`available` is false and the ``auto`` dispatch uses the
blockwise path instead.

The kernel puts a tile's queries in the lanes of one vector register (16 floats with AVX-512,
else 8) and, per key, computes every lane's score with one broadcast FMA per head dimension, so a
query costs the keys of its tile's window union and no more: a 4 x 4 tile of a 2-D neighborhood
(k = 16) reads 19 x 19 keys, 1.41x the 16 x 16 each query needs, where a 32-query group of
PyTorch's fused kernel reads 1.71x, and no K block is packed per tile. The softmax of each lane
is exact (two passes over the tile's scores); ``lse`` is in natural log like the other paths. The
backward pass recomputes P from ``lse`` (FlashAttention-2 style) and splits work by K/V head, so
no two threads add into the same dK, dV rows. Scores may carry an additive bias (no gradient) and
a neighborhood's relative-position table (with its gradient).

Plans (query tiles, key segments, per-key lane bits) are cached per pattern and lengths.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from headwise.ops.attention.plan_cache import PlanCache
from headwise.ops.attention.problem import RelativePositionTable
from headwise.patterns import Pattern

_SOURCE = Path(__file__).with_name("tiles.c")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
#: the forward pass takes tiles that see more keys than this in groups that share each chunk of
#: K and V (online softmax), instead of one tile streaming all its keys (0: never)
LONG_TILE_KEYS = 1024


def _fields(spec: str) -> list[tuple[str, type]]:
    """``"q* q_sb q_st"`` -> ctypes fields; ``*`` marks a pointer."""
    return [(n.rstrip("*"), _PTR if n.endswith("*") else _I64) for n in spec.split()]


class _Plan(ctypes.Structure):
    """``struct plan`` of tiles.c, field for field."""

    _fields_ = _fields("tiles rows* seg_offsets* seg_start* seg_len* bit_offsets* bits*")
    _fields_ += _fields("bits_head_stride key_offsets* rpb_index*")


class _Problem(ctypes.Structure):
    """``struct problem`` of tiles.c, field for field."""

    _fields_ = [
        *_fields("q* q_sb q_st q_sh k* k_sb k_st k_sh v* v_sb v_st v_sh out* o_sb o_st o_sh"),
        *_fields("lse* l_sb l_sh dout* do_sb do_st do_sh dlse* dl_sb dl_sh"),
        *_fields("dq* dq_sb dq_st dq_sh dk* dk_sb dk_st dk_sh dv* dv_sb dv_st dv_sh"),
        *_fields("batch group dim dim_v heads* n_heads head_plan* head_rank* tile_offsets*"),
        *_fields("unit_offsets* unit_heads* n_units"),
        ("scale", ctypes.c_double),
        *_fields("max_keys plans* rpb* rpb_sh drpb* drpb_slot"),
        *_fields("bias* bias_sb bias_sh bias_sq bias_sk long_keys"),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("HEADWISE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    path = Path(root) / "headwise" if root else Path.home() / ".cache" / "headwise"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return Path(tempfile.gettempdir())


def _machine() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(x for x in lines if x.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor() + platform.machine()


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("HEADWISE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    compiler = compiler or shutil.which("clang")
    if compiler is None:
        return None
    source = _SOURCE.read_bytes()
    base = ["-O3", "-std=c11", "-ffp-contract=fast", "-shared", "-fPIC"]
    # OpenMP first: PyTorch's own runtime (libgomp.so.1 is loaded already, so the kernel's
    # parallel region runs on its workers); then plain builds, parallel over Python threads.
    native = [*base, "-march=native"]
    extra = shlex.split(os.environ.get("HEADWISE_NATIVE_FLAGS", ""))  # e.g. -mno-avx512f
    variants = ([*native, "-fopenmp"], native, [*base, "-fopenmp"], base)
    machine, cache = _machine(), _cache_dir()
    for flags in ([*variant, *extra] for variant in variants):
        digest = hashlib.sha256(source + repr((compiler, flags, machine)).encode())
        path = cache / f"tiles-{digest.hexdigest()[:16]}.so"
        if not path.exists():
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            command = [compiler, *flags, str(_SOURCE), "-o", str(partial), "-lm"]
            if subprocess.run(command, capture_output=True).returncode != 0:
                continue
            partial.replace(path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        problem = ctypes.POINTER(_Problem)
        for entry in (lib.headwise_tiles_forward, lib.headwise_tiles_backward):
            entry.argtypes = [problem, ctypes.c_int]
        for entry in (lib.headwise_tiles_forward_range, lib.headwise_tiles_backward_range):
            entry.argtypes = [problem, _I64, _I64, _I64]
        return lib
    return None


def available() -> bool:
    """Whether the native tile kernel compiled and loaded on this machine."""
    return _library() is not None


def lanes() -> int:
    """Queries per tile: the floats in one vector register of the machine the kernel was built
    for (16 with AVX-512, else 8)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native tile kernel is not available on this machine")
    return lib.headwise_tiles_lanes()


@dataclass(frozen=True)
class TilePlan:
    """Query tiles of at most :func:`lanes` rows (``rows``: -1 pads), each with its keys as runs of
    consecutive positions and, when some of its queries may not see some of them, lane bits per
    key (bit ``i``: query ``i`` of the tile sees it) for each head of the pattern."""

    rows: torch.Tensor  # int32 (tiles, lanes)
    seg_offsets: torch.Tensor  # int64 (tiles + 1,)
    seg_start: torch.Tensor  # int32
    seg_len: torch.Tensor  # int32
    bit_offsets: torch.Tensor  # int64 (tiles,), -1: every key visible to every query
    bits: torch.Tensor  # int32 (H_p, entries)
    max_keys: int
    key_offsets: torch.Tensor  # int64 (tiles + 1,): each tile's first key entry, then the total

    def as_struct(self, rpb_index: torch.Tensor | None = None) -> _Plan:
        pointers = (self.rows, self.seg_offsets, self.seg_start, self.seg_len, self.bit_offsets)
        return _Plan(
            len(self.rows),
            *[t.data_ptr() for t in pointers],
            self.bits.data_ptr(),
            self.bits.shape[1] if self.bits.shape[0] > 1 else 0,
            self.key_offsets.data_ptr(),
            None if rpb_index is None else rpb_index.data_ptr(),
        )

    def key_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every key entry in kernel order: its position and its tile."""
        lengths = self.seg_len.long()
        starts = torch.repeat_interleave(self.seg_start.long(), lengths)
        first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        positions = starts + torch.arange(len(starts)) - first
        per_tile = self.key_offsets.diff()
        return positions, torch.repeat_interleave(torch.arange(len(self.rows)), per_tile)

    @property
    def entries(self) -> int:
        return self.bits.numel() + 2 * self.seg_start.numel() + self.rows.numel()


#: plans stay cached up to this many, while they hold at most this many int32 entries (512 MiB)
_PLANS: PlanCache[TilePlan] = PlanCache(
    max_plans=256, max_size=1 << 27, size=lambda plan: plan.entries
)


def tile_plan(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
    """The cached plan of ``pattern`` for these lengths."""
    return _PLANS.get((pattern, q_len, kv_len), lambda: _build_plan(pattern, q_len, kv_len))


def _build_plan(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
    rows_list, starts, lengths, seg_counts, bit_offsets, bits = [], [], [], [0], [], []
    entries, max_keys, key_counts = 0, 1, [0]
    width = lanes()
    for panel_keys, groups in pattern.key_panels(q_len, kv_len, width):
        candidates = torch.arange(kv_len) if panel_keys is None else panel_keys
        for group in groups:
            positions = torch.arange(group.start, group.stop) if isinstance(group, slice) else group
            for rows in positions.split(width):
                visible = pattern.visible(rows, candidates, q_len, kv_len)
                seen = visible.any(0).any(0)
                keys, order = torch.sort(candidates[seen])
                visible = visible[:, :, seen][:, :, order]
                breaks = torch.nonzero(keys.diff() != 1).flatten() + 1
                edges = torch.cat([torch.tensor([0]), breaks, torch.tensor([len(keys)])])
                if len(keys) == 0:
                    edges = edges[:1]
                starts.append(keys[edges[:-1]])
                lengths.append(edges.diff())
                seg_counts.append(len(edges) - 1)
                padded = torch.full((width,), -1, dtype=torch.int32)
                padded[: len(rows)] = rows
                rows_list.append(padded)
                max_keys = max(max_keys, len(keys))
                key_counts.append(len(keys))
                if bool(visible.all()):
                    bit_offsets.append(-1)
                    continue
                lane_bits = torch.arange(len(rows)).view(1, -1, 1)
                bits.append((visible.to(torch.int32) << lane_bits).sum(1, dtype=torch.int32))
                bit_offsets.append(entries)
                entries += len(keys)
    heads = max((b.shape[0] for b in bits), default=1)
    return TilePlan(
        rows=torch.stack(rows_list),
        seg_offsets=torch.tensor(seg_counts).cumsum(0),
        seg_start=torch.cat(starts).to(torch.int32),
        seg_len=torch.cat(lengths).to(torch.int32),
        bit_offsets=torch.tensor(bit_offsets, dtype=torch.int64),
        bits=torch.cat([b.expand(heads, -1) for b in bits], 1)
        if bits
        else torch.zeros(1, 1, dtype=torch.int32),
        max_keys=max_keys,
        key_offsets=torch.tensor(key_counts).cumsum(0),
    )


@functools.lru_cache(maxsize=16)
def _rpb_index(pattern: Pattern, q_len: int, kv_len: int) -> torch.Tensor:
    """``(entries, lanes)`` int32: per key entry of the plan and query lane, the flat index into
    a head's relative-position table (``pattern.relative_index``; empty lanes read index 0, they
    are never written)."""
    plan = tile_plan(pattern, q_len, kv_len)
    positions, tile = plan.key_entries()
    rows = plan.rows[tile].long().clamp(min=0)
    return pattern.relative_index(rows, positions[:, None]).to(torch.int32).contiguous()


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="headwise-tiles")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can take these inputs: float32 CPU tensors, and the kernel compiled."""
    return _float32_cpu(q, k, v) and available()


def _float32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _view(t: torch.Tensor | None, dims: int = 3) -> list:
    """A tensor as the pointer and leading strides of ``struct problem`` (0s for ``None``)."""
    if t is None:
        return [None] + [0] * dims
    return [t.data_ptr(), *t.stride()[:dims]]


HeadGroups = Sequence[tuple[Pattern, Sequence[int] | None]]


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
    ):
        lib = _library()
        if lib is None:
            raise RuntimeError("the native tile kernel is not available on this machine")
        if not _float32_cpu(q, k, v):
            raise ValueError(
                "the native tile kernel takes float32 CPU tensors; got q, k, v as "
                f"{[(t.dtype, t.device.type) for t in (q, k, v)]}"
            )
        self.lib, self.scale = lib, scale
        self.q, self.k, self.v = (_last_dim_contiguous(t) for t in (q, k, v))
        self.batch, q_len, all_heads, self.dim = q.shape
        kv_len, kv_heads = k.shape[1], k.shape[2]
        self.group = all_heads // kv_heads
        if isinstance(groups, Pattern):
            groups = ((groups, None),)
        heads, head_plan, head_rank, self.plans = [], [], [], []
        for index, (pattern, members) in enumerate(groups):
            members = list(range(all_heads) if members is None else members)
            heads += members
            head_plan += [index] * len(members)
            head_rank += range(len(members))
            self.plans.append(None if q_len * kv_len == 0 else tile_plan(pattern, q_len, kv_len))
            if self.plans[-1] is not None and self.plans[-1].bits.shape[0] not in (1, len(members)):
                raise ValueError(
                    f"pattern {pattern} has {self.plans[-1].bits.shape[0]} heads; its group "
                    f"has {len(members)}"
                )
        if len(set(heads)) != len(heads) or not all(0 <= h < all_heads for h in heads):
            raise ValueError(f"head groups must name distinct heads < {all_heads}; got {heads}")
        self.heads = torch.tensor(heads, dtype=torch.int32)
        self.empty = self.batch * q_len * kv_len * len(heads) == 0
        if self.empty:
            return
        self.head_plan = torch.tensor(head_plan, dtype=torch.int32)
        self.head_rank = torch.tensor(head_rank, dtype=torch.int32)
        tiles = [len(self.plans[i].rows) for i in head_plan]
        self.tile_offsets = torch.tensor([0, *tiles]).cumsum(0)
        kv = self.heads // self.group
        units = [torch.nonzero(kv == j).flatten() for j in torch.unique(kv)]
        self.unit_heads = torch.cat(units).to(torch.int32)
        self.unit_offsets = torch.tensor([0, *[len(u) for u in units]]).cumsum(0)
        self.rpb = self.rpb_index = None
        if relative is not None:
            if len(self.plans) != 1 or groups[0][0] != relative.pattern:
                raise ValueError("a relative-position table needs the call's one pattern")
            if relative.table.shape[0] != all_heads:
                raise ValueError(
                    f"the relative-position table must have one table per head ({all_heads}); "
                    f"got {tuple(relative.table.shape)}"
                )
            self.rpb = relative.table.detach().float().flatten(1).contiguous()
            self.rpb_index = _rpb_index(relative.pattern, q_len, kv_len)
        # a broadcastable additive bias, seen as (B, H, Lq, Lk) with stride 0 where it broadcasts
        self.bias = None
        if bias is not None:
            full = bias.detach().float().reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
            self.bias = full.expand(self.batch, all_heads, q_len, kv_len)
        self.plan_structs = (_Plan * len(self.plans))(
            *[p.as_struct(self.rpb_index) for p in self.plans]
        )

    def problem(
        self, out, lse, dout=None, dlse=None, dq=None, dk=None, dv=None, drpb=None
    ) -> _Problem:
        return _Problem(
            *_view(self.q), *_view(self.k), *_view(self.v), *_view(out), *_view(lse, 2),
            *_view(dout), *_view(dlse, 2), *_view(dq), *_view(dk), *_view(dv),
            self.batch, self.group, self.dim, self.v.shape[3],
            self.heads.data_ptr(), len(self.heads), self.head_plan.data_ptr(),
            self.head_rank.data_ptr(), self.tile_offsets.data_ptr(),
            self.unit_offsets.data_ptr(), self.unit_heads.data_ptr(), len(self.unit_offsets) - 1,
            self.scale,
            max(plan.max_keys for plan in self.plans), ctypes.addressof(self.plan_structs),
            *_view(self.rpb, 1), *_view(drpb, 1), *_view(self.bias, 4), LONG_TILE_KEYS,
        )  # fmt: skip

    def threads(self, backward: bool) -> int:
        per_batch = len(self.unit_offsets) - 1 if backward else int(self.tile_offsets[-1])
        return max(1, min(torch.get_num_threads(), self.batch * per_batch))

    def run(self, problem: _Problem, backward: bool) -> None:
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
            status = list(_pool(threads).map(call, bounds[:-1], bounds[1:], range(threads)))
        if any(status):
            raise MemoryError("the native tile kernel could not allocate its scratch memory")


def _check_out(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape or t.dtype != torch.float32 or (t.numel() and t.stride(-1) != 1):
        raise ValueError(
            f"{name} must be float32 {shape} with a contiguous last dim; got {t.dtype} "
            f"{tuple(t.shape)}, strides {t.stride()}"
        )


def tiles_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | HeadGroups,
    scale: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    relative: RelativePositionTable | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``pattern`` for float32 CPU ``(B, L, H, D)`` tensors (GQA allowed):
    ``out`` ``(B, Lq, H, Dv)``, ``lse`` ``(B, H, Lq)``; rows that see no key give 0 and -inf.

    ``pattern`` may be head groups ``((pattern, heads), ...)`` (``heads`` ``None``: all heads),
    all run in one call; heads in no group are left as they are in ``out`` (``(out, lse)``
    tensors to write into instead of new ones). ``relative``: a relative-position table added to
    the scores (one pattern only); ``bias``: an additive bias broadcastable to ``(B, H, Lq, Lk)``
    (no gradient)."""
    call = _Call(pattern, q, k, v, scale, relative, bias)
    batch, q_len, n_heads = q.shape[:3]
    if out is None:
        out = (q.new_empty(batch, q_len, n_heads, v.shape[3]), q.new_empty(batch, n_heads, q_len))
    result, lse = out
    _check_out("out", result, (batch, q_len, n_heads, v.shape[3]))
    _check_out("lse", lse, (batch, n_heads, q_len))
    if call.empty:
        result[:, :, call.heads.long()] = 0
        lse[:, call.heads.long()] = float("-inf")
        return result, lse
    call.run(call.problem(result, lse), backward=False)
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
) -> torch.Tensor | None:
    """Gradients of :func:`tiles_forward` (same ``pattern`` or head groups): dQ written into the
    rows of their heads in ``grads[0]``, dK and dV added into ``grads[1]``, ``grads[2]``
    (float32, shaped like q, k, v). ``grad_lse`` may be ``None``. Returns the gradient of the
    relative-position table when ``relative`` is given (float32, shaped like it)."""
    call = _Call(pattern, q, k, v, scale, relative, bias)
    for name, grad, like in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        _check_out(name, grad, tuple(like.shape))
    d_table = None if relative is None else torch.zeros(relative.table.shape)
    if call.empty:
        grads[0][:, :, call.heads.long()] = 0
        return d_table
    grad_out, out = (_last_dim_contiguous(t.float()) for t in (grad_out, out))
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    # one table gradient per thread slot (threads handle different batches of the same head)
    slots = None if relative is None else torch.zeros(call.threads(True), *call.rpb.shape)
    call.run(call.problem(out, lse, grad_out, grad_lse, *grads, slots), backward=True)
    return None if relative is None else slots.sum(0).view(relative.table.shape)
