"""Measured dispatch: ``auto`` picks the backend that is fastest for the call's class of problem.

The fixed priority of :mod:`headwise.ops.attention.dispatch` is right for one machine and one
load; on another CPU, thread count or pattern the order can reverse (``native`` beats ``sdpa``
for causal attention by 1.1-1.8x on a 2-core x86 CPU). So, as FFTW's planner does (Frigo and
Johnson, "The Design and Implementation of FFTW3", Proc. IEEE 2005: time the candidate plans
once, keep the winner as "wisdom" on disk), ``auto`` times the backends that can serve a call,
once per *class* of problem, and keeps the times in a per-machine file.

A class (:func:`problem_class`) is: the device (``cpu``, or the GPU's name), dtype, the pattern's
kind (its classes and their string/boolean settings, without sizes: every ``sliding_window(w)``
is one kind), batch (rounded up to a power of two), heads, key/value heads, head dims, bias /
``score_mod`` / LSE flags, forward or forward+backward, torch's thread count, and the lengths
rounded up to powers of two (``Lq <= 2^a``, ``Lk <= 2^b``). Its times serve a call when they
cover every backend that can serve it.

Timing (:func:`tune`): each candidate runs on the call's own tensors (forward under
``no_grad``; with gradients, forward and backward on detached leaves, so the caller's graph is
untouched), one warm-up each, then rounds that call every candidate in turn: one round for all,
:data:`ROUNDS` in all for those within :data:`PRUNE` times the best; the median of each wins.
That is at most ``1 + ROUNDS`` calls per candidate (two for a clear loser), paid once per class
and machine. The rule for when that is worth it: a class is timed only when its work,
``B * H * Lq * Lk`` score entries (three times that with gradients), is at most
:data:`MEASURE_LIMIT` = 2^28 (e.g. B=1, H=8, Lq=Lk=4096 forward: about 0.1-0.2 s per call and
1-2 s of timing on a 2-core CPU). A larger class takes the times measured for the same class at
the nearest shorter lengths (source ``"shorter"``), else the fixed rule. Nothing is timed inside
``torch.compile`` tracing (``torch.compiler.is_compiling()``), during CUDA graph capture, on meta
tensors or devices other than CPU and CUDA, and FlexAttention is not timed off CUDA (it compiles
per shape there and ``auto`` never picks it); the fixed rule serves those calls. Until a class is
timed, the fixed rule is the order (its first candidate wins ties).

The disk cache is ``autotune-<CPU model>.json`` in the private headwise cache
(:func:`headwise.ops.attention.native.build.private_cache`), read once per process on first
need. It records the headwise and torch versions and a digest of the native kernel's source: a
file of other versions, or timed on another kernel, is ignored and rewritten. A file that
cannot be read or parsed, or has the wrong shape, is ignored with one warning and rewritten with
the next measurement. Each write takes an exclusive ``flock`` on a
lock file beside it, merges its classes into what is on disk, writes a temporary file and
renames it over the old one: threads and processes writing at once keep every class, and
readers never see a partial file. ``HEADWISE_AUTOTUNE=0`` turns all of this off (the fixed
rule, exactly as before).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import tempfile
import threading
import warnings
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import NamedTuple

import torch

from headwise import measure
from headwise.ops.attention.backends import BACKENDS
from headwise.ops.attention.dropout import Dropout
from headwise.ops.attention.native.build import private_cache, source_digest
from headwise.ops.attention.problem import AttentionProblem
from headwise.patterns import Pattern
from headwise.types import ScoreMod

#: environment variable: ``0`` restores the fixed rule, ``1`` (the default) times backends
ENV = "HEADWISE_AUTOTUNE"
#: largest class timed: ``B * H * Lq * Lk`` score entries, three times that with gradients
MEASURE_LIMIT = 1 << 28
#: timed rounds per candidate, after one warm-up call each; the median wins
ROUNDS = 3
#: after the first round, candidates slower than this many times the best stop being timed
PRUNE = 2.0
#: version of the cache file's layout
FORMAT = 1
#: dispatch answers remembered per process, for the calls used last (:meth:`TimesTable.recall`)
CHOICES = 1024


class Call(NamedTuple):
    """The arguments one backend call takes (what :func:`run_backend` passes on)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: Pattern | None
    scale: float | None
    bias: torch.Tensor | None
    score_mod: ScoreMod | None
    dropout: Dropout | None


class Tuned(NamedTuple):
    """What :func:`tune` decided: ``backend``, the median seconds it rests on (empty for the
    fixed rule), where they came from (``"measured"``, ``"cached"``, ``"shorter"``,
    ``"fixed"``) and, for the fixed rule, why."""

    backend: str
    times: dict[str, float]
    source: str
    note: str = ""


def enabled() -> bool:
    """Whether ``auto`` times backends: ``HEADWISE_AUTOTUNE`` unset, empty or ``1``; ``0`` gives
    the fixed rule. Any other value raises ``ValueError``."""
    value = os.environ.get(ENV) or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1; got {value!r}")
    return value == "1"


def run_backend(name: str, call: Call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, lse)`` of backend ``name`` on ``call``: the one place timing calls a backend."""
    return BACKENDS[name].run(*call)


def tune(problem: AttentionProblem, viable: tuple[str, ...], call: Call) -> Tuned:
    """The backend among ``viable`` (those that can serve ``problem``, in fixed-rule order) that
    is fastest for ``problem``'s class: from the cache, from timing ``call`` now, from the same
    class at shorter lengths, or the fixed rule (``viable[0]``) where timing does not apply
    (module docstring)."""
    timed = tuple(n for n in viable if n != "flex" or problem.device.type == "cuda")
    why_not = _why_not_timed(problem, viable, timed)
    if why_not:
        return Tuned(viable[0], {}, "fixed", why_not)
    key = problem_class(problem)
    times = TABLE.lookup(key, timed)
    if times is not None:
        return Tuned(_fastest(times, timed), times, "cached")
    work = problem.score_elements * (3 if problem.needs_grad else 1)
    if work > MEASURE_LIMIT:
        found = TABLE.shorter(key, timed)
        if found is not None:
            shorter, times = found
            return Tuned(_fastest(times, timed), times, "shorter", f"timed at {shorter}")
        return Tuned(
            viable[0],
            {},
            "fixed",
            f"{work:,} score entries{' (x3 with gradients)' if problem.needs_grad else ''} "
            f"exceed the timing limit {MEASURE_LIMIT:,} and no shorter length was timed",
        )
    fns = {name: _step(name, call, problem.needs_grad) for name in timed}
    # timing draws no random numbers the caller would see (sdpa's dropout draws its own mask)
    with torch.random.fork_rng([problem.device] if problem.device.type == "cuda" else []):
        times = _time(fns, problem.device)
    TABLE.store(key, times)
    return Tuned(_fastest(times, timed), times, "measured")


def _why_not_timed(problem: AttentionProblem, viable: tuple[str, ...], timed: tuple[str, ...]):
    if len(timed) < 2 or timed[0] != viable[0]:
        if len(viable) == 1:
            return "one backend can serve this call"
        return "flex is not timed off CUDA (it compiles per shape there)"
    return why_not_now(problem)


def why_not_now(problem: AttentionProblem) -> str:
    """Why no call of ``problem`` may be timed (or take a remembered choice) at this moment:
    ``torch.compile`` tracing, CUDA graph capture, a device other than CPU and CUDA; ``""``
    when it may."""
    if torch.compiler.is_compiling():
        return "inside torch.compile tracing"
    if problem.device.type not in ("cpu", "cuda"):
        return f"backends are not timed on {problem.device.type}"
    if problem.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "inside CUDA graph capture"
    return ""


def _time(fns: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Median seconds of each ``fn()``: one warm-up call each (plans, caches), one round that
    calls every function in turn, then :data:`ROUNDS` - 1 more rounds of those within
    :data:`PRUNE` times the best first time (a clear loser keeps its one time: it costs two calls,
    not ``1 + ROUNDS``). Rounds, not one function after the other, so that slow phases of a
    shared machine hit every candidate alike."""
    for fn in fns.values():
        fn()
    samples = {name: [measure.seconds(fn, device)] for name, fn in fns.items()}
    best = min(first for (first,) in samples.values())
    kept = [name for name, (first,) in samples.items() if first <= PRUNE * best]
    for _ in range(ROUNDS - 1):
        for name in kept:
            samples[name].append(measure.seconds(fns[name], device))
    return {name: statistics.median(times) for name, times in samples.items()}


def _fastest(times: dict[str, float], candidates: tuple[str, ...]) -> str:
    """The candidate with the smallest time; ties go to the first in fixed-rule order."""
    return min(candidates, key=lambda name: times[name])


def _step(name: str, call: Call, grad: bool):
    """One timed call of backend ``name``: forward under ``no_grad``, or forward and backward
    (a gradient of ones for ``out``) into detached copies of the leaves that need gradients."""
    if not grad:

        def forward():
            with torch.no_grad():
                run_backend(name, call)

        return forward
    leaves = {
        field: getattr(call, field).detach().requires_grad_()
        for field in ("q", "k", "v", "bias")
        if getattr(call, field) is not None and getattr(call, field).requires_grad
    }
    detached = call._replace(**leaves)

    def forward_backward():
        with torch.enable_grad():
            out, _ = run_backend(name, detached)
            torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))

    return forward_backward


# ----------------------------------------------------------------- classes of problems
def problem_class(problem: AttentionProblem) -> str:
    """The key under which ``problem``'s times are kept (module docstring); the lengths come
    last, ``...|Lq2^a|Lk2^b``, for the shorter-length lookup. The candidates are not part of it:
    times are used when they cover every backend that can serve the call."""
    flags = [
        name
        for name, on in (
            ("bias", problem.has_bias),
            ("bias_grad", problem.bias_needs_grad),
            ("score_mod", problem.has_score_mod and not problem.relative_position),
            ("relative_position", problem.relative_position),
            ("lse", problem.return_lse),
            ("dropout", problem.dropout_p > 0),
        )
        if on
    ]
    parts = (
        _device_name(problem.device),
        str(problem.dtype).removeprefix("torch."),
        pattern_kind(problem.pattern),
        f"B2^{_bucket(problem.batch)}",
        f"H{problem.heads}/{problem.kv_heads}",
        f"D{problem.head_dim}/{problem.value_dim}",
        ",".join(flags) or "plain",
        "fwd+bwd" if problem.needs_grad else "fwd",
        f"threads{torch.get_num_threads()}",
        f"Lq2^{_bucket(problem.q_len)}",
        f"Lk2^{_bucket(problem.kv_len)}",
    )
    return "|".join(parts)


def pattern_kind(pattern: Pattern | None) -> str:
    """The pattern's structure without its sizes: class names, with the string and boolean
    settings (``align``, ``causal``) and the kinds of the parts of compositions and per-head
    stacks (a set: heads in any order, repeated kinds once). ``None`` and ``full()`` are
    ``Full``."""
    if pattern is None or pattern.is_full:
        return "Full"
    settings, parts = [], []
    for name, value in getattr(pattern, "__dict__", {}).items():
        if isinstance(value, Pattern):
            parts.append(pattern_kind(value))
        elif isinstance(value, tuple) and value and all(isinstance(p, Pattern) for p in value):
            parts += sorted({pattern_kind(p) for p in value})
        elif isinstance(value, str | bool) and not name.startswith("_"):
            settings.append(f"{name}={value}")
        elif isinstance(value, tuple) and value and all(isinstance(b, bool) for b in value):
            settings.append(f"{name}={','.join(map(str, value))}")
    inside = ",".join(settings + parts)
    return f"{type(pattern).__name__}({inside})"


def _bucket(n: int) -> int:
    """``a`` with ``2^(a-1) < n <= 2^a``."""
    return (n - 1).bit_length()


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@functools.cache
def machine() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :mod:`platform`): what the cache file is
    keyed by."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


# ----------------------------------------------------------------- the disk cache
def _stamp() -> dict[str, object]:
    try:
        version = importlib.metadata.version("headwise")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": FORMAT,
        "headwise": version,
        "torch": torch.__version__,
        "machine": machine(),
        "kernel": source_digest(),  # a changed C kernel (same version, e.g. in development)
    }


class _Stale(Exception):
    """A cache file of other versions: ignored without a warning."""


def _parse(text: str, stamp: dict[str, object]) -> dict[str, dict[str, float]]:
    """The classes of a cache file; ``ValueError`` when it is not one, :class:`_Stale` when it
    was written by other versions (or for another machine)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"a JSON object was expected, not {type(data).__name__}")
    if any(data.get(name) != value for name, value in stamp.items()):
        raise _Stale
    classes = data.get("classes")
    if not isinstance(classes, dict):
        raise ValueError("its 'classes' is not an object")
    for key, times in classes.items():
        if not _KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a class of problems")
        good = (
            isinstance(times, dict)
            and times
            and all(
                name in BACKENDS
                and isinstance(t, float | int)
                and not isinstance(t, bool)
                and math.isfinite(t)
                and t >= 0
                for name, t in times.items()
            )
        )
        if not good:
            raise ValueError(f"class {key!r} holds {times!r}, not backend times in seconds")
    return classes


class TimesTable:
    """The measured classes of this machine: read from the disk cache once per process, on
    first need; each new measurement is merged into the file under a lock (module
    docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._classes: dict[str, dict[str, float]] | None = None
        self._path: Path | None = None
        self._warned = False
        # the dispatcher's answers taken from these times, per exact call (LRU order)
        self._choices: collections.OrderedDict[Hashable, object] = collections.OrderedDict()

    def recall(self, call: Hashable):
        """The answer :meth:`remember` kept for ``call`` (any hashable description of it), or
        ``None``."""
        with self._lock:
            answer = self._choices.get(call)
            if answer is not None:
                self._choices.move_to_end(call)
            return answer

    def remember(self, call: Hashable, answer: object) -> None:
        """Keep the dispatcher's ``answer`` for ``call``, taken from this table's times, for the
        :data:`CHOICES` calls used last: a call seen again skips the backends' reasons and the
        class key. :meth:`store` forgets every answer (new times may change one); a table
        replaced by another (the tests' fresh tables) takes its answers with it."""
        with self._lock:
            self._choices[call] = answer
            self._choices.move_to_end(call)
            while len(self._choices) > CHOICES:
                self._choices.popitem(last=False)

    def lookup(self, key: str, candidates: tuple[str, ...]) -> dict[str, float] | None:
        """The times of class ``key`` if they cover every one of ``candidates``."""
        with self._lock:
            times = self._loaded().get(key)
        return times if times is not None and set(candidates) <= times.keys() else None

    def shorter(self, key: str, candidates: tuple[str, ...]) -> tuple[str, dict[str, float]] | None:
        """``("Lq<=2^a, Lk<=2^b", times)`` of the same class at the nearest shorter lengths
        whose times cover every one of ``candidates``."""
        base, q_bucket, kv_bucket = _split(key)
        best = None
        with self._lock:
            for other, times in self._loaded().items():
                other_base, a, b = _split(other)
                covered = set(candidates) <= times.keys()
                if covered and other_base == base and a <= q_bucket and b <= kv_bucket:
                    if best is None or (a + b, a) > best[0]:
                        best = ((a + b, a), f"Lq<=2^{a}, Lk<=2^{b}", times)
        return None if best is None else best[1:]

    def store(self, key: str, times: dict[str, float]) -> None:
        with self._lock:
            self._choices.clear()  # new times may change an answer taken from the old ones
            classes = self._loaded()
            classes[key] = times
            if self._path is None:
                return
            try:
                merged = self._merge({key: times})
            except OSError as error:
                self._warn(f"it cannot be written: {error}", "times are kept for this process")
                self._path = None
                return
            self._classes = {**merged, **classes}

    def _loaded(self) -> dict[str, dict[str, float]]:
        if self._classes is None:
            root = private_cache("backend times are kept for this process only")
            if root is not None:
                self._path = root / f"autotune-{_slug(machine())}.json"
            self._classes = {} if self._path is None else self._read()
        return self._classes

    def _read(self) -> dict[str, dict[str, float]]:
        """The file's classes; ``{}`` when it is missing, stale or broken (one warning)."""
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as error:
            self._warn(f"it cannot be read: {error}")
            return {}
        try:
            return _parse(text, _stamp())
        except _Stale:
            return {}
        except ValueError as error:
            self._warn(f"it is not a headwise autotune cache: {error}")
            return {}

    def _merge(self, new: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Under an exclusive lock on the lock file: what is on disk plus ``new``, written to a
        temporary file that replaces the cache file."""
        lock = os.open(self._path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self._read(), **new}
            handle, partial = tempfile.mkstemp(
                dir=self._path.parent, prefix=".autotune-", suffix=".tmp"
            )
            try:
                with os.fdopen(handle, "w") as file:
                    json.dump({**_stamp(), "classes": merged}, file, indent=1, sort_keys=True)
                os.replace(partial, self._path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
                raise
        finally:
            os.close(lock)  # closing the descriptor releases the flock
        return merged

    def _warn(self, reason: str, then: str = "it is rewritten with the next measurement") -> None:
        """One warning per process (the first problem found), never an exception."""
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"headwise: the autotune cache {self._path} is ignored ({reason}); {then}",
                RuntimeWarning,
                stacklevel=2,
            )


#: a class key: ``...|Lq2^a|Lk2^b``
_KEY = re.compile(r".+\|Lq2\^[0-9]+\|Lk2\^[0-9]+")


def _split(key: str) -> tuple[str, int, int]:
    base, q_part, kv_part = key.rsplit("|", 2)
    return base, int(q_part.removeprefix("Lq2^")), int(kv_part.removeprefix("Lk2^"))


def _slug(name: str) -> str:
    """A file-name-safe form of ``name``, with a hash so that different names never meet."""
    readable = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:48]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


#: the process's table (tests replace it with a fresh one)
TABLE = TimesTable()
