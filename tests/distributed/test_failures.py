"""A rank that never joins, hangs or dies makes the others raise PeerTimeoutError in time."""

from __future__ import annotations

import os
import time

import pytest
import torch

from headwise.distributed import PeerTimeoutError, init_distributed, launch, ring_attention
from headwise.distributed.launch import free_port

TIMEOUT = 2.0


def test_rank_that_never_joins_times_out():
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError, match="never joined"):
        init_distributed(
            "gloo",
            rank=0,
            world_size=2,
            timeout=TIMEOUT,
            init_method=f"tcp://127.0.0.1:{free_port()}",
        )
    assert time.monotonic() - start < TIMEOUT + 5


def _timed_ring(seq_len):
    q = torch.randn(1, seq_len, 2, 8)
    start = time.monotonic()
    try:
        ring_attention(q, q, q, seq_len=2 * seq_len, timeout=TIMEOUT)
    except PeerTimeoutError as err:
        return type(err).__name__, time.monotonic() - start, str(err)
    return "no error", time.monotonic() - start, ""


def _worker(rank, world):
    if rank == 1:
        time.sleep(TIMEOUT + 2)  # hangs: rank 0 must give up after TIMEOUT
        os._exit(1)  # then dies without a word
    hung = _timed_ring(8)
    time.sleep(3)  # rank 1 is dead by now
    dead = _timed_ring(8)
    return hung, dead


def test_hanging_then_dead_rank_raise_timeout_error():
    results = launch(_worker, 2, group_timeout=30, timeout=60, check=False)
    assert results[0].ok, results[0].error
    (hung_type, hung_s, hung_msg), (dead_type, dead_s, dead_msg) = results[0].value
    assert hung_type == dead_type == "PeerTimeoutError"
    assert TIMEOUT - 0.5 <= hung_s <= TIMEOUT + 3, hung_s
    assert dead_s <= TIMEOUT + 3, dead_s
    assert "ring_attention (rank 0): K/V from rank 1" in hung_msg
    assert "crashed, hangs or never joined" in dead_msg
    assert not results[1].ok  # the dead rank reports no result
