"""Building the native kernel: compile ``tiles.c``, keep the library in a private cache, load it.

``tiles.c`` is compiled on first use with the system C compiler (``$CC`` or ``cc``; ``-O3
-march=native -fopenmp`` plus ``$HEADWISE_NATIVE_FLAGS``) and loaded with :mod:`ctypes`; when no
compiler works, or ``HEADWISE_NATIVE=0`` is set, :func:`available` is false (:func:`why_not`
says why) and the ``auto`` dispatch uses the blockwise path instead. The library is cached in
``$HEADWISE_CACHE/headwise`` (else ``~/.cache/headwise``), a directory created ``0700`` and used
only while no other user can write to it (loading a library runs its code). Each file's name
records the SHA-256 of its content; a cached file is opened once, without following a symlink,
and loaded only when that descriptor shows a regular file of the current user that no one else
may write and its bytes have that hash; the loader then maps the same descriptor
(``/proc/self/fd/N`` on Linux), so the bytes checked are the bytes loaded. A file is written
under a temporary name and renamed, so a damaged or partial one is rebuilt, never loaded. A
cache that cannot be used (not private, not writable, or on a file system whose libraries cannot
be loaded, e.g. mounted ``noexec``) gives one warning and the library is built and loaded in a
private temporary directory, removed once loaded.

:class:`PlanStruct` and :class:`ProblemStruct` are the C structs the entry points take, field for
field (:mod:`.plan` and :mod:`.call` fill them).
"""

from __future__ import annotations

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
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

#: the kernel's C source, beside this module
SOURCE = Path(__file__).with_name("tiles.c")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _fields(spec: str) -> list[tuple[str, type]]:
    """``"q* q_sb q_st"`` -> ctypes fields; ``*`` marks a pointer."""
    return [(n.rstrip("*"), _PTR if n.endswith("*") else _I64) for n in spec.split()]


class PlanStruct(ctypes.Structure):
    """``struct plan`` of tiles.c, field for field."""

    _fields_ = _fields("tiles rows* seg_offsets* seg_start* seg_len* bit_offsets* bits*")
    _fields_ += _fields("bits_head_stride key_offsets* rpb_index*")


class ProblemStruct(ctypes.Structure):
    """``struct problem`` of tiles.c, field for field."""

    _fields_ = [
        *_fields("q* q_sb q_st q_sh k* k_sb k_st k_sh v* v_sb v_st v_sh out* o_sb o_st o_sh"),
        *_fields("lse* l_sb l_sh dout* do_sb do_st do_sh dlse* dl_sb dl_sh"),
        *_fields("dq* dq_sb dq_st dq_sh dk* dk_sb dk_st dk_sh dv* dv_sb dv_st dv_sh"),
        *_fields("batch group dim dim_v heads* n_heads head_plan* head_rank* tile_offsets*"),
        *_fields("unit_offsets* unit_heads* n_units"),
        ("scale", ctypes.c_double),
        *_fields("max_keys plans* rpb* rpb_sh drpb* drpb_sb"),
        *_fields("bias* bias_sb bias_sh bias_sq bias_sk long_keys dtype grad_dtype"),
        *_fields("kv_len"),
        *_fields("dropout threshold all_heads q_len"),
        ("seed", ctypes.c_uint64),
        ("keep_scale", ctypes.c_double),
    ]


#: what the wrapper calls: a library without all of them is not this kernel
_ENTRY_POINTS = (
    "headwise_tiles_forward",
    "headwise_tiles_backward",
    "headwise_tiles_forward_range",
    "headwise_tiles_backward_range",
    "headwise_tiles_openmp",
    "headwise_tiles_lanes",
    "headwise_all_finite",
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


_KERNEL_FALLBACK = (
    "the kernel is compiled in a private temporary directory for this process instead"
)


@functools.cache
def source_digest() -> str:
    """A digest of the kernel's C source: times measured on another kernel are stale."""
    return _digest(SOURCE.read_bytes())


def private_cache(fallback: str = _KERNEL_FALLBACK) -> Path | None:
    """The headwise cache directory (``$HEADWISE_CACHE/headwise``, else
    ``$XDG_CACHE_HOME/headwise``, else ``~/.cache/headwise``; created ``0700``) when only this
    user can write to it; else ``None`` after one warning naming the directory, why, and
    ``fallback`` (what the caller does instead). Other headwise caches (converted models)
    keep their files in subdirectories of it under the same rule."""
    path = _cache_dir()
    try:
        real = Path(os.path.realpath(path))
        os.makedirs(real, mode=0o700, exist_ok=True)
        reason = _others_can_write(real)
    except OSError as error:
        reason = f"it cannot be created: {error}"
    if reason is None:
        return real
    _cache_unusable(path, reason, fallback)
    return None


def _cache_unusable(path: Path, reason: str, fallback: str = _KERNEL_FALLBACK) -> None:
    warnings.warn(
        f"headwise: the cache {path} is not used ({reason}); {fallback}. Set "
        "HEADWISE_CACHE to a directory of your own to keep what is cached there.",
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


#: Linux names an open descriptor's file ``/proc/self/fd/N``: the loader maps what was hashed
_BY_DESCRIPTOR = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")
#: descriptors of loaded libraries, open for the process's life (ctypes never unloads one), so
#: no later file gets the same ``/proc/self/fd/N`` name, which the loader would take for a
#: library it already has
_HELD: list[int] = []


def _ours(status: os.stat_result) -> bool:
    """Whether ``status`` is a regular file of the current user that no one else may write."""
    private = status.st_uid == os.getuid() and not status.st_mode & 0o022
    return stat.S_ISREG(status.st_mode) and private


def _open(path: Path, digest: str) -> ctypes.CDLL | None:
    """The library at ``path`` when it is a regular file (not a symlink) of the current user
    that no one else may write, its content has the SHA-256 ``digest`` (a truncated, empty or
    garbled file has not) and it has the kernel's entry points; else ``None``. A file that
    passes every check but that the loader refuses raises the loader's ``OSError`` (a
    ``noexec`` mount: "failed to map segment from shared object").

    The file is opened once: its type, owner and mode are those of the open descriptor, its
    bytes are read from it, and on Linux the loader maps that descriptor, so nobody can swap the
    file between the checks and the load."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # gone, or a symlink (ELOOP)
        return None
    try:
        with open(fd, "rb", closefd=False) as file:
            intact = _ours(os.fstat(fd)) and _digest(file.read()) == digest
    except OSError:
        intact = False
    if not intact:
        os.close(fd)
        return None
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}" if _BY_DESCRIPTOR else str(path))
    except OSError as error:
        os.close(fd)
        raise OSError(f"the loader refuses {path}: {error}") from error
    _HELD.append(fd)
    try:
        entries = [getattr(lib, name) for name in _ENTRY_POINTS]
    except AttributeError:
        return None
    problem = ctypes.POINTER(ProblemStruct)
    for entry in entries[:2]:
        entry.argtypes = [problem, ctypes.c_int]
    for entry in entries[2:4]:
        entry.argtypes = [problem, _I64, _I64]
    entries[6].argtypes = [_PTR, *[_I64] * 9]
    return lib


def _cached(cache: Path, key: str) -> ctypes.CDLL | None:
    """The intact library built for ``key`` in the cache (its name ends with the SHA-256 of its
    content); damaged ones are removed, to be built again."""
    for path in sorted(cache.glob(f"tiles-{key}-*.so")):
        with contextlib.suppress(OSError):  # refused by the loader: the build finds out why
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


def library() -> ctypes.CDLL | None:
    """The kernel, built once per process (threads that ask at once wait for one build)."""
    return _built()[0]


def why_not() -> str | None:
    """Why the kernel is not available (``None``: it is)."""
    return _built()[1]


def _built() -> tuple[ctypes.CDLL | None, str | None]:
    with _BUILD_LOCK:
        return _build_once()


@functools.cache
def _build_once() -> tuple[ctypes.CDLL | None, str | None]:
    return _build()


def build_library() -> ctypes.CDLL | None:
    """Load the kernel from the private cache, else compile it (trying OpenMP and
    ``-march=native`` builds first); ``None`` when no build works. Every call loads anew:
    :func:`library` is the process's one copy."""
    return _build()[0]


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    """:func:`build_library`, and why it found no kernel."""
    if os.environ.get("HEADWISE_NATIVE", "1") == "0":
        return None, "HEADWISE_NATIVE=0 turns it off"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    compiler = compiler or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler ($CC, cc, gcc, clang) was found"
    source = SOURCE.read_bytes()
    base = ["-O3", "-std=c11", "-ffp-contract=fast", "-shared", "-fPIC"]
    # OpenMP first: PyTorch's own runtime (libgomp.so.1 is loaded already, so the kernel's
    # parallel region runs on its workers); then plain builds, parallel over Python threads.
    native = [*base, "-march=native"]
    extra = shlex.split(os.environ.get("HEADWISE_NATIVE_FLAGS", ""))  # e.g. -mno-avx512f
    variants = ([*native, "-fopenmp"], native, [*base, "-fopenmp"], base)
    machine, cache = _machine(), private_cache()
    why = f"the C compiler {compiler} could not build {SOURCE.name}"
    with contextlib.ExitStack() as stack:
        build = None
        for flags in ([*variant, *extra] for variant in variants):
            key = hashlib.sha256(source + repr((compiler, flags, machine)).encode())
            key = key.hexdigest()[:16]
            lib = None if cache is None else _cached(cache, key)
            if lib is not None:
                return lib, None
            if build is None:  # a directory of this process (mkdtemp: 0700), removed on return
                try:
                    build = stack.enter_context(tempfile.TemporaryDirectory(prefix="headwise-"))
                except OSError as error:
                    return None, f"no private temporary directory to build in: {error}"
            built = Path(build) / f"{key}.so"
            command = [compiler, *flags, str(SOURCE), "-o", str(built), "-lm"]
            if subprocess.run(command, capture_output=True).returncode != 0:
                continue
            os.chmod(built, 0o700)  # whatever the umask: the loader takes no writable file
            data, refused = built.read_bytes(), None
            if cache is not None:
                try:
                    stored = _store(cache, key, data)
                except OSError as error:
                    _cache_unusable(_cache_dir(), f"it cannot be written: {error}")
                    cache = None
                else:
                    try:
                        lib = _open(stored, _digest(data))
                    except OSError as error:
                        refused = error
                    if lib is not None:
                        return lib, None
                    with contextlib.suppress(OSError):
                        os.unlink(stored)
            try:  # the private build itself: loads when only the cache's file system refuses
                lib = _open(built, _digest(data))
            except OSError as error:
                why = f"the library it built cannot be loaded ({error})"
                continue  # this variant does not load here: the next one may
            if lib is None:
                continue
            if refused is not None:
                _cache_unusable(_cache_dir(), f"its libraries cannot be loaded: {refused}")
            return lib, None
    return None, why


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the native tile kernel compiled and loaded on this machine (under
    ``torch.compile``, asked outside the graph: its answer is a constant of the graph)."""
    return library() is not None


def lanes() -> int:
    """Queries per tile: the floats in one vector register of the machine the kernel was built
    for (16 with AVX-512, else 8)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native tile kernel is not available: {why_not()}")
    return lib.headwise_tiles_lanes()
