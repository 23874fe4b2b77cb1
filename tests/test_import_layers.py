"""The package's modules depend on each other one way: no import cycle, found by parsing ``ttswap/``
with ``ast`` (no module is imported). Every import counts, wherever it is written: at the top, inside
a function (a late import is still a dependency, only hidden) and under ``TYPE_CHECKING`` (a type the
module names is a module it knows). ``from package import name`` depends on ``package.name`` when that
is a module, else on the package's ``__init__``; the implicit import of parent packages that Python
runs first is not counted (every module would otherwise depend on ``ttswap/__init__``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ttswap"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    inside = set(component)
    return "\n".join(f"  {m} imports {', '.join(sorted(graph[m] & inside))}" for m in component)


def test_ttswap_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "ttswap.converter" in graph["ttswap"]  # the parse saw the package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n\n".join(describe(c, graph) for c in found)


def test_tuning_sits_above_the_converter():
    graph = import_graph()
    below = {m for m in graph if not m.startswith("ttswap.tuning") and m != "ttswap"}
    for module in below:
        assert not {t for t in graph[module] if t.startswith("ttswap.tuning")}, f"{module} imports the tuner"
    assert "ttswap.converter" in graph["ttswap.tuning.auto"]


def test_the_checker_finds_a_late_import_cycle(tmp_path):
    # the checker itself, on a two-module package whose cycle closes inside a function
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import g\n")
    (package / "b.py").write_text("def g():\n    from . import a\n")
    (package / "c.py").write_text("from pkg import a\n")
    graph = import_graph(package)
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert graph["pkg.c"] == {"pkg.a"}
