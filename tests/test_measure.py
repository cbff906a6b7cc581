"""The benchmark timer: interleaved rounds, medians; results files and progress bars."""

import sys

import pytest
import torch

from headwise.measure import progress, time_interleaved, write_results


def test_time_interleaved_calls_each_function_in_turn_and_returns_medians():
    calls = []
    names = ("dense", "sparse", "auto")
    fns = {name: (lambda name=name: calls.append(name)) for name in names}
    times = time_interleaved(fns, torch.device("cpu"), rounds=4)
    # one warm-up call each, then rounds that each start one function later
    assert calls == [*names, *names, "sparse", "auto", "dense", "auto", "dense", "sparse", *names]
    assert set(times) == set(names) and all(t >= 0 for t in times.values())


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
