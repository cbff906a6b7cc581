"""Timing and peak-memory measurement shared by the CLI demo and the benchmark scripts, and the
results files and progress bars of those scripts.

On CUDA, peak memory is ``torch.cuda.max_memory_allocated`` over the call. On CPU, where torch
keeps no allocator statistics, a thread samples the bytes in use by the C allocator (glibc
``mallinfo2``; the resident set size elsewhere) and reports the high-water mark above the starting
point. Buffers that live for less than the sampling interval (0.5 ms) can be missed.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch


class _Sampler(threading.Thread):
    """Samples the bytes allocated by the process every ``interval`` seconds."""

    def __init__(self, interval: float = 5e-4):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = _allocated()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _allocated())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _allocated())


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc_in_use():
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


#: bytes currently allocated by the C allocator (glibc), else the resident set size
_allocated = _glibc_in_use() or _rss


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs (results dropped before returning)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    gc.collect()
    start = _allocated()
    sampler = _Sampler()
    sampler.start()
    fn()
    return max(0, sampler.stop() - start)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one ``fn()`` call, device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_call(fn: Callable[[], object], device: torch.device, *, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = sorted(seconds(fn, device) for _ in range(repeats))
    return times[len(times) // 2]


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, rounds: int = 5
) -> dict[str, float]:
    """Median seconds of each ``fn()`` over ``rounds`` rounds that call every function once in
    turn, after one warm-up call each: slow phases of a shared machine then hit all of them
    alike, so ratios between them hold better than with one function timed after the other.
    Each round calls them in a new random order (seeded: a run repeats), so no function always
    runs first or mostly right after the same one (under a rotation each function follows the
    same other in all rounds but those it opens, e.g. the L x L reference that leaves the caches
    cold)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            times[name].append(seconds(fns[name], device))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def environment(device: torch.device) -> dict[str, str]:
    """What a results file must record: device, versions, date."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": f"{device.type}: {name or platform.machine()}",
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_results(directory: Path, stem: str, env: dict[str, str], text: str) -> Path:
    """Write a benchmark's results to ``<directory>/<stem>-<date>.md`` (the date recorded in
    ``env``, from :func:`environment`) and say where."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}-{env['date'][:10]}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return path


def progress(total: int, desc: str):
    """A ``tqdm`` progress bar for a long benchmark, or ``None`` without tqdm (the bar is a
    convenience: ``pip install 'headwise[bench]'``)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc)
