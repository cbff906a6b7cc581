"""The compiled kernel's cache: loaded only from a private directory of the current user, each
library checked against the content hash recorded when it was stored, a corrupt one rebuilt;
an unusable cache costs one warning and a build in a private temporary directory, never a
library from a shared one. Every test points ``HEADWISE_CACHE`` at its own temporary folder."""

from __future__ import annotations

import ctypes
import errno
import functools
import io
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import headwise.ops.attention.native.build as build
import headwise.patterns as P

pytestmark = pytest.mark.skipif(not build.available(), reason="native tile kernel not built")

#: a child process: load the kernel, run it once, print whether it is the OpenMP build
CHILD = (
    "import torch, headwise.patterns as P\n"
    "from headwise.ops.attention import attention\n"
    "from headwise.ops.attention.native.build import library\n"
    "q = torch.randn(1, 40, 2, 8)\n"
    "out = attention(q, q, q, P.sliding_window(5), backend='native')\n"
    "ref = attention(q, q, q, P.sliding_window(5), backend='reference')\n"
    "torch.testing.assert_close(out, ref)\n"
    "print(library().headwise_tiles_openmp())\n"
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
        lib = build.build_library()
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
    """The files of the libraries ``ctypes.CDLL`` opens (a ``/proc/self/fd/N`` name stands for
    the file open on that descriptor: the path it was opened by)."""
    paths, real = [], ctypes.CDLL

    def spy(name, *args, **kwargs):
        paths.append(Path(os.readlink(name) if name.startswith("/proc/self/fd/") else name))
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
    else:  # the cache folder belongs to another user (the libraries the build makes do not)
        _owner_of(monkeypatch, "lstat", lambda path: Path(path) == cache, os.getuid() + 1000)
    loaded.clear()
    _, warned = _fresh()
    assert loaded and not any(path.is_relative_to(cache.parent) for path in loaded)
    assert len(warned) == 1 and "HEADWISE_CACHE" in warned[0] and str(cache) in warned[0], warned
    assert not loaded[-1].parent.exists(), "the private build directory is removed after loading"


def _owner_of(monkeypatch, name: str, which, uid: int) -> None:
    """``os.<name>`` (lstat, fstat) says the files ``which(argument)`` picks belong to ``uid``:
    another user's file without ``chown``, which needs root."""
    real = getattr(os, name)

    def call(target, *args, **kwargs):
        status = real(target, *args, **kwargs)
        if not which(target):
            return status
        values = list(status[:10])
        values[4] = uid  # st_uid
        return os.stat_result(values)

    monkeypatch.setattr(os, name, call)


def _in(directory: Path):
    """Whether a descriptor's file lies in ``directory``."""
    return lambda fd: Path(os.readlink(f"/proc/self/fd/{fd}")).parent == directory


@pytest.mark.parametrize("case", ["symlink", "symlinked_to_own_file", "owner", "group", "world"])
def test_a_cached_library_is_checked_on_the_descriptor_that_is_loaded(
    tmp_path, cache, monkeypatch, loaded, built, case
):
    # each file under its digest name, as a build stores it: only the file itself is wrong
    marker = tmp_path / "constructor-ran"
    planted = _planted(tmp_path, marker)
    _fill(cache, built)
    name = next(iter(built))
    outside = tmp_path / "outside.so"
    if case == "symlink":  # a name in a private cache pointing to a file anyone may write
        target, data = outside, planted
        outside.write_bytes(planted)
        outside.chmod(0o666)
    elif case == "symlinked_to_own_file":  # a good library, but reached through a link
        target, data = outside, built[name]
        outside.write_bytes(data)
    os.unlink(cache / name)  # the only file for its key: nothing loads before it
    if case.startswith("symlink"):
        digest = build._digest(data)
        link = cache / f"{name.rsplit('-', 1)[0]}-{digest}.so"
        link.symlink_to(target)
    else:
        path = cache / f"{name.rsplit('-', 1)[0]}-{build._digest(planted)}.so"
        path.write_bytes(planted)
        if case == "owner":
            _owner_of(monkeypatch, "fstat", _in(cache), os.getuid() + 1000)
        else:
            path.chmod(0o620 if case == "group" else 0o602)
    loaded.clear()
    _, warned = _fresh()
    assert not marker.exists(), "the planted library's constructor ran"
    assert outside not in loaded, "a library was loaded through a symlink"
    assert not warned, warned
    if case == "symlinked_to_own_file":
        assert not (cache / link.name).is_symlink(), "the link is replaced by a built file"


@pytest.mark.skipif(not build._BY_DESCRIPTOR, reason="no /proc/self/fd: loaded by path")
def test_the_loader_maps_the_descriptor_that_was_checked(cache, monkeypatch, loaded):
    # between the checks and the load nobody can put another file under the checked name: the
    # loader is handed the descriptor that was read and hashed, never the path again
    _fresh()
    names = []
    real = ctypes.CDLL

    def swap(name, *args, **kwargs):
        names.append(name)
        for path in cache.glob("*.so"):
            os.unlink(path)
            path.write_bytes(b"swapped")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", swap)
    lib, _ = _fresh()
    assert names and all(name.startswith("/proc/self/fd/") for name in names), names
    assert lib.headwise_tiles_lanes() in (8, 16)


#: what glibc's loader says of a library on a file system mounted ``noexec``
NOEXEC = "failed to map segment from shared object"


def _noexec(monkeypatch, directory: Path) -> None:
    """Libraries in ``directory`` cannot be loaded, as on a file system mounted ``noexec``."""
    real = ctypes.CDLL

    def load(name, *args, **kwargs):
        path = Path(os.readlink(name) if name.startswith("/proc/self/fd/") else name)
        if path.is_relative_to(directory):
            raise OSError(f"{name}: {NOEXEC}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", load)


def test_a_cache_whose_libraries_cannot_be_loaded_warns_once_and_loads_the_private_build(
    cache, monkeypatch, loaded
):
    compiles = []
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        compiles.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    _noexec(monkeypatch, cache)
    loaded.clear()
    _, warned = _fresh()
    assert len(compiles) == 1, "one build, not one per variant"
    assert len(warned) == 1 and "HEADWISE_CACHE" in warned[0] and str(cache) in warned[0], warned
    assert NOEXEC in warned[0]
    assert not loaded[-1].is_relative_to(cache.parent) and not loaded[-1].parent.exists()


def test_when_no_directory_can_load_a_library_the_reason_says_so(tmp_path, cache, monkeypatch):
    _noexec(monkeypatch, Path("/"))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        lib, why = build._build()
    assert lib is None
    assert "cannot be loaded" in why and NOEXEC in why and "compiler" not in why, why
    monkeypatch.setattr(build, "_build_once", functools.cache(lambda: (None, why)))
    from headwise.ops.attention import attention, explain

    q = torch.randn(1, 8, 1, 8)
    chosen = explain(q, q, q, P.causal(), backend=("native", "blockwise"))
    assert chosen.backend == "blockwise" and NOEXEC in chosen.reasons["native"][0]
    with pytest.raises(ValueError, match=NOEXEC):
        attention(q, q, q, P.causal(), backend="native")


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
    openmp = build.library().headwise_tiles_openmp()
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
