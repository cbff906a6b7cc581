"""The benchmark timer: interleaved rounds, medians."""

import torch

from headwise.measure import time_interleaved


def test_time_interleaved_calls_each_function_in_turn_and_returns_medians():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("dense", "sparse")}
    times = time_interleaved(fns, torch.device("cpu"), rounds=3)
    # one warm-up call each, then three rounds of dense, sparse
    assert calls == ["dense", "sparse"] * 4
    assert set(times) == {"dense", "sparse"} and all(t >= 0 for t in times.values())
