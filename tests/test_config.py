"""Run configs: a frozen dataclass from defaults, TOML and `key=value` overrides, coerced to the
fields' types and range-checked, every refusal naming the key and the value received."""

import dataclasses
from typing import ClassVar

import pytest

import gaugejax as gj


@dataclasses.dataclass(frozen=True)
class _Config:
    seed: int = 0
    dim: int = 4
    rtol: float = 1e-8
    scales: tuple[float, ...] = (0.1, 0.05)
    shift: float = 0.0
    name: str = "moons"
    label: str | None = None
    NONNEGATIVE: ClassVar[tuple[str, ...]] = ("shift",)

    def __post_init__(self):
        gj.check_one_of("name", self.name, ("moons", "circles"))


def test_defaults_then_toml_then_overrides(tmp_path):
    assert gj.load_config(_Config) == _Config()
    path = tmp_path / "small.toml"
    path.write_text('dim = 6\nscales = [1, 0.5]\nname = "circles"\n')
    cfg = gj.load_config(_Config, path, ["rtol=1e-10", "label=run_a", "seed=3"])
    assert cfg == _Config(
        seed=3, dim=6, rtol=1e-10, scales=(1.0, 0.5), name="circles", label="run_a"
    )
    assert isinstance(cfg.scales[0], float)  # TOML's int 1 is the float field's 1.0
    assert gj.make_config(_Config, {"shift": 0, "label": None}).shift == 0.0  # >= 0 allowed
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, message",
    [
        ("dimension=3", r"unknown config key\(s\) \['dimension'\] .*valid keys are \['dim',"),
        ("dim=3.5", r"`dim` expects an int; received 3.5"),
        ("dim=0", r"`dim` must be an int >= 1; received 0"),
        ("seed=-1", r"`seed` must be an int >= 0; received -1"),
        ("rtol=1e-17", r"`rtol` is a solver tolerance: it must be in \[2.2e-16, 1\)"),
        ("scales=[0.1, -0.1]", r"`scales` must be a finite number > 0; received -0.1"),
        ("shift=-1e-3", r"`shift` must be a finite number >= 0; received -0.001"),
        ("scales=0.1", r"`scales` expects a list; received 0.1"),
        ('name="digits"', r"`name` must be one of \['moons', 'circles'\]; received 'digits'"),
        ("dim", r"an override must look like key=value; received 'dim'"),
    ],
)
def test_bad_values_are_refused_by_name(override, message):
    with pytest.raises(ValueError, match=message):
        gj.load_config(_Config, overrides=[override])


def test_unreadable_files_and_choices_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"dim = \xff\xfe\n")
    with pytest.raises(ValueError, match=r"config file .*bad.toml: cannot be read as TOML"):
        gj.load_config(_Config, bad)
    with pytest.raises(ValueError, match=r"^--config x.toml: cannot be read as TOML"):
        gj.load_config(_Config, tmp_path / "missing.toml", source="--config x.toml")
    with pytest.raises(ValueError, match=r"`cls` must be a dataclass"):
        gj.make_config(dict, {})
    gj.check_choices("arms", ["plain", "teleport"], ("plain", "teleport", "balance"))
    for chosen, empty in [([], False), (["plain", "plain"], False), (["nope"], True)]:
        with pytest.raises(ValueError, match=r"`arms` must name distinct entries of \["):
            gj.check_choices("arms", chosen, ("plain", "teleport"), empty=empty)
    with pytest.raises(ValueError, match=r"\(including 'plain'\); received \['teleport'\]"):
        gj.check_choices("arms", ["teleport"], ("plain", "teleport"), required=("plain",))
