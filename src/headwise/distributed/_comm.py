"""Process-group plumbing shared by the distributed ops: monitored waits, ring shifts, all-to-all.

Every wait on a peer goes through :func:`wait`, which turns a peer that crashed, hung or never
joined into a :class:`PeerTimeoutError` naming the operation, the peer and the limit, instead of
an indefinite hang or a transport-specific message.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


class PeerTimeoutError(TimeoutError):
    """A peer rank did not answer in time: it crashed, hangs, or never joined the group."""


def _timedelta(seconds: float | None) -> datetime.timedelta | None:
    if seconds is None:
        return None
    if not seconds > 0:
        raise ValueError(f"timeout must be a positive number of seconds; got {seconds!r}")
    return datetime.timedelta(seconds=seconds)


def init_distributed(
    backend: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    timeout: float = 60.0,
    init_method: str | None = None,
) -> None:
    """``torch.distributed.init_process_group`` with a finite ``timeout`` (seconds) everywhere.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. ``rank`` and ``world_size``
    default to the ``RANK`` / ``WORLD_SIZE`` environment variables (as ``torchrun`` sets them).
    The timeout bounds the rendezvous (ranks that never join) and every later collective or
    point-to-point wait of the group. Raises :class:`PeerTimeoutError` when the group cannot form.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    try:
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=_timedelta(timeout),
        )
    except (dist.DistStoreError, RuntimeError) as err:
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        raise PeerTimeoutError(
            f"rank {rank}: the {world_size}-rank process group did not form within {timeout} s "
            f"(a rank never joined): {err}"
        ) from err


def rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size (``(0, 1)`` when not initialized)."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@contextlib.contextmanager
def peer_errors(what: str, timeout: float | None) -> Iterator[None]:
    """Turn a transport error (peer closed the connection, wait timed out) into
    :class:`PeerTimeoutError`; used around posting operations and waiting for them."""
    try:
        yield
    except RuntimeError as err:
        limit = f"{timeout} s" if timeout is not None else "the process group's timeout"
        raise PeerTimeoutError(
            f"{what}: no answer within {limit}; a peer rank crashed, hangs or never joined ({err})"
        ) from err


def wait(work: dist.Work, what: str, timeout: float | None) -> None:
    """Wait for ``work``; a failed or late peer raises :class:`PeerTimeoutError`.

    ``timeout`` (seconds) tightens the process group's own limit; ``None`` keeps that limit.
    """
    with peer_errors(what, timeout):
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=_timedelta(timeout))


@dataclass
class Pending:
    """An in-flight shift around the ring: ``result()`` waits and returns the received tensor."""

    works: list[dist.Work]
    received: torch.Tensor
    what: str
    timeout: float | None

    def result(self) -> torch.Tensor:
        for work in self.works:
            wait(work, self.what, self.timeout)
        return self.received


class Ring:
    """Neighbours of this rank in ``group``: send to ``rank + 1``, receive from ``rank - 1``."""

    def __init__(self, group: ProcessGroup | None, timeout: float | None, name: str) -> None:
        self.group = group
        self.timeout = timeout
        self.name = name
        self.rank, self.size = rank_and_size(group)
        self._next = self._global((self.rank + 1) % self.size)
        self._prev = self._global((self.rank - 1) % self.size)

    def _global(self, group_rank: int) -> int:
        if self.group is None or self.size == 1:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def shift(self, tensor: torch.Tensor, tag: int, what: str) -> Pending:
        """Start sending ``tensor`` to the next rank and receiving its twin from the previous one.

        Tags keep two shifts in flight at once (K/V and their gradients) from matching each
        other's messages on transports that match by tag (gloo); NCCL orders them by issue.
        """
        if self.size == 1:
            return Pending([], tensor, what, self.timeout)
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self._next, self.group, tag),
            dist.P2POp(dist.irecv, received, self._prev, self.group, tag),
        ]
        label = f"{self.name} (rank {self.rank}): {what} from rank {(self.rank - 1) % self.size}"
        with peer_errors(label, self.timeout):
            works = dist.batch_isend_irecv(ops)
        return Pending(works, received, label, self.timeout)


def all_to_all(
    x: torch.Tensor, group: ProcessGroup | None, timeout: float | None, what: str
) -> torch.Tensor:
    """Exchange equal slices of dim 0: slice ``j`` goes to rank ``j``; slice ``j`` of the result
    came from rank ``j``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    rank, _ = rank_and_size(group)
    label = f"{what} (rank {rank})"
    with peer_errors(label, timeout):
        work = dist.all_to_all_single(out, x, group=group, async_op=True)
    wait(work, label, timeout)
    return out
