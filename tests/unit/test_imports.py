"""No import cycles inside the fpy3 package.

Every module of ``fpy3`` is read with ``ast`` (nothing is imported) and each import of
another fpy3 module becomes an edge, including imports inside functions: a lazy import
still ties the two modules together, it only moves the failure to run time. Importing
``a.b.c`` also runs the ``__init__`` of ``a.b`` unless the importer is inside it.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fpy3

PACKAGE = "fpy3"
PACKAGE_DIR = Path(fpy3.__file__).resolve().parent

# Cycles outside the supervisor, being removed on another line of work: empty this once
# they are gone (a listed cycle that no longer exists fails
# test_known_cycles_are_still_there). Each is listed from its alphabetically first module.
KNOWN_CYCLES: frozenset[tuple[str, ...]] = frozenset(
    {
        # H3Server imports the HTTP/3 websocket module lazily; that one imports it back.
        ("fpy3.h3.protocol", "fpy3.ws.h3"),
        # fpy3.asgi.ASGIServer imports fpy3.embed lazily; embed runs the server, whose
        # protocols import fpy3.asgi submodules again.
        ("fpy3.asgi", "fpy3.embed"),
        ("fpy3.asgi", "fpy3.embed", "fpy3.server", "fpy3.h1.protocol"),
        ("fpy3.asgi", "fpy3.embed", "fpy3.server", "fpy3.h1.protocol", "fpy3.ws.h1"),
        ("fpy3.asgi", "fpy3.embed", "fpy3.server", "fpy3.h3.protocol"),
        ("fpy3.asgi", "fpy3.embed", "fpy3.server", "fpy3.h3.protocol", "fpy3.ws.h3"),
    }
)


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


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes that run, anywhere in the tree (not under ``if TYPE_CHECKING``)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
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
    new = cycles(import_graph()) - KNOWN_CYCLES
    assert not new, "import cycles:\n" + "\n".join(sorted(map(_show, new)))


def test_known_cycles_are_still_there():
    gone = KNOWN_CYCLES - cycles(import_graph())
    assert not gone, "no longer cycles, remove them from KNOWN_CYCLES:\n" + "\n".join(
        sorted(map(_show, gone))
    )
