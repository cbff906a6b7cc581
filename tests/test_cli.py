"""The command line: bad arguments give one clear line on stderr and exit status 2 before any
work starts; ``--version``; every option documents itself; ``inspect`` is a real subcommand."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

import headwise
from headwise import cli


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture
def no_report(monkeypatch):
    """Fail the test if the report (20 s of model work) starts."""
    import headwise.hf.report

    def report(*args, **kwargs):
        raise AssertionError("the report started before the arguments were checked")

    monkeypatch.setattr(headwise.hf.report, "report", report)


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("headwise")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


def test_version(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0
    assert out.strip() == f"headwise {headwise.__version__}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_demo_on_missing_cuda(capsys):
    assert_one_line_error(*run_main(capsys, "demo", "--device", "cuda")[::2], "--device", "cuda")


@pytest.mark.parametrize(
    "argv,words",
    [
        (["demo", "--device", "toaster"], ["--device", "toaster"]),
        (["demo", "--device", "meta"], ["--device", "meta"]),
        (["demo", "--device", "cuda:7"], ["--device", "cuda:7"]),
    ],
)
def test_demo_bad_device(capsys, argv, words):
    code, _, err = run_main(capsys, *argv)
    assert_one_line_error(code, err, *words)


@pytest.mark.parametrize("option", ["--length", "--heads", "--dim", "--batch", "--repeats"])
@pytest.mark.parametrize("value", ["0", "-3", "2.5", "many"])
def test_demo_sizes_must_be_positive_integers(capsys, option, value):
    code, _, err = run_main(capsys, "demo", option, value)
    assert code == 2
    assert option in err and value in err
    assert "Traceback" not in err


def test_inspect_missing_model_dir(capsys, no_report):
    code, _, err = run_main(capsys, "inspect", "--model", "/nonexistent")
    assert_one_line_error(code, err, "--model", "/nonexistent")


def test_inspect_model_dir_without_config(capsys, no_report, tmp_path):
    code, _, err = run_main(capsys, "inspect", "--model", str(tmp_path))
    assert_one_line_error(code, err, "--model", "config.json")


def test_inspect_unwritable_out_fails_before_work(capsys, no_report, tmp_path):
    code, _, err = run_main(capsys, "inspect", "--out", "/missing/dir/x.html")
    assert_one_line_error(code, err, "--out", "/missing/dir")
    code, _, err = run_main(capsys, "inspect", "--out", str(tmp_path))
    assert_one_line_error(code, err, "--out", "directory")
    too_long = tmp_path / ("x" * 300 + ".html")  # passes every path check, fails on open
    code, _, err = run_main(capsys, "inspect", "--out", str(too_long))
    assert_one_line_error(code, err, "--out", "cannot write there")
    assert not list(tmp_path.iterdir())  # the check leaves nothing behind


def test_inspect_calls_the_report(capsys, monkeypatch, tmp_path):
    import headwise.hf.report

    seen = {}

    def report(model, texts, out):
        seen.update(model=model, texts=texts, out=out)
        return argparse.Namespace(path=out, sink_heads=[("layer.0", 3, 0.75)])

    monkeypatch.setattr(headwise.hf.report, "report", report)
    (tmp_path / "config.json").write_text("{}")
    out = tmp_path / "r.html"
    assert cli.main(["inspect", "--model", str(tmp_path), "--out", str(out), "one", "two"]) == 0
    assert seen == {"model": str(tmp_path), "texts": ["one", "two"], "out": str(out)}
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "sink head layer.0 head 3: share 0.750" in printed


def test_inspect_help_names_the_program(capsys):
    code, out, _ = run_main(capsys, "inspect", "--help")
    assert code == 0
    assert out.startswith("usage: headwise inspect")
    assert "--model" in out and "--out" in out


def test_every_option_has_help():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("headwise", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions), name
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


def test_unknown_option_exits_2(capsys):
    code, _, err = run_main(capsys, "demo", "--lenght", "8")
    assert code == 2 and "--lenght" in err


def test_demo_runs(capsys):
    args = ["demo", "--length", "128", "--heads", "2", "--dim", "8", "--repeats", "1"]
    assert cli.main([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "sliding_window(8) | sinks(4)" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_entry_point_exit_status():
    done = subprocess.run(
        [sys.executable, "-m", "headwise", "demo", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert_one_line_error(done.returncode, done.stderr, "--device")
