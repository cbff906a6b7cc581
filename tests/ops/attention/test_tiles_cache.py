"""The compiled kernel's cache: loaded only from a private directory of the current user, each
library checked against the content hash recorded when it was stored, a corrupt one rebuilt;
an unusable cache costs one warning and a build in a private temporary directory, never a
library from a shared one. Every test points ``HEADWISE_CACHE`` at its own temporary folder."""

from __future__ import annotations

import ctypes
import errno
import io
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

import headwise.ops.attention.tiles as tiles

pytestmark = pytest.mark.skipif(not tiles.available(), reason="native tile kernel not built")

#: a child process: load the kernel, run it once, print whether it is the OpenMP build
CHILD = (
    "import torch, headwise.patterns as P\n"
    "from headwise.ops.attention import attention\n"
    "from headwise.ops.attention.tiles import _library\n"
    "q = torch.randn(1, 40, 2, 8)\n"
    "out = attention(q, q, q, P.sliding_window(5), backend='native')\n"
    "ref = attention(q, q, q, P.sliding_window(5), backend='reference')\n"
    "torch.testing.assert_close(out, ref)\n"
    "print(_library().headwise_tiles_openmp())\n"
)


def _child(root: Path) -> subprocess.Popen:
    environ = {**os.environ, "HEADWISE_CACHE": str(root)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _run_child(root: Path) -> subprocess.CompletedProcess:
    process = _child(root)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _fresh():
    """A new load of the kernel (not the process's cached one) and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = tiles._build_library.__wrapped__()
    assert lib is not None and lib.headwise_tiles_lanes() in (8, 16)
    return lib, [str(w.message) for w in caught]


def _planted(tmp_path: Path, marker: Path) -> bytes:
    """A shared library without the kernel's entry points whose constructor creates ``marker``:
    what another user could plant."""
    source, built = tmp_path / "planted.c", tmp_path / "planted.so"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'    FILE *f = fopen("{marker}", "w");\n'
        "    if (f) fclose(f);\n"
        "}\n"
    )
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(built)], check=True)
    return built.read_bytes()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, bytes]:
    """What one build leaves in a cache (name: content), built once for the tests that start
    from a filled cache."""
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADWISE_CACHE", str(root))
        _fresh()
    return {path.name: path.read_bytes() for path in (root / "headwise").iterdir()}


def _fill(cache: Path, built: dict[str, bytes]) -> None:
    os.makedirs(cache, mode=0o700)
    for name, data in built.items():
        (cache / name).write_bytes(data)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The kernel's cache directory under a ``HEADWISE_CACHE`` of this test's own."""
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "headwise"


@pytest.fixture
def loaded(monkeypatch):
    """The paths of the libraries ``ctypes.CDLL`` opens."""
    paths, real = [], ctypes.CDLL

    def spy(name, *args, **kwargs):
        paths.append(Path(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", spy)
    return paths


def _no_compiler(monkeypatch):
    def refuse(command, *args, **kwargs):
        raise AssertionError(f"compiled again: {command}")

    monkeypatch.setattr(subprocess, "run", refuse)


def _read_only(monkeypatch, root: Path) -> None:
    """Writes under ``root`` fail with EROFS, as on a read-only file system: root, which these
    tests run as, ignores permission bits, so the calls themselves refuse."""
    real = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "unlink")}
    real_open, real_run = io.open, subprocess.run

    def inside(path) -> bool:
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(root)

    def refuse(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise refuse(path)
        return real["open"](path, flags, *args, **kwargs)

    def file_open(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and inside(path):
            raise refuse(path)
        return real_open(path, mode, *args, **kwargs)

    def one_path(name):
        def call(path, *args, **kwargs):
            if inside(path):
                raise refuse(path)
            return real[name](path, *args, **kwargs)

        return call

    def two_paths(name):
        def call(src, dst, *args, **kwargs):
            if inside(src) or inside(dst):
                raise refuse(dst)
            return real[name](src, dst, *args, **kwargs)

        return call

    def run(command, *args, **kwargs):
        if "-o" in command and inside(command[command.index("-o") + 1]):
            return subprocess.CompletedProcess(command, 1, b"", b"Read-only file system")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", file_open)
    monkeypatch.setattr("builtins.open", file_open)
    monkeypatch.setattr(os, "mkdir", one_path("mkdir"))
    monkeypatch.setattr(os, "unlink", one_path("unlink"))
    monkeypatch.setattr(os, "rename", two_paths("rename"))
    monkeypatch.setattr(os, "replace", two_paths("replace"))
    monkeypatch.setattr(subprocess, "run", run)


def test_the_cache_is_private_and_a_built_library_is_loaded_from_it(cache, loaded, monkeypatch):
    _, warned = _fresh()
    assert not warned
    assert cache.stat().st_mode & 0o777 == 0o700
    assert loaded and all(path.parent == cache for path in loaded)
    assert not [p for p in cache.iterdir() if not p.name.endswith(".so")], "no temporary files"
    loaded.clear()
    _no_compiler(monkeypatch)
    _fresh()
    assert loaded and all(path.parent == cache for path in loaded)


def test_a_library_planted_in_the_shared_temp_dir_is_never_loaded(
    tmp_path, monkeypatch, loaded, built
):
    # the cache cannot be made (HEADWISE_CACHE is a file): today's code then used the shared
    # temp dir as its cache and loaded whatever library was there under the expected name
    names = list(built)
    marker = tmp_path / "constructor-ran"
    planted = _planted(tmp_path, marker)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    for name in names:
        (shared / name).write_bytes(planted)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path / "a-file"))
    loaded.clear()
    _, warned = _fresh()
    assert not marker.exists(), "the planted library's constructor ran"
    assert not any(path.parent == shared for path in loaded)
    assert len(warned) == 1 and "HEADWISE_CACHE" in warned[0], warned
    assert str(tmp_path / "a-file" / "headwise") in warned[0]
    assert sorted(p.name for p in shared.iterdir()) == sorted(names), "private build dir removed"


@pytest.mark.parametrize("case", ["world_writable", "group_writable", "open_parent", "owner"])
def test_a_cache_others_can_write_is_not_loaded_from(cache, monkeypatch, loaded, built, case):
    _fill(cache, built)
    if case == "world_writable":
        cache.chmod(0o777)
    elif case == "group_writable":
        cache.chmod(0o770)
    elif case == "open_parent":  # others may swap the cache folder itself
        cache.parent.chmod(0o777)
    else:
        uid = os.getuid() + 1000
        monkeypatch.setattr(os, "getuid", lambda: uid)
    loaded.clear()
    _, warned = _fresh()
    assert loaded and not any(path.is_relative_to(cache.parent) for path in loaded)
    assert len(warned) == 1 and "HEADWISE_CACHE" in warned[0] and str(cache) in warned[0], warned
    assert not loaded[-1].parent.exists(), "the private build directory is removed after loading"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no_entry_points"])
def test_a_damaged_cached_library_is_rebuilt_not_trusted(tmp_path, built, damage):
    # in a child process: a truncated library used to kill every later run with SIGBUS
    root = tmp_path / "cache"
    _fill(root / "headwise", built)
    libraries = list((root / "headwise").glob("*.so"))
    bad = {
        "truncated": lambda data: data[: len(data) // 2],
        "garbage": lambda data: os.urandom(len(data)),
        "empty": lambda data: b"",
        "no_entry_points": lambda data: _planted(tmp_path, tmp_path / "constructor-ran"),
    }[damage]
    for path in libraries:
        path.write_bytes(bad(path.read_bytes()))
    damaged = {path.read_bytes() for path in libraries}
    child = _run_child(root)
    assert child.returncode == 0, child.stderr[-2000:]
    openmp = tiles._library().headwise_tiles_openmp()
    assert child.stdout.split() == [str(openmp)], "the same (OpenMP) build, not the next variant"
    assert not (tmp_path / "constructor-ran").exists()
    assert not damaged & {p.read_bytes() for p in (root / "headwise").glob("*.so")}


@pytest.mark.parametrize("exists", [True, False])
def test_an_unwritable_cache_warns_once_and_still_builds(cache, monkeypatch, loaded, exists):
    if exists:
        os.makedirs(cache, mode=0o700)
    _read_only(monkeypatch, cache.parent)
    loaded.clear()
    _, warned = _fresh()
    assert len(warned) == 1 and "HEADWISE_CACHE" in warned[0] and str(cache) in warned[0], warned
    assert loaded and not any(path.is_relative_to(cache.parent) for path in loaded)
    assert not loaded[-1].parent.exists(), "the private build directory is removed after loading"


def test_processes_building_at_once_share_one_cache(cache, monkeypatch, loaded):
    children = [_child(cache.parent) for _ in range(3)]
    results = [child.communicate(timeout=300) for child in children]
    for child, (_, stderr) in zip(children, results):
        assert child.returncode == 0 and "Warning" not in stderr, stderr[-2000:]
    assert len({stdout for stdout, _ in results}) == 1
    assert not [p for p in cache.iterdir() if not p.name.endswith(".so")], "no temporary files"
    _no_compiler(monkeypatch)
    _, warned = _fresh()
    assert not warned and loaded[-1].parent == cache
