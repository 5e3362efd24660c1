"""The README's "Your own model" examples run verbatim and print "holds"."""

import contextlib
import io
import pathlib
import re

import pytest


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    text = README.read_text()
    section = text.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_three_own_model_examples():
    assert len(_examples()) == 3


@pytest.mark.parametrize("index", [0, 1, 2], ids=["diffrax_node", "eqx_mlp", "eqx_mha"])
def test_readme_example_runs_and_holds(index):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_examples()[index], f"README example {index}", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("holds - "), lines
    if index == 1:
        assert lines[1].split()[0] == "True" and float(lines[1].split()[1]) < 1e-8
