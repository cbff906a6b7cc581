"""Run a function on ``P`` local processes joined in a gloo (or NCCL) group: tests, benchmarks.

Each process is started with the ``spawn`` method (safe with threads and CUDA), joins the group
through a free loopback port with a finite timeout, runs ``fn(rank, world_size, *args)`` and
reports its return value or its exception. A process that dies or overruns is reported, never
waited for forever.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from headwise.distributed._comm import init_distributed


@dataclass(frozen=True)
class RankResult:
    """What one rank did: ``value`` if ``ok``, else ``error`` (a formatted traceback)."""

    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    error_type: str = ""
    exitcode: int | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    backend: str | None,
    group_timeout: float,
    result_dir: str,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        init_distributed(backend, rank=rank, world_size=world_size, timeout=group_timeout)
        try:
            result = RankResult(rank, True, fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as err:
        result = RankResult(
            rank, False, error=traceback.format_exc(), error_type=type(err).__name__
        )
    with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    group_timeout: float = 30.0,
    timeout: float = 300.0,
    check: bool = True,
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; one result each.

    ``fn`` must be importable (a module-level function). ``group_timeout`` bounds every wait
    inside the group; ``timeout`` bounds the whole run, after which stragglers are killed.
    With ``check`` a failed rank raises ``RuntimeError`` carrying its traceback.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="headwise-launch-") as result_dir:
        procs = [
            ctx.Process(
                target=_entry,
                args=(rank, world_size, port, fn, args, backend, group_timeout, result_dir),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        results = []
        for rank, proc in enumerate(procs):
            if proc.is_alive():
                proc.kill()
                proc.join()
                results.append(
                    RankResult(rank, False, error=f"still running after {timeout} s; killed")
                )
                continue
            path = os.path.join(result_dir, f"{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                results.append(
                    RankResult(rank, False, error="exited without a result", exitcode=proc.exitcode)
                )
    if check:
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError("\n".join(f"rank {r.rank} failed:\n{r.error}" for r in failed))
    return results
