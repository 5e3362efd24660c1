"""The package's layers, read from the AST of every file (imports inside functions included).

Floors, bottom to top; a module imports only from its own floor or the floors below, never
from a floor above, with no cycle inside a floor, and never a `_private` name of another
module. Experiments use the public namespace only (no `gaugejax._*` module). No exemptions.
"""

import ast
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]

# (package prefix, what lives there); a module's floor is its longest matching prefix
FLOORS = (
    ("gaugejax._core", "numerics: the diffrax wrapper, jvp calculus, propagators, types, checks"),
    ("gaugejax._infra", "infrastructure: training loop, run files, devices, data"),
    ("gaugejax.models", "models that own their knowledge"),
    ("gaugejax.gauges", "gauge families, one per file, on the abstract bases"),
    ("gaugejax._analysis", "the sweep engine, verdicts, symmetry discovery"),
    ("gaugejax._fixing", "applications: gauge fixing, gauge search, teleport, balancing, orbits"),
    ("gaugejax", "the public namespace"),
    ("experiments", "config -> library calls -> claims"),
)


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(root=ROOT, packages=("gaugejax", "experiments")) -> dict[str, list[tuple[str, str]]]:
    """Module -> `(imported project module, imported name or '')` for every `import` and
    `from ... import` statement wherever it stands; relative imports resolved, and
    `from pkg import sub` counted as an import of the submodule `pkg.sub` when there is one."""
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    modules = {_module_name(p, root) for p in files}

    def project(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    out: dict[str, list[tuple[str, str]]] = {}
    for path in files:
        name = _module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: list[tuple[str, str]] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(t, "") for a in node.names if (t := project(a.name))]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        found.append((f"{base}.{alias.name}", ""))
                    elif t := project(base):
                        found.append((t, alias.name))
        out[name] = [(t, n) for t, n in found if t != name]
    return out


def import_graph(root=ROOT, packages=("gaugejax", "experiments")) -> dict[str, set[str]]:
    return {m: {t for t, _ in edges} for m, edges in imports(root, packages).items()}


def floor(module: str) -> int:
    matches = [i for i, (p, _) in enumerate(FLOORS) if module == p or module.startswith(p + ".")]
    assert matches, f"{module} is on no floor: add its package to FLOORS"
    return max(matches, key=lambda i: len(FLOORS[i][0]))


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} (floor {FLOORS[floor(a)][0]}) imports {b} (floor {FLOORS[floor(b)][0]})"
        for a, targets in graph.items()
        for b in targets
        if floor(b) > floor(a)
    )


def private_imports(edges: dict[str, list[tuple[str, str]]]) -> list[str]:
    """`from module import _name` across modules, and experiments importing private modules."""
    bad = [
        f"{a} imports {b}.{n}"
        for a, found in edges.items()
        for b, n in found
        if n.startswith("_") and not n.startswith("__")
    ]
    bad += [
        f"{a} imports the private module {b}"
        for a, found in edges.items()
        if a.split(".")[0] == "experiments"
        for b, _ in found
        if b.startswith("gaugejax") and any(part.startswith("_") for part in b.split("."))
    ]
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def test_every_import_points_down_with_no_cycle():
    graph = import_graph()
    assert "gaugejax._analysis.sweep" in graph and "gaugejax.models.cubic" in graph
    assert {floor(m) for m in graph} == set(range(len(FLOORS)))  # every floor is inhabited
    assert upward_edges(graph) == []
    assert find_cycle(graph) is None, find_cycle(graph)


def test_no_private_name_crosses_a_module():
    assert private_imports(imports()) == []


def test_no_public_function_shadows_its_module():
    """`gaugejax.X` is a module or a name, never both (a function `solve` once hid the module
    `gaugejax.solve` it lived in)."""
    import importlib
    import pkgutil

    import gaugejax

    clashes = []
    for pkg_name in ("gaugejax", "gaugejax.models", "gaugejax.gauges"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            value = getattr(pkg, info.name, None)
            if (
                value is not None
                and not hasattr(value, "__path__")
                and not (getattr(value, "__name__", None) == f"{pkg_name}.{info.name}")
            ):
                clashes.append(f"{pkg_name}.{info.name} is {type(value).__name__}")
    assert clashes == [], clashes
    assert gaugejax.io.__name__ == "gaugejax._infra.io"


def test_the_checks_can_fail():
    """Negative cases: a planted upward import, a planted private import, a cycle."""
    graph = import_graph()
    graph["gaugejax._core.calculus"] = graph["gaugejax._core.calculus"] | {"gaugejax.models"}
    assert upward_edges(graph) == [
        "gaugejax._core.calculus (floor gaugejax._core) imports gaugejax.models "
        "(floor gaugejax.models)"
    ]
    edges = imports()
    edges["gaugejax._fixing.orbits"] = edges["gaugejax._fixing.orbits"] + [
        ("gaugejax._fixing.gauge_fixing", "_integrate")
    ]
    edges["experiments.orbit_cost"] = edges["experiments.orbit_cost"] + [
        ("gaugejax._analysis.sweep", "SweepResult")
    ]
    assert private_imports(edges) == [
        "experiments.orbit_cost imports the private module gaugejax._analysis.sweep",
        "gaugejax._fixing.orbits imports gaugejax._fixing.gauge_fixing._integrate",
    ]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_and_submodule_imports_are_seen(tmp_path):
    """The walk covers imports inside functions (a lazy import once hid a cycle), and
    `from . import a` is an edge to the submodule `a`, not to the package."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\nx = 1\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
