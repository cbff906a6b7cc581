"""Timing and peak-memory measurement shared by the CLI demo and the benchmark scripts.

On CUDA, peak memory is ``torch.cuda.max_memory_allocated`` over the call. On CPU, where torch
keeps no allocator statistics, a thread samples the process's resident set size (Linux
``/proc/self/statm``) and reports the high-water mark above the starting point. Large tensors are
``mmap``-ed and returned to the system when freed, so this tracks attention-sized buffers well;
small allocations recycled by the C allocator are not seen.
"""

from __future__ import annotations

import gc
import os
import platform
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch


class _RssSampler(threading.Thread):
    """Samples the process's resident set size every ``interval`` seconds."""

    def __init__(self, interval: float = 5e-4):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = _rss()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
    start = _rss()
    sampler = _RssSampler()
    sampler.start()
    fn()
    return max(0, sampler.stop() - start)


def time_call(fn: Callable[[], object], device: torch.device, *, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


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
