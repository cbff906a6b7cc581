"""The layering contract: imports run one way, and no module imports itself back.

Every module of ``src/headwise`` is parsed (not imported) and each ``import`` is resolved to the
module that defines the name. The contract fails on

- an upward import: a floor importing a higher floor (anywhere in the file, function bodies
  included), or one of the sibling integrations (``hf``, ``distributed``) importing the other;
- an import cycle between modules.

The one exception is a deprecated name served from its new place: ``headwise._deprecated.moved``
imports that place only when the old name is used, and a hand-written module-level
``__getattr__`` doing the same is skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: floors from the bottom; a module may import its own floor and every floor below
FLOORS = (
    ("headwise._checks", "headwise._deprecated", "headwise.types", "headwise.measure"),
    ("headwise.patterns",),
    ("headwise.ops",),
    ("headwise.hooks",),
    ("headwise.layers",),
    ("headwise.models", "headwise.moa"),
    ("headwise.hf", "headwise.distributed"),
    ("headwise.evals",),
    ("headwise.cli", "headwise.__main__", "headwise.hf.__main__", "headwise"),
)
#: integrations on one floor that compose through the floors below, never through each other
SIBLINGS = ("headwise.hf", "headwise.distributed")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((SRC / "headwise").rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _floor(module: str) -> tuple[int, str]:
    best = None
    for level, names in enumerate(FLOORS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (level, name)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")
    return best


def _lazy_nodes(tree: ast.Module) -> set[int]:
    """Nodes inside a module-level ``__getattr__`` (deprecation shims)."""
    skipped: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def _package_of(module: str) -> str:
    return module if module in PACKAGES else module.rpartition(".")[0]


def _imports(module: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every headwise import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    lazy = _lazy_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package_of(module).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == "headwise"]


def _definer(package: str, name: str, seen: frozenset = frozenset()) -> str:
    """The module that defines ``name`` re-exported by ``package``'s ``__init__``."""
    tree = ast.parse(MODULES[package].read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name and node.module in MODULES:
                    if node.module in PACKAGES and node.module not in seen:
                        return _definer(node.module, alias.name, seen | {package})
                    return node.module
    return package


def _edges(module: str) -> set[str]:
    """Modules ``module`` imports (function bodies included), looking through re-exports."""
    tree = ast.parse(MODULES[module].read_text())
    lazy = _lazy_nodes(tree)
    needed = set()
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            needed.update(alias.name for alias in node.names if alias.name in MODULES)
        if not isinstance(node, ast.ImportFrom) or node.level:
            continue
        if not (node.module or "").startswith("headwise"):
            continue
        for alias in node.names:
            sub = f"{node.module}.{alias.name}"
            if sub in MODULES:
                needed.add(sub)
            elif node.module in PACKAGES and node.module != module:
                needed.add(_definer(node.module, alias.name))
            elif node.module in MODULES:
                needed.add(node.module)
    return needed - {module}


def test_every_module_is_on_a_floor():
    for module in MODULES:
        _floor(module)


def _violations(module: str) -> list[str]:
    level, home = _floor(module)
    wrong = []
    for target, line in _imports(module):
        if target not in MODULES:
            continue
        target_level, target_home = _floor(target)
        upward = target_level > level
        sideways = home in SIBLINGS and target_home in SIBLINGS and home != target_home
        if upward or sideways:
            wrong.append(f"{MODULES[module].name}:{line} ({module}) imports {target}")
    return wrong


def test_no_import_runs_upward_or_between_siblings():
    wrong = sorted({line for module in MODULES for line in _violations(module)})
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def _cycles() -> list[str]:
    graph = {module: _edges(module) for module in MODULES}
    cycles, stack, state = [], [], {}

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_a_planted_cycle_is_caught(tmp_path, monkeypatch):
    for name, other in (("a", "b"), ("b", "a")):
        path = tmp_path / f"{name}.py"
        path.write_text(f"def f():\n    from headwise.ops.planted_{other} import f\n")
        monkeypatch.setitem(MODULES, f"headwise.ops.planted_{name}", path)
    assert "headwise.ops.planted_a -> headwise.ops.planted_b -> headwise.ops.planted_a" in _cycles()


@pytest.mark.parametrize(
    "home, source, caught",
    [
        ("headwise.ops.planted", "from headwise.layers import MultiHeadAttention\n", True),
        ("headwise.hf.planted", "from headwise.distributed import ring_attention\n", True),
        ("headwise.ops.planted", "def f():\n    from headwise.cli import main\n", True),
        ("headwise.ops.planted", "def __getattr__(n):\n    from headwise.cli import main\n", False),
        ("headwise.hf.planted", "from headwise.ops.attention import attention\n", False),
    ],
)
def test_the_contract_can_fail(tmp_path, monkeypatch, home, source, caught):
    """A planted upward or sideways import is caught; a deprecation shim or a downward is not."""
    path = tmp_path / "planted.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, home, path)
    assert bool(_violations(home)) == caught
