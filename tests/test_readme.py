"""The README as documentation that cannot rot: its python examples run verbatim and print what
it says, its test command is `.ci/run`'s own, its commands work in a fresh clone, its API
section names every public `gj.*` name (and only real ones), and it stays short."""

import contextlib
import io
import pathlib
import re
import subprocess
import types

import pytest

import gaugejax as gj


ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _examples(title: str = "Your own model") -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section(title), flags=re.S)


def _run(source: str, name: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, name, "exec"), {})
    return out.getvalue().splitlines()


def test_readme_has_five_own_model_examples():
    assert len(_examples()) == 5


@pytest.mark.parametrize("index", [0, 1, 2], ids=["diffrax_node", "eqx_mlp", "eqx_mha"])
def test_readme_example_runs_and_holds(index):
    lines = _run(_examples()[index], f"README example {index}")
    assert lines[0].startswith("holds - "), lines
    if index == 1:
        # balanced to its tol 1e-10 on the factors: the largest charge measured 3.25e-11
        assert lines[1].split()[0] == "True" and float(lines[1].split()[1]) < 3e-10
    if index == 2:  # the user's own attention through its AttentionSpec
        assert lines[1] == "holds", lines


def test_readme_layernorm_and_alignment_example():
    """The fused LayerNorm decoder and a gauge-moved one compute the LayerNorm decoder's
    function (measured 6.6e-15, 5.0e-15); aligning two seeds lowers their distance (28.7 to
    15.5); a model and its aligned copy have one canonical form (squared distance < 1e-20)."""
    deviations, aligned, canonical = _run(_examples()[3], "README example 3")
    assert canonical == "True"  # b and its aligned copy: one orbit, one canonical form
    assert all(float(v) < 5e-14 for v in deviations.split()), deviations
    before, after = (float(v) for v in aligned.split(" -> "))
    assert before == pytest.approx(28.7, abs=0.1) and after == pytest.approx(15.5, abs=0.1)


def test_readme_huggingface_example():
    """Where the `hf` extra is installed: Hugging Face's LLaMA loads the gauge-moved export and
    computes the imported model's logits (float32: measured 3.4e-7)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    (printed,) = _run(_examples()[4], "README example 4")
    assert float(printed) < 3e-6


def test_first_result_prints_the_verdict_the_readme_shows():
    (example,) = _examples("First result")
    (shown,) = re.findall(r"```text\n(.*?)\n```", _section("First result"), flags=re.S)
    (printed,) = _run(example, "README first result")
    assert printed.startswith("holds - ") and shown.startswith("holds - ")
    # the numbers shown are the ones printed, to the solver's reproducibility (2 digits)
    number = r"\d\.\d+e[+-]\d+"
    for got, want in zip(re.findall(number, printed), re.findall(number, shown), strict=True):
        assert float(got) == pytest.approx(float(want), rel=0.05), (printed, shown)


def _commands() -> list[str]:
    """Every line of the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_quotes_ci_run_test_command_exactly():
    ci = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-command"],
                        capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    quoted = [line for line in _commands() if "pytest" in line]
    assert quoted == [ci]


def test_readme_commands_create_the_environment_they_activate():
    """A fresh clone has no `.venv*`: each command line that activates one creates it first (the
    first-look command once sourced `.venv` before the command that creates it)."""
    commands = _commands()
    assert any(line.endswith("python -m experiments reproduce") for line in commands)
    assert any("configs/reproduce/smoke.toml" in line for line in commands)
    for line in commands:
        for venv in re.findall(r"\. (\S+)/bin/activate", line):
            created = line.find(f"python3 -m venv {venv} ")
            assert 0 <= created < line.find(f". {venv}/bin/activate"), line
    for line in commands:
        for path in re.findall(r"--config (\S+)", line):
            assert (ROOT / path).is_file(), path


def _api_names() -> dict[str, list[str]]:
    """The first column of the API table: row -> the `gj` names it documents (each backticked
    span's leading dotted name, e.g. `orbits.orbit_tangent` from `orbits.orbit_tangent(...)`)."""
    rows = {}
    for line in _section("API").splitlines():
        if line.startswith("| `"):
            first = line.split(" | ")[0]
            spans = re.findall(r"`([^`]*)`", first)
            rows[first] = [m[0] for s in spans if (m := re.match(r"[A-Za-z_][\w.]*", s))]
    return rows


def test_readme_api_documents_every_public_name_and_only_real_ones():
    documented = set()
    for row, names in _api_names().items():
        for name in names:
            obj = gj
            for part in name.split("."):
                assert hasattr(obj, part), f"{name} (README API row {row!r}) is not gj.{name}"
                obj = getattr(obj, part)
            documented.add(name.split(".")[0])
    public = {
        n
        for n in dir(gj)
        if not n.startswith("_") and not isinstance(getattr(gj, n), types.ModuleType)
    }
    assert public - documented == set(), "public names the README's API does not document"


def test_readme_is_short_and_in_order():
    text = README.read_text()
    assert len(text.splitlines()) <= 350
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == [
        "Install",
        "First result",
        "Your own model",
        "Concepts",
        "API",
        "Experiments",
        "Performance",
        "Where our numerics disagree with the paper",
        "Contributing",
    ]
