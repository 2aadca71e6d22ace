"""The library's layering, checked on the source: recipes sit on top of the library and nothing in
the library imports them, and the packages import each other without cycles (imports inside
functions count too: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "distil"
TOP = {"recipes", "cli", "__main__"}  # may import anything


def _package(module: str) -> str | None:
    """``distil.cache.writer`` -> ``cache``; ``distil.errors`` -> ``errors``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "distil" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "distil":  # from distil import recipes
                found.extend((node.lineno, f"distil.{a.name}") for a in node.names)
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {}
    into_recipes: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            other = _package(module)
            if other is None or other == own:
                continue
            if other == "recipes" and own not in TOP:
                into_recipes.append(f"{rel}:{line} imports {module}")
            if own not in TOP:
                edges.setdefault(own, set()).add(other)
    return edges, into_recipes


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [*path, nxt]
            if state.get(nxt) is None and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if state.get(start) is None and (found := visit(start, [start])):
            return found
    return None


def test_library_never_imports_recipes() -> None:
    _, into_recipes = _graph()
    assert into_recipes == [], into_recipes


def test_packages_import_each_other_without_cycles() -> None:
    edges, _ = _graph()
    assert "recipes" not in {p for deps in edges.values() for p in deps}
    cycle = _cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path: Path) -> None:
    """The check itself can fail: a cycle is found, and an import inside a function counts."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    lazy = tmp_path / "m.py"
    lazy.write_text("def f():\n    from distil.recipes import lm_kd\n")
    assert (2, "distil.recipes") in _imports(lazy)
