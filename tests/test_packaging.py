"""The house rules of packaging and CI: a LICENSE with the licence pyproject names, the declared
dependencies equal to what the code imports, no installed package named `experiments`, one
version source, `.ci/run` running ruff and then the tests, and every repository file a docstring
or comment cites present. Each scan has a negative case on planted sources."""

import ast
import fnmatch
import importlib.metadata
import importlib.util
import io
import pathlib
import re
import subprocess
import sys
import tokenize
import tomllib

import gaugejax as gj


ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn"}
# declared but never imported, each with its reason
NOT_IMPORTED = {
    "jaxlib": "jax's backend, bounded beside jax so a fresh install gets a matching pair",
    "pytest-xdist": "a pytest plugin: the test command's `-n 2`",
    "beartype": "the runtime shape checks of pytest's addopts (--jaxtyping-packages)",
    "ruff": "a command: .ci/run's `ruff check` and `ruff format --check`",
}
FIRST_PARTY = {"gaugejax", "experiments", "tests"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement)[0]).lower()


def third_party_imports(paths) -> dict[str, set[str]]:
    """Distribution name -> the files importing it: every absolute `import` and `from ...
    import` (inside functions too) and every `pytest.importorskip("...")` of the given files,
    standard library and first-party packages left out."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(pathlib.Path(path).read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in FIRST_PARTY:
                    continue
                found.setdefault(_name(DISTRIBUTION.get(top, top)), set()).add(str(path))
    return found


# source group -> the extras (besides the runtime dependencies) its imports may come from
ALLOWED_EXTRAS = {
    "library": (),  # gaugejax/: what `pip install -e .` gives
    "experiments": ("bench",),  # the benchmark's optional baselines, imported where used
    "tests": ("test", "bench", "hf"),  # bench and hf only through pytest.importorskip
}


def dependency_mismatch(project: dict, sources: dict[str, list]) -> dict[str, list[str]]:
    """What the `[project]` table of a pyproject gets wrong about `sources` (group of
    `ALLOWED_EXTRAS` -> files): imports declared nowhere their group may take them from, and
    declared distributions that nothing imports (less `NOT_IMPORTED`)."""
    runtime = {_name(r) for r in project.get("dependencies", [])}
    extras = {
        extra: {_name(r) for r in reqs}
        for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    imports = {group: third_party_imports(files) for group, files in sources.items()}
    undeclared = []
    for group, found in imports.items():
        allowed = runtime.union(*(extras.get(e, set()) for e in ALLOWED_EXTRAS[group]))
        undeclared += [
            f"{dist} ({', '.join(sorted(files))})"
            for dist, files in found.items()
            if dist not in allowed
        ]
    used = {dist for found in imports.values() for dist in found}
    declared = runtime.union(*extras.values())
    unused = sorted(d for d in declared if d not in used and d not in NOT_IMPORTED)
    return {"undeclared": sorted(undeclared), "unused": unused}


def _sources() -> dict[str, list]:
    return {
        "library": sorted((ROOT / "gaugejax").rglob("*.py")),
        "experiments": sorted((ROOT / "experiments").rglob("*.py")),
        "tests": sorted((ROOT / "tests").rglob("*.py")),
    }


def test_license_is_the_full_apache_2_text():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    for n, section in enumerate(["Definitions", "Grant of Copyright License",
                                 "Grant of Patent License", "Redistribution",
                                 "Submission of Contributions", "Trademarks",
                                 "Disclaimer of Warranty", "Limitation of Liability",
                                 "Accepting Warranty or Additional Liability"], 1):  # fmt: skip
        assert f"{n}. {section}." in text, section
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text


def test_dependencies_equal_imports():
    mismatch = dependency_mismatch(PYPROJECT["project"], _sources())
    assert mismatch == {"undeclared": [], "unused": []}, mismatch
    # what NOT_IMPORTED says is true
    assert "-n " in (ROOT / ".ci" / "run").read_text()
    assert "beartype" in PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
    assert "ruff check" in (ROOT / ".ci" / "run").read_text()
    assert "jax" in {_name(r) for r in PYPROJECT["project"]["dependencies"]}


def test_dependency_scan_reports_a_planted_mismatch(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "import os\nimport numpy as np\nfrom . import sibling\nfrom sklearn import svm\n"
        "def f():\n    import requests\n    from yaml.loader import Loader\n"
    )
    test = tmp_path / "test_mod.py"
    test.write_text("import pytest\nimport gaugejax\ntorch = pytest.importorskip('torch')\n")
    project = {
        "dependencies": ["numpy>=1", "scikit_learn", "lineax>=0.1"],
        "optional-dependencies": {"test": ["pytest"], "bench": ["torch"]},
    }
    mismatch = dependency_mismatch(project, {"library": [source], "tests": [test]})
    assert mismatch == {
        "undeclared": [f"requests ({source})", f"yaml ({source})"],
        "unused": ["lineax"],
    }
    # the library may not take what only an extra declares
    source.write_text("import torch\n")
    mismatch = dependency_mismatch(project, {"library": [source], "tests": [test]})
    assert mismatch["undeclared"] == [f"torch ({source})"]


def test_experiments_is_not_installed():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    found = PYPROJECT["tool"]["setuptools"]["packages"]["find"]

    def installed(package: str) -> bool:  # setuptools' rule: included, not excluded
        return any(fnmatch.fnmatchcase(package, p) for p in include) and not any(
            fnmatch.fnmatchcase(package, p) for p in found.get("exclude", [])
        )

    folders = {  # every folder of the repository holding Python files, as a package name
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in ROOT.rglob("*.py")
        if not any(part.startswith(".") or part == "__pycache__" for part in p.parts)
    }
    library = {f for f in folders if f.split(".")[0] == "gaugejax"}
    assert {"gaugejax", "gaugejax.models", "gaugejax.gauges"} <= library
    assert {f for f in folders if installed(f)} == library, folders
    # the installed distribution provides no top-level `experiments` (reinstall after editing
    # pyproject.toml) ...
    assert "gaugejax" not in importlib.metadata.packages_distributions().get("experiments", [])
    # ... and the tests import the repository's own (pytest's `pythonpath = ["."]`)
    spec = importlib.util.find_spec("experiments")
    assert pathlib.Path(spec.origin).resolve() == ROOT / "experiments" / "__init__.py"


def test_version_has_one_source():
    version = PYPROJECT["project"]["version"]
    assert importlib.metadata.version("gaugejax") == version  # else: reinstall
    assert gj.__version__ == version
    init = (ROOT / "gaugejax" / "__init__.py").read_text()
    assert version not in init, "gaugejax/__init__.py must read the version from the metadata"
    assert "importlib.metadata" in init


def _ci(*args: str) -> str:
    out = subprocess.run(["bash", str(ROOT / ".ci" / "run"), *args], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return out.stdout.rstrip("\n")


def test_ci_runs_ruff_then_its_test_command():
    command = _ci("--print-command")
    install, tests = command.split(" && python -m pytest ", 1)
    assert install.endswith('pip install -e ".[test]"') and ". .venv-test/bin/activate" in install
    lint = "ruff check . && ruff format --check ."
    assert _ci("--print-ci") == f"{install} && {lint} && python -m pytest {tests}"


# ------------------------------------------------------------------------------------------
# every repository file a docstring, a comment or a document cites exists

# a path under one of the repository's top folders (directories too), or a root document
_PATH = re.compile(r"(?<![\w./<>-])((?:gaugejax|experiments|tests|configs|\.ci)/[\w./-]*)")
_ROOT_DOC = re.compile(r"(?<![\w./<>-])([A-Z][A-Z0-9_]*\.md)\b")
# scanned documents: the README and the results' (CHANGELOG.md is history: old paths stay)
DOCUMENTS = ("README.md", "experiments/results/**/README.md")


def _prose(text: str, first_line: int = 1) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring-like string (a string standing alone as a
    statement: module, class, function and attribute docstrings) of Python source, and of the
    Python scripts it embeds (multi-line strings that parse, e.g. a subprocess test's child)."""
    out = [
        (first_line - 1 + tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    docstrings = set()
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docstrings.add(id(node.value))
            for i, line in enumerate(node.value.value.splitlines()):
                out.append((first_line - 1 + node.lineno + i, line))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "\n" in node.value
            and id(node) not in docstrings
        ):
            try:
                out += _prose(node.value, first_line - 1 + node.lineno)
            except (SyntaxError, tokenize.TokenError, ValueError):
                pass  # not a script
    return out


def missing_citations(root: pathlib.Path, python_dirs, documents) -> list[str]:
    """`file:line: cited` for every cited repository path that does not exist under `root`
    (nor, for documents, beside the citing file); a templated path (`configs/<name>/`) is
    checked up to its placeholder."""
    cited = [
        (p, line, text)
        for d in python_dirs
        for p in sorted((root / d).rglob("*.py"))
        for line, text in _prose(p.read_text())
    ]
    for pattern in documents:
        for p in sorted(root.glob(pattern)):
            cited += [(p, i, text) for i, text in enumerate(p.read_text().splitlines(), 1)]
    missing = []
    for path, line, text in cited:
        for match in [*_PATH.finditer(text), *_ROOT_DOC.finditer(text)]:
            name = match.group(1).rstrip(".")
            # a module cited by its path without the suffix (`experiments/linear_symmetry`)
            candidates = [name, f"{name}.py"]
            if not any((base / c).exists() for base in (root, path.parent) for c in candidates):
                missing.append(f"{path.relative_to(root)}:{line}: {name}")
    return sorted(set(missing))


def test_cited_repository_files_exist():
    missing = missing_citations(ROOT, ("gaugejax", "experiments", "tests"), DOCUMENTS)
    assert missing == [], "\n".join(missing)


def test_citation_scan_reports_planted_missing_files(tmp_path):
    (tmp_path / "gaugejax").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_real.py").write_text("")
    lines = [  # one string per line, so that this file itself embeds no script to scan
        '"""See NOTES.md and tests/test_real.py; writes `report.md` to runs/<name>/."""',
        "",
        "x = 1  # checked by tests/test_gone.py::test_x (README.md, Sec. 2)",
        'y = "configs/not/cited.toml"  # a value, not a citation',
        "class A:",
        "    z: int",
        '    """Field doc: experiments/results/old/."""',
        'CHILD = """import os',
        "# a child script's comment: see DESIGN.md",
        'os.getcwd()"""',
    ]
    (tmp_path / "gaugejax" / "mod.py").write_text("\n".join(lines) + "\n")
    (tmp_path / "README.md").write_text("Run `gaugejax/mod.py` (`gaugejax/<name>.py`).\n")
    missing = missing_citations(tmp_path, ("gaugejax", "tests"), ("README.md",))
    assert missing == [
        "gaugejax/mod.py:1: NOTES.md",
        "gaugejax/mod.py:3: tests/test_gone.py",
        "gaugejax/mod.py:7: experiments/results/old/",
        "gaugejax/mod.py:9: DESIGN.md",
    ]
