"""The package's import graph: no cycles (imports inside functions included), and the lower
layers (models, calculus, solve) know no gauges, sweeps or experiments."""

import ast
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]
LOWER = ("gaugejax.models", "gaugejax.calculus", "gaugejax.solve")
UPPER = ("gaugejax.gauges", "gaugejax.sweep", "gaugejax.verdict", "experiments")


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root=ROOT, packages=("gaugejax", "experiments")) -> dict[str, set[str]]:
    """Module -> the project modules it imports, from the AST of every file (every `import`
    and `from ... import` statement, wherever it stands, relative ones resolved)."""
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    modules = {_module_name(p, root) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        name = _module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule sub when there is one
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (depth-first search).

    A package's `__init__` importing its own submodules is not a cycle unless a submodule
    imports something that leads back to a module on the current path."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # importing a parent package from inside it is Python's normal package machinery
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "gaugejax.sweep" in graph and "gaugejax.models.cubic" in graph
    assert find_cycle(graph) is None, find_cycle(graph)


def test_lower_layers_know_no_gauges_sweeps_or_experiments():
    graph = import_graph()

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen and not start.startswith(nxt + "."):
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    offenders = {
        module: sorted(t for t in reachable(module) if t.startswith(UPPER))
        for module in graph
        if module.startswith(LOWER)
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}, offenders


def test_the_checks_can_fail():
    """Negative cases: a two-module cycle and a lower module importing a gauge are found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    graph["gaugejax.models.node"] = graph["gaugejax.models.node"] | {"gaugejax.gauges.base"}
    graph["gaugejax.gauges.base"] = graph["gaugejax.gauges.base"] | {"gaugejax.models.node"}
    assert find_cycle(graph) is not None


def test_function_level_imports_are_seen(tmp_path):
    """The walk covers imports inside functions (a lazy import once hid a cycle)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\nx = 1\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg", "pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
