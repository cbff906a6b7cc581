"""The native CPU kernel for sparse patterns: exact attention on tiles of 16 (or 8) queries.

``tiles.c`` is compiled on first use with the system C compiler (``$CC`` or ``cc``; ``-O3
-march=native -fopenmp`` plus ``$HEADWISE_NATIVE_FLAGS``) and loaded with :mod:`ctypes`; when no
compiler works, or ``HEADWISE_NATIVE=0`` is set, :func:`available` is false and the ``auto``
dispatch uses the blockwise path instead. The library is cached in ``$HEADWISE_CACHE/headwise``
(else ``~/.cache/headwise``), a directory created ``0700`` and used only while no other user
can write to it (loading a library runs its code); each file's name records the SHA-256 of its
content, checked before loading, and a file is written under a temporary name and renamed, so a
damaged or partial one is rebuilt, never loaded. A cache that cannot be used gives one warning
and the build happens in a private temporary directory, removed once loaded.

Every tensor handed to C is checked (dtype, device, shape, overlap) with an error naming it,
and given to C with a contiguous last dim (copied where it is not, and copied back for outputs);
results do not depend on the thread count.

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
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
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
        *_fields("max_keys plans* rpb* rpb_sh drpb* drpb_sb"),
        *_fields("bias* bias_sb bias_sh bias_sq bias_sk long_keys"),
    ]


#: what the wrapper calls: a library without all of them is not this kernel
_ENTRY_POINTS = (
    "headwise_tiles_forward",
    "headwise_tiles_backward",
    "headwise_tiles_forward_range",
    "headwise_tiles_backward_range",
    "headwise_tiles_openmp",
    "headwise_tiles_lanes",
)


def _cache_dir() -> Path:
    """``$HEADWISE_CACHE/headwise``, else ``$XDG_CACHE_HOME/headwise``, else
    ``~/.cache/headwise``."""
    root = os.environ.get("HEADWISE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "headwise" if root else Path.home() / ".cache" / "headwise"


def _others_can_write(path: Path) -> str | None:
    """Why another user could put a library into the directory ``path`` (``None``: none can).
    Loading a library runs its code in this process, so only a directory of the current user
    without group or other write bits is a cache, and each ancestor must belong to the user or
    root and not be writable by everyone unless sticky (``/tmp``), so that no one else can
    rename the cache away and put another in its place. (Group-writable ancestors pass: with
    per-user groups, ``umask 002`` makes them common.)"""
    uid = os.getuid()
    status = os.lstat(path)
    if not stat.S_ISDIR(status.st_mode):
        return "it is not a directory"
    if status.st_uid != uid:
        return f"it belongs to user {status.st_uid}, not to user {uid}"
    if status.st_mode & 0o022:
        return f"group or others may write to it (mode {oct(status.st_mode & 0o7777)})"
    for parent in path.parents:
        status = os.stat(parent)
        if status.st_uid not in (uid, 0):
            return f"its parent {parent} belongs to user {status.st_uid}"
        if status.st_mode & 0o002 and not status.st_mode & stat.S_ISVTX:
            return f"anyone may rename entries of its parent {parent}"
    return None


def _private_cache() -> Path | None:
    """The cache directory (created ``0700``) when only this user can write to it, else
    ``None`` after a warning."""
    path = _cache_dir()
    try:
        real = Path(os.path.realpath(path))
        os.makedirs(real, mode=0o700, exist_ok=True)
        reason = _others_can_write(real)
    except OSError as error:
        reason = f"it cannot be created: {error}"
    if reason is None:
        return real
    _cache_unusable(path, reason)
    return None


def _cache_unusable(path: Path, reason: str) -> None:
    warnings.warn(
        f"headwise: the native kernel's cache {path} is not used ({reason}); the kernel is "
        "compiled in a private temporary directory for this process instead. Set "
        "HEADWISE_CACHE to a directory of your own to keep the build.",
        RuntimeWarning,
        stacklevel=3,
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _store(directory: Path, key: str, data: bytes) -> Path:
    """``data`` written to ``directory`` under a name that records its SHA-256: first under a
    temporary name, then renamed (atomic), so no process sees a partial library."""
    path = directory / f"tiles-{key}-{_digest(data)}.so"
    handle, partial = tempfile.mkstemp(dir=directory, prefix=f".tiles-{key}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return path


def _open(path: Path, digest: str) -> ctypes.CDLL | None:
    """The library at ``path`` when its content has the SHA-256 ``digest`` (a truncated, empty
    or garbled file has not) and it has the kernel's entry points; else ``None``."""
    try:
        if _digest(path.read_bytes()) != digest:
            return None
        lib = ctypes.CDLL(str(path))
        entries = [getattr(lib, name) for name in _ENTRY_POINTS]
    except (OSError, AttributeError):
        return None
    problem = ctypes.POINTER(_Problem)
    for entry in entries[:2]:
        entry.argtypes = [problem, ctypes.c_int]
    for entry in entries[2:4]:
        entry.argtypes = [problem, _I64, _I64]
    return lib


def _cached(cache: Path, key: str) -> ctypes.CDLL | None:
    """The intact library built for ``key`` in the cache (its name ends with the SHA-256 of its
    content); damaged ones are removed, to be built again."""
    for path in sorted(cache.glob(f"tiles-{key}-*.so")):
        lib = _open(path, path.stem.rsplit("-", 1)[1])
        if lib is not None:
            return lib
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def _machine() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(x for x in lines if x.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor() + platform.machine()


_BUILD_LOCK = threading.Lock()


def _library() -> ctypes.CDLL | None:
    """The kernel, built once per process (threads that ask at once wait for one build)."""
    with _BUILD_LOCK:
        return _build_library()


@functools.cache
def _build_library() -> ctypes.CDLL | None:
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
    machine, cache = _machine(), _private_cache()
    with contextlib.ExitStack() as stack:
        build = None
        for flags in ([*variant, *extra] for variant in variants):
            key = hashlib.sha256(source + repr((compiler, flags, machine)).encode())
            key = key.hexdigest()[:16]
            lib = None if cache is None else _cached(cache, key)
            if lib is not None:
                return lib
            if build is None:  # a directory of this process (mkdtemp: 0700), removed on return
                try:
                    build = stack.enter_context(tempfile.TemporaryDirectory(prefix="headwise-"))
                except OSError:
                    return None
            built = Path(build) / f"{key}.so"
            command = [compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"]
            if subprocess.run(command, capture_output=True).returncode != 0:
                continue
            data, path = built.read_bytes(), built
            if cache is not None:
                try:
                    path = _store(cache, key, data)
                except OSError as error:
                    _cache_unusable(_cache_dir(), f"it cannot be written: {error}")
                    cache = None
            lib = _open(path, _digest(data))
            if lib is not None:
                return lib
            with contextlib.suppress(OSError):
                os.unlink(path)  # this variant does not load here: the next one may
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
    pattern.check_lengths(q_len, kv_len)
    plan = _tiles_of(pattern, q_len, kv_len)
    # the kernel indexes q and k, v rows with these: each must be in range
    rows, ends = plan.rows, plan.seg_start + plan.seg_len
    if rows.numel() and (rows.max() >= q_len or (len(ends) and ends.max() > kv_len)):
        raise ValueError(
            f"pattern {pattern} names positions beyond q_len={q_len}, kv_len={kv_len}"
        )
    return plan


def _tiles_of(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
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
def _rpb_index(pattern: Pattern, q_len: int, kv_len: int) -> tuple[torch.Tensor, int]:
    """``(entries, lanes)`` int32: per key entry of the plan and query lane, the flat index into
    a head's relative-position table (``pattern.relative_index``; empty lanes read index 0, they
    are never written); and the entries a head's table must have for every index to be in it."""
    plan = tile_plan(pattern, q_len, kv_len)
    positions, tile = plan.key_entries()
    rows = plan.rows[tile].long().clamp(min=0)
    index = pattern.relative_index(rows, positions[:, None]).to(torch.int32).contiguous()
    return index, int(index.max()) + 1 if index.numel() else 0


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="headwise-tiles")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can take these inputs: float32 CPU tensors, and the kernel compiled."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v)) and (
        available()
    )


# Every tensor handed to C goes through _operand (read by C) or _target (written by C): the
# kernel assumes float32 on the CPU, the shape of its ``struct problem`` comment and a last dim
# of stride 1 (the other strides are passed along). Shapes use None for any size.


def _check(name: str, t, spec: str, shape: tuple[int | None, ...], float32: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
    if float32 and (t.device.type != "cpu" or t.dtype != torch.float32):
        raise ValueError(f"{name} must be a float32 CPU tensor; got {t.dtype} on {t.device}")
    if t.device.type != "cpu" or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point CPU tensor; got {t.dtype} on {t.device}")
    if t.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, t.shape)):
        sizes = ", ".join("*" if n is None else str(n) for n in shape)
        raise ValueError(f"{name} must be {spec} = ({sizes}); got {tuple(t.shape)}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _operand(name: str, t, spec: str, shape: tuple[int | None, ...], float32: bool = True):
    """``t`` as the kernel reads it: float32 (a copy when ``float32`` is false and it is another
    floating dtype), its last dim contiguous (a copy when not)."""
    _check(name, t, spec, shape, float32)
    return _last_dim_contiguous(t.detach().float())


def _target(name: str, t, spec: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """Where the kernel writes what belongs in ``t``: ``t`` itself, or a contiguous copy of it
    when its last dim is strided or its elements might share memory (:func:`_write_back` puts
    it into ``t``). An expanded ``t`` (a stride 0) cannot hold a result."""
    _check(name, t, spec, shape, float32=True)
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
        self.lib, self.scale = lib, scale
        self.q = _operand("q", q, "(B, Lq, H, D)", (None,) * 4)
        self.batch, q_len, all_heads, self.dim = self.q.shape
        self.k = _operand("k", k, "(B, Lk, Hkv, D)", (self.batch, None, None, self.dim))
        kv_len, kv_heads = self.k.shape[1:3]
        self.v = _operand("v", v, "(B, Lk, Hkv, Dv)", (self.batch, kv_len, kv_heads, None))
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
            self.rpb_index, entries = _rpb_index(relative.pattern, q_len, kv_len)
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
            status = list(_pool(threads).map(call, bounds[:-1], bounds[1:]))
        if any(status):
            raise MemoryError("the native tile kernel could not allocate its scratch memory")


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``pattern`` for float32 CPU ``(B, L, H, D)`` tensors (GQA allowed):
    ``out`` ``(B, Lq, H, Dv)``, ``lse`` ``(B, H, Lq)``; rows that see no key give 0 and -inf.

    ``pattern`` may be head groups ``((pattern, heads), ...)`` (``heads`` ``None``: all heads),
    all run in one call; heads in no group are left as they are in ``out`` (``(out, lse)``
    tensors to write into instead of new ones). ``relative``: a relative-position table added to
    the scores (one pattern only); ``bias``: an additive bias broadcastable to ``(B, H, Lq, Lk)``
    (no gradient)."""
    call = _Call(pattern, q, k, v, scale, relative, bias)
    batch, q_len, n_heads = call.q.shape[:3]
    shape = (batch, q_len, n_heads, call.v.shape[3])
    if out is None:
        out = (call.q.new_empty(shape), call.q.new_empty(batch, n_heads, q_len))
    result, lse = out
    if call.empty:
        _check("out", result, "(B, Lq, H, Dv)", shape, float32=True)
        _check("lse", lse, "(B, H, Lq)", (batch, n_heads, q_len), float32=True)
        result[:, :, call.heads.long()] = 0
        lse[:, call.heads.long()] = float("-inf")
        return result, lse
    targets = (
        _target("out", result, "(B, Lq, H, Dv)", shape),
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
) -> torch.Tensor | None:
    """Gradients of :func:`tiles_forward` (same ``pattern`` or head groups): dQ written into the
    rows of their heads in ``grads[0]``, dK and dV added into ``grads[1]``, ``grads[2]``
    (float32, shaped like q, k, v). ``grad_lse`` may be ``None``. Returns the gradient of the
    relative-position table when ``relative`` is given (float32, shaped like it)."""
    call = _Call(pattern, q, k, v, scale, relative, bias)
    specs = ("(B, Lq, H, D)", "(B, Lk, Hkv, D)", "(B, Lk, Hkv, Dv)")
    batch, q_len, n_heads = call.q.shape[:3]
    rows = (batch, q_len, n_heads, call.v.shape[3])
    d_table = None if relative is None else torch.zeros(relative.table.shape)
    if call.empty:
        for name, grad, spec, like in zip(("dq", "dk", "dv"), grads, specs, (q, k, v)):
            _check(name, grad, spec, tuple(like.shape), float32=True)
        grads[0][:, :, call.heads.long()] = 0
        return d_table
    targets = [
        _target(name, grad, spec, tuple(like.shape))
        for name, grad, spec, like in zip(("dq", "dk", "dv"), grads, specs, (q, k, v))
    ]
    read = (
        _operand("out", out, "(B, Lq, H, Dv)", rows, float32=False),
        _operand("lse", lse, "(B, H, Lq)", (batch, n_heads, q_len), float32=False),
        _operand("grad_out", grad_out, "(B, Lq, H, Dv)", rows, float32=False),
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
