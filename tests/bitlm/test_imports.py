"""The import graph of bitlm/: no cycles (module-level or lazy), and no private name imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bitlm"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported names) of every import statement of a module, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in modules else target), alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _ in _imports(name, path, modules) if t in modules and t != name}
            for name, path in modules.items()}


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_bitlm_has_no_import_cycles():
    graph = _graph()
    assert len(graph) > 30  # the walk found the package
    cycles = [c for name in sorted(graph) if (c := _cycle_from(name, graph))]
    assert cycles == []


def test_the_cycle_finder_sees_a_cycle():
    assert _cycle_from("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    private = [f"{name} imports {target}.{imported}" for name, path in modules.items()
               for target, imported in _imports(name, path, modules)
               if imported and imported.startswith("_") and not imported.startswith("__") and target != name]
    assert private == []
