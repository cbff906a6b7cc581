"""The benchmark timer: interleaved rounds, medians; results files and progress bars."""

import collections
import itertools
import sys

import pytest
import torch

from headwise.measure import progress, time_interleaved, write_results


def test_time_interleaved_calls_each_function_once_a_round_in_varied_order():
    calls = []
    names = ("dense", "sparse", "auto", "reference")
    fns = {name: (lambda name=name: calls.append(name)) for name in names}
    times = time_interleaved(fns, torch.device("cpu"), rounds=12)
    # one warm-up call each, then rounds that call every function once
    assert calls[:4] == list(names)
    rounds = [calls[i : i + 4] for i in range(4, len(calls), 4)]
    assert len(rounds) == 12 and all(sorted(r) == sorted(names) for r in rounds)
    # no function runs right after the same one in most rounds (a rotation: in 3 rounds of 4)
    sequence = calls[3:]
    for name in names:
        before = collections.Counter(a for a, b in itertools.pairwise(sequence) if b == name)
        assert before.most_common(1)[0][1] <= len(rounds) // 2, (name, before)
    assert set(times) == set(names) and all(t >= 0 for t in times.values())
    calls.clear()
    time_interleaved(fns, torch.device("cpu"), rounds=12)
    assert calls[4:] == sequence[1:]  # seeded: the same orders every run


def test_write_results_names_the_file_by_stem_and_recorded_date(tmp_path, capsys):
    env = {"date": "2026-11-25 03:10 UTC"}
    path = write_results(tmp_path / "results", "sparse-cpu-backward", env, "# x\n")
    assert path == tmp_path / "results" / "sparse-cpu-backward-2026-11-25.md"
    assert path.read_text() == "# x\n"
    assert str(path) in capsys.readouterr().out


def test_progress_is_a_bar_with_tqdm_and_none_without(monkeypatch):
    pytest.importorskip("tqdm")
    bar = progress(3, "steps")
    assert bar.total == 3 and bar.desc.startswith("steps")
    bar.close()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert progress(3, "steps") is None
