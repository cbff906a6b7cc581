"""The measuring dispatcher (:mod:`headwise.ops.attention.autotune`): the fastest backend wins,
the cache spares a second timing, survives concurrent writers, and is ignored (with one warning
where broken) and rewritten when stale or damaged; ``HEADWISE_AUTOTUNE=0`` and compilation give
the fixed rule; ``explain`` shows the times.

No test depends on real timings: a fake clock advances by a set cost per backend call, so the
fastest backend is known. Every test points ``HEADWISE_CACHE`` at its own temporary folder and
starts from an empty table.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import warnings
from pathlib import Path

import pytest
import torch

import headwise.patterns as P
from headwise import attention, explain, measure
from headwise.ops.attention import autotune
from headwise.ops.attention.backends import BACKENDS
from headwise.ops.attention.native import available as native_available

#: fake seconds per call: blockwise fastest, sdpa (the fixed rule's first choice) slowest
COSTS = {"sdpa": 5e-3, "native": 3e-3, "blockwise": 1e-3, "reference": 9e-3, "flex": 7e-3}


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """Timing on, a cache of this test's own, a fresh table; the path of the cache file."""
    native_available()  # the kernel stays in the usual cache, not built again in tmp_path
    monkeypatch.setenv("HEADWISE_AUTOTUNE", "1")
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "TABLE", autotune.TimesTable())
    name = f"autotune-{autotune._slug(autotune.machine())}.json"
    return Path(os.path.realpath(tmp_path)) / "headwise" / name


def fake_clock(monkeypatch, costs=COSTS) -> list[str]:
    """Each timed backend call advances the clock by ``costs[name]``; returns the calls made."""
    now, calls = [0.0], []
    real = autotune.run_backend

    def run(name, call):
        calls.append(name)
        now[0] += costs[name]
        return real(name, call)

    monkeypatch.setattr(autotune, "run_backend", run)

    def seconds(fn, device):
        start = now[0]
        fn()
        return now[0] - start

    monkeypatch.setattr(measure, "seconds", seconds)
    return calls


def inputs(length=37, grad=False):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, length, 2, 8, generator=gen, requires_grad=grad) for _ in range(3)]


def stored(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------- choosing
def test_the_measured_fastest_backend_serves_the_call(cache, monkeypatch):
    calls = fake_clock(monkeypatch)
    q, k, v = inputs()
    choice = explain(q, k, v, P.causal())
    # the fixed rule would take sdpa; the clock says blockwise
    assert (choice.backend, choice.source) == ("blockwise", "measured")
    timed = ("sdpa", "native", "blockwise", "reference")
    assert choice.times == pytest.approx({n: COSTS[n] for n in timed})
    # one warm-up and one round each, two more rounds for those within 2x of the best
    assert sorted(calls) == sorted(["sdpa", "native", "reference"] * 2 + ["blockwise"] * 4)
    served = []
    run = BACKENDS["blockwise"].run
    monkeypatch.setattr(BACKENDS["blockwise"], "run", lambda *a: served.append(1) or run(*a))
    out = attention(q, k, v, P.causal())
    torch.testing.assert_close(out, attention(q, k, v, P.causal(), backend="reference"))
    assert served == [1]


def test_ties_go_to_the_fixed_rule_order(cache, monkeypatch):
    fake_clock(monkeypatch, dict.fromkeys(COSTS, 1e-3))
    q, k, v = inputs()
    assert explain(q, k, v, P.causal()).backend == "sdpa"
    assert explain(q, k, v, P.sliding_window(3)).backend == "native"


def test_only_backends_that_can_serve_are_timed(cache, monkeypatch):
    calls = fake_clock(monkeypatch)
    q, k, v = inputs()
    # return_lse rules out sdpa; flex in a tuple off CUDA is never timed
    choice = explain(q, k, v, P.causal(), return_lse=True, backend=("native", "flex", "sdpa"))
    assert (choice.backend, choice.source, calls) == ("native", "fixed", [])
    assert "one backend" in choice.note
    choice = explain(q, k, v, P.causal(), backend=("flex", "native", "blockwise"))
    assert (choice.backend, choice.source, calls) == ("flex", "fixed", [])
    choice = explain(q, k, v, P.sliding_window(2), backend=("native", "flex", "blockwise"))
    assert choice.backend == "blockwise" and "flex" not in calls + list(choice.times)


def test_gradients_are_timed_without_touching_the_callers_graph(cache, monkeypatch):
    fake_clock(monkeypatch)
    q, k, v = inputs(grad=True)
    choice = explain(q, k, v, P.causal())
    assert choice.source == "measured" and q.grad is None
    key = next(iter(stored(cache)["classes"]))
    assert "|fwd+bwd|" in key
    # forward-only calls are another class: timed anew
    with torch.no_grad():
        assert explain(q, k, v, P.causal()).source == "measured"


def test_a_repeated_call_takes_the_remembered_choice(cache, monkeypatch):
    fake_clock(monkeypatch)
    q, k, v = inputs()
    first = explain(q, k, v, P.causal())
    assert (first.backend, first.source) == ("blockwise", "measured")
    # the same call again: neither the backends' reasons nor the class key are looked at
    looked = []
    real_class = autotune.problem_class
    monkeypatch.setattr(autotune, "problem_class", lambda p: looked.append(1) or real_class(p))
    sdpa_reasons = BACKENDS["sdpa"].reasons
    monkeypatch.setattr(BACKENDS["sdpa"], "reasons", lambda p: looked.append(2) or sdpa_reasons(p))
    again = explain(q, k, v, P.causal())
    assert (again.backend, again.source, again.times, looked) == (
        "blockwise",
        "cached",
        first.times,
        [],
    )
    again.times.clear()  # the caller's own copy
    assert explain(q, k, v, P.causal()).times == first.times
    # another problem, or other candidates, or another thread count: asked again
    explain(q, k, v, P.sliding_window(3))
    assert looked == [2, 1]
    explain(q, k, v, P.causal(), backend=("native", "sdpa"))
    assert looked == [2, 1, 2, 1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        explain(q, k, v, P.causal())
    finally:
        torch.set_num_threads(threads)
    assert looked == [2, 1, 2, 1, 2, 1]
    # a new measurement forgets every remembered answer (new times may change one)
    looked.clear()
    explain(*inputs(100), P.causal())
    assert looked == [2, 1]
    explain(q, k, v, P.causal())
    assert looked == [2, 1, 2, 1]
    # the fixed rule and compilation are never served from memory
    monkeypatch.setenv("HEADWISE_AUTOTUNE", "0")
    assert explain(q, k, v, P.causal()).source == "fixed"
    monkeypatch.setenv("HEADWISE_AUTOTUNE", "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert explain(q, k, v, P.causal()).source == "fixed"


# ----------------------------------------------------------------- the cache
def test_a_cached_class_is_not_timed_again(cache, monkeypatch):
    calls = fake_clock(monkeypatch)
    q, k, v = inputs(37)
    attention(q, k, v, P.causal())
    timed = len(calls)
    assert timed and cache.is_file()
    # another length of the same power-of-two bucket, another window size: the same class
    q, k, v = inputs(50)
    choice = explain(q, k, v, P.causal())
    assert (choice.source, choice.backend, len(calls)) == ("cached", "blockwise", timed)
    # a new process (a fresh table) reads the file
    monkeypatch.setattr(autotune, "TABLE", autotune.TimesTable())
    choice = explain(q, k, v, P.causal())
    assert (choice.source, choice.backend, len(calls)) == ("cached", "blockwise", timed)
    # another bucket is another class
    q, k, v = inputs(70)
    assert explain(q, k, v, P.causal()).source == "measured" and len(calls) > timed


@pytest.mark.parametrize("field", ["headwise", "torch", "kernel"])
def test_another_version_invalidates_the_cache(cache, monkeypatch, field):
    calls = fake_clock(monkeypatch)
    q, k, v = inputs()
    explain(q, k, v, P.causal())
    explain(q, k, v, P.sliding_window(3))
    assert len(stored(cache)["classes"]) == 2
    if field == "kernel":  # a changed tiles.c under the same versions
        monkeypatch.setattr(autotune, "source_digest", lambda: "0.0.0-other")
    else:
        stamp = autotune._stamp
        monkeypatch.setattr(autotune, "_stamp", lambda: {**stamp(), field: "0.0.0-other"})
    monkeypatch.setattr(autotune, "TABLE", autotune.TimesTable())
    timed = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stale is normal: no warning
        choice = explain(q, k, v, P.causal())
    assert choice.source == "measured" and len(calls) > timed
    data = stored(cache)
    assert data[field] == "0.0.0-other" and len(data["classes"]) == 1  # the stale one is gone


def _valid_file(path: Path) -> str:
    data = {**autotune._stamp(), "classes": {"cpu|x|Lq2^3|Lk2^3": {"sdpa": 1e-3}}}
    return json.dumps(data)


CORRUPT = {
    "garbage": lambda p: "\x00\x01 not json",
    "a list": lambda p: "[1, 2, 3]",
    "truncated": lambda p: _valid_file(p)[:40],
    "classes not an object": lambda p: _valid_file(p).replace('{"cpu|x|Lq2^3|Lk2^3"', '[["x"]'),
    "times not numbers": lambda p: _valid_file(p).replace("0.001", '"fast"'),
    "unknown backend": lambda p: _valid_file(p).replace('"sdpa"', '"warp"'),
    "negative time": lambda p: _valid_file(p).replace("0.001", "-1.0"),
    "bad key": lambda p: _valid_file(p).replace("|Lq2^3|Lk2^3", ""),
}


@pytest.mark.parametrize("damage", sorted(CORRUPT))
def test_a_corrupt_cache_is_ignored_with_one_warning_and_rewritten(cache, monkeypatch, damage):
    calls = fake_clock(monkeypatch)
    cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cache.write_text(CORRUPT[damage](cache))
    q, k, v = inputs()
    with pytest.warns(RuntimeWarning, match="autotune cache") as caught:
        choice = explain(q, k, v, P.causal())
        explain(q, k, v, P.sliding_window(3))  # a second class: no second warning
    assert len(caught) == 1 and str(cache) in str(caught[0].message)
    assert choice.source == "measured" and calls
    classes = autotune._parse(cache.read_text(), autotune._stamp())
    assert len(classes) == 2 and "cpu|x|Lq2^3|Lk2^3" not in classes


def test_an_unreadable_cache_warns_once_and_times_in_memory(cache, monkeypatch):
    fake_clock(monkeypatch)
    cache.mkdir(parents=True)  # a directory where the file should be: neither read nor written
    q, k, v = inputs()
    with pytest.warns(RuntimeWarning, match="cannot be read") as caught:
        assert explain(q, k, v, P.causal()).source == "measured"
        assert explain(q, k, v, P.causal()).source == "cached"
    assert len(caught) == 1 and cache.is_dir()


def _write_classes(tag: str, count: int) -> None:
    table = autotune.TimesTable()
    for i in range(count):
        table.store(f"cpu|{tag}-{i}|Lq2^4|Lk2^4", {"sdpa": 1e-3 * (i + 1), "native": 2e-3})


def test_concurrent_writers_keep_every_class(cache):
    # threads, each with a table of its own (as separate processes have), started together
    start = threading.Barrier(6)

    def writer(tag):
        start.wait()
        _write_classes(tag, 12)

    threads = [threading.Thread(target=writer, args=(f"thread{t}",)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # processes (forked: no new torch import), writing the same file at once
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_classes, args=(f"process{p}", 12)) for p in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert all(process.exitcode == 0 for process in processes)
    classes = autotune._parse(cache.read_text(), autotune._stamp())  # valid JSON, right shape
    tags = [f"thread{t}" for t in range(6)] + [f"process{p}" for p in range(4)]
    assert set(classes) == {f"cpu|{tag}-{i}|Lq2^4|Lk2^4" for tag in tags for i in range(12)}
    assert not list(cache.parent.glob(".autotune-*"))  # no temporary file left behind


# ----------------------------------------------------------------- when nothing is timed
def test_autotune_off_is_the_fixed_rule(cache, monkeypatch):
    calls = fake_clock(monkeypatch)
    monkeypatch.setenv("HEADWISE_AUTOTUNE", "0")
    q, k, v = inputs()
    choice = explain(q, k, v, P.causal())
    assert (choice.backend, choice.source, choice.times, calls) == ("sdpa", "fixed", {}, [])
    choice = explain(q, k, v, P.sliding_window(3))
    # exactly the old answer: reasons only for the backends before the chosen one
    assert choice.backend == "native" and set(choice.reasons) == {"sdpa"}
    assert "HEADWISE_AUTOTUNE=0" in str(choice) and not cache.exists()
    monkeypatch.setenv("HEADWISE_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="HEADWISE_AUTOTUNE must be 0 or 1; got 'yes'"):
        explain(q, k, v, P.causal())


def test_nothing_is_timed_while_compiling(cache, monkeypatch):
    calls = fake_clock(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k, v = inputs()
    choice = explain(q, k, v, P.causal())
    assert (choice.backend, choice.source, calls) == ("sdpa", "fixed", [])
    assert "torch.compile" in choice.note and not cache.exists()


def test_a_compiled_call_is_right_and_times_nothing_while_tracing(cache, monkeypatch):
    traced, real = [], autotune._time

    def timing(fns, device):
        traced.append(torch.compiler.is_compiling())
        return real(fns, device)

    monkeypatch.setattr(autotune, "_time", timing)
    q, k, v = inputs()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, P.causal()), backend="eager")
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v, P.causal(), backend="sdpa"))
    assert True not in traced


def test_large_classes_take_the_times_of_shorter_lengths(cache, monkeypatch):
    calls = fake_clock(monkeypatch)
    monkeypatch.setattr(autotune, "MEASURE_LIMIT", 2 * 40 * 40)
    q, k, v = inputs(100)  # 2 heads x 100 x 100 score entries: over the limit
    choice = explain(q, k, v, P.causal())
    assert (choice.backend, choice.source, calls) == ("sdpa", "fixed", [])
    assert "timing limit" in choice.note
    explain(*inputs(20), P.causal())  # Lq, Lk <= 2^5
    explain(*inputs(40), P.causal())  # Lq, Lk <= 2^6: the nearest
    choice = explain(q, k, v, P.causal())
    assert (choice.backend, choice.source) == ("blockwise", "shorter")
    assert choice.note == "timed at Lq<=2^6, Lk<=2^6"
    assert explain(*inputs(100), P.sliding_window(3)).source == "fixed"  # another class


# ----------------------------------------------------------------- explain and classes
def test_explain_shows_the_times(cache, monkeypatch):
    fake_clock(monkeypatch)
    q, k, v = inputs()
    text = str(explain(q, k, v, P.causal()))
    assert text.splitlines()[0] == "backend: blockwise (measured)"
    assert "  blockwise  chosen, 1 ms" in text and "  sdpa       5 ms" in text
    assert "  native     3 ms" in text and "  reference  9 ms" in text
    assert str(explain(q, k, v, P.causal())).splitlines()[0] == "backend: blockwise (cached)"
    text = str(explain(q, k, v, P.causal(), backend="native"))
    assert text == "backend: native (requested)\n  native     chosen"


def test_classes_ignore_sizes_but_not_structure():
    kind = autotune.pattern_kind
    assert kind(P.sliding_window(4)) == kind(P.sliding_window(400))
    assert kind(P.sliding_window(4)) != kind(P.sliding_window(4, align="top_left"))
    assert kind(P.documents([2, 3], causal=True)) != kind(P.documents([2, 3]))
    mixed = kind(P.per_head([P.sliding_window(2), P.causal(), P.sliding_window(9)]))
    assert mixed == kind(P.per_head([P.causal(), P.sliding_window(5)]))
    assert kind(P.sliding_window(8) | P.sinks(4)) == kind(P.sinks(1) | P.sliding_window(2))
    assert kind(P.sliding_window(8) | P.sinks(4)) != kind(P.sliding_window(8) & P.sinks(4))
    assert kind(None) == kind(P.full()) == "Full"
    assert [autotune._bucket(n) for n in (1, 2, 3, 1024, 1025)] == [0, 1, 2, 10, 11]
