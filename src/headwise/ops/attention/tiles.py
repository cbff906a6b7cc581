"""The native CPU forward kernel for sparse patterns: exact attention on tiles of 16 queries.

``tiles.c`` is compiled on first use with the system C compiler (``-O3 -march=native``) and
loaded with :mod:`ctypes`; when no compiler works, or ``HEADWISE_NATIVE=0`` is set,
:func:`available` is false and the blockwise path keeps PyTorch's fused kernel. The kernel puts a
tile's queries in the lanes of one vector and, per key, computes every lane's score with one
broadcast FMA per head dimension, so a query costs the keys of its tile's window union and no
more: a 4 x 4 tile of a 2-D neighborhood (k = 16) reads 19 x 19 keys, 1.41x the 16 x 16 each
query needs, where a 32-query group of PyTorch's kernel reads 1.71x, and the kernel packs no K
block per tile. The softmax of each lane is exact (two passes over the tile's scores) and ``lse``
is in natural log like the other paths, so the blockwise backward pass runs on what it returns.

Plans (query tiles, key segments, per-key lane bits) are cached per pattern and lengths.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from headwise.patterns import Pattern

_SOURCE = Path(__file__).with_name("tiles.c")
#: queries per tile: the lanes of the kernel's vectors (``LANES`` in tiles.c)
LANES = 16
_LOG2E = 1.4426950408889634
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _Problem(ctypes.Structure):
    """``struct problem`` of tiles.c, field for field."""

    _fields_ = [
        ("q", _PTR), ("q_sb", _I64), ("q_st", _I64), ("q_sh", _I64),
        ("k", _PTR), ("k_sb", _I64), ("k_st", _I64), ("k_sh", _I64),
        ("v", _PTR), ("v_sb", _I64), ("v_st", _I64), ("v_sh", _I64),
        ("out", _PTR), ("o_sb", _I64), ("o_st", _I64), ("o_sh", _I64),
        ("lse", _PTR), ("l_sb", _I64), ("l_sh", _I64),
        ("heads", _I64), ("group", _I64), ("dim", _I64), ("dim_v", _I64),
        ("scale_log2", ctypes.c_double),
        ("tiles", _I64), ("max_keys", _I64),
        ("rows", _PTR), ("seg_offsets", _PTR), ("seg_start", _PTR), ("seg_len", _PTR),
        ("bit_offsets", _PTR), ("bits", _PTR), ("bits_head_stride", _I64),
    ]  # fmt: skip


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
    for flags in ([*native, "-fopenmp"], native, [*base, "-fopenmp"], base):
        digest = hashlib.sha256(source + repr((compiler, flags, _machine())).encode())
        path = _cache_dir() / f"tiles-{digest.hexdigest()[:16]}.so"
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
        if lib.headwise_tiles_lanes() != LANES:
            continue
        lib.headwise_tiles_forward.argtypes = [ctypes.POINTER(_Problem), _I64, ctypes.c_int]
        lib.headwise_tiles_forward_range.argtypes = [ctypes.POINTER(_Problem), _I64, _I64]
        return lib
    return None


def available() -> bool:
    """Whether the native tile kernel compiled and loaded on this machine."""
    return _library() is not None


@dataclass(frozen=True)
class TilePlan:
    """Query tiles of at most ``LANES`` rows (``rows``: -1 pads), each with its keys as runs of
    consecutive positions and, when some of its queries may not see some of them, lane bits per
    key (bit ``i``: query ``i`` of the tile sees it) for each head of the pattern."""

    rows: torch.Tensor  # int32 (tiles, LANES)
    seg_offsets: torch.Tensor  # int64 (tiles + 1,)
    seg_start: torch.Tensor  # int32
    seg_len: torch.Tensor  # int32
    bit_offsets: torch.Tensor  # int64 (tiles,), -1: every key visible to every query
    bits: torch.Tensor  # int32 (H_p, entries)
    max_keys: int


@functools.lru_cache(maxsize=256)
def tile_plan(pattern: Pattern, q_len: int, kv_len: int) -> TilePlan:
    rows_list, starts, lengths, seg_counts, bit_offsets, bits = [], [], [], [0], [], []
    entries, max_keys = 0, 1
    for panel_keys, groups in pattern.key_panels(q_len, kv_len, LANES):
        candidates = torch.arange(kv_len) if panel_keys is None else panel_keys
        for group in groups:
            positions = torch.arange(group.start, group.stop) if isinstance(group, slice) else group
            for rows in positions.split(LANES):
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
                padded = torch.full((LANES,), -1, dtype=torch.int32)
                padded[: len(rows)] = rows
                rows_list.append(padded)
                max_keys = max(max_keys, len(keys))
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
    )


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="headwise-tiles")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can take these inputs: float32 CPU tensors, and the kernel compiled."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v)) and available()
    )


def tiles_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``pattern`` for float32 CPU ``(B, L, H, D)`` tensors (GQA allowed):
    ``out`` ``(B, Lq, H, Dv)``, ``lse`` ``(B, H, Lq)``; rows that see no key give 0 and -inf."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native tile kernel is not available on this machine")
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v)):
        raise ValueError(
            "the native tile kernel takes float32 CPU tensors; got q, k, v as "
            f"{[(t.dtype, t.device.type) for t in (q, k, v)]}"
        )
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    out = q.new_zeros(batch, q_len, heads, v.shape[3])
    lse = torch.full((batch, heads, q_len), float("-inf"))
    if q_len == 0 or kv_len == 0 or batch == 0:
        return out, lse
    plan = tile_plan(pattern, q_len, kv_len)
    if plan.bits.shape[0] not in (1, heads):
        raise ValueError(f"pattern has {plan.bits.shape[0]} heads; q has {heads}")
    q = q if q.stride(3) == 1 else q.contiguous()
    v = v if v.stride(3) == 1 else v.contiguous()
    k = k if k.stride(3) == 1 else k.contiguous()
    problem = _Problem(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        out.data_ptr(), out.stride(0), out.stride(1), out.stride(2),
        lse.data_ptr(), lse.stride(0), lse.stride(1),
        heads, heads // kv_heads, dim, v.shape[3],
        scale * _LOG2E,
        len(plan.rows), plan.max_keys,
        plan.rows.data_ptr(), plan.seg_offsets.data_ptr(), plan.seg_start.data_ptr(),
        plan.seg_len.data_ptr(), plan.bit_offsets.data_ptr(), plan.bits.data_ptr(),
        plan.bits.shape[1] if plan.bits.shape[0] > 1 else 0,
    )  # fmt: skip
    items = batch * heads * len(plan.rows)
    threads = max(1, min(torch.get_num_threads(), items))
    if lib.headwise_tiles_openmp() or threads == 1:
        status = [lib.headwise_tiles_forward(ctypes.byref(problem), items, threads)]
    else:
        bounds = [items * i // threads for i in range(threads + 1)]
        run = functools.partial(lib.headwise_tiles_forward_range, ctypes.byref(problem))
        status = list(_pool(threads).map(run, bounds[:-1], bounds[1:]))
    if any(status):
        raise MemoryError("the native tile kernel could not allocate its scratch memory")
    return out, lse
