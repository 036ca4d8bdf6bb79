"""No import cycles inside the fpy3 package, and no import against the rooms' order.

Every module of ``fpy3`` is read with ``ast`` (nothing is imported) and each import of
another fpy3 module becomes an edge, including imports inside functions: a lazy import
still ties the two modules together, it only moves the failure to run time. Importing
``a.b.c`` also runs the ``__init__`` of ``a.b`` unless the importer is inside it.
Imports under ``if TYPE_CHECKING:`` count too: a type named across rooms is a tie
between them as well (a lower room states what it needs as a Protocol).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fpy3

PACKAGE = "fpy3"
PACKAGE_DIR = Path(fpy3.__file__).resolve().parent

# The rooms, lowest first: a module may import its own room and those below it, never
# one above (ARCHITECTURE.md: core <- wsproto <- h1 / h2 / h3 <- service <- worker / embed <-
# supervisor). Modules not listed are the shared base (config, logs, tls, sockets, ...).
RANKS = {
    "fpy3.core": 1,
    "fpy3.wsproto": 2,
    "fpy3.h1": 3,
    "fpy3.h2": 3,
    "fpy3.h3": 3,
    "fpy3.service": 4,
    "fpy3.bootstrap": 5,
    "fpy3.worker": 5,
    "fpy3.embed": 5,
    "fpy3.supervisor": 6,
    "fpy3.asgi": 6,
    "fpy3.cli": 7,
}


def rank(module: str) -> int:
    for room in sorted(RANKS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return RANKS[room]
    return 0


def module_names() -> dict[str, Path]:
    """Dotted name -> source file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((PACKAGE, *parts))] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(tree: ast.AST):
    """Import nodes anywhere in the tree."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fpy3 modules that importing ``name`` runs (its own parents aside)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from package import name`` imports the submodule ``name`` when there is one.
            found = [origin] + [f"{origin}.{alias.name}" for alias in node.names]
        for target in found:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            for module in [*_ancestors(target), target]:
                if module in modules and module != name and module not in _ancestors(name):
                    targets.add(module)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary cycle, each listed from its smallest module."""
    found = set()
    for start in sorted(graph):
        # Cycles through ``start`` among modules after it: each cycle is found once.
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.add(tuple(path))
                elif nxt > start and nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    return found


def _show(cycle: tuple[str, ...]) -> str:
    return " -> ".join((*cycle, cycle[0]))


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "fpy3.supervisor.arbiter" in graph["fpy3.cli"]  # inside main()
    assert "fpy3.bootstrap" in graph["fpy3.cli"]  # from .bootstrap import ...
    assert "fpy3.supervisor.steering.bpf" in graph["fpy3.supervisor.steering.reuseport"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(sorted(map(_show, found)))


def test_nothing_imports_upward():
    upward = [
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        for target in targets
        if rank(target) > rank(name)
    ]
    assert not upward, "imports against the rooms' order:\n" + "\n".join(sorted(upward))


def test_the_core_never_sees_cffi():
    graph = import_graph()
    core = [name for name in graph if rank(name) == RANKS["fpy3.core"]]
    assert core
    for name in core:
        assert graph[name] <= set(core), (name, graph[name] - set(core))


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == {("a", "b", "c")}
