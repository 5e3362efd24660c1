"""Run configs: a frozen dataclass from its defaults, a TOML file and `key=value` overrides, typed
and validated before anything runs (no directory made, nothing compiled).

A run's numbers are only as good as its config: a misspelt key silently falling back to a
default, or a string where a number belongs, gives a run of another config than the one asked
for. So every key must be a field, every value must have the field's type (`int`, `float`,
`bool`, `str`, a tuple of them, or `None` where the annotation allows it), and every number
must be in range by the conventions below (`_check_range`).
"""

import dataclasses
import math
import os
import tomllib
import types
import typing
from typing import Any


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        annotation, origin = options[0], typing.get_origin(options[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key `{name}` expects a list; received {value!r}.")
        (item, *_) = typing.get_args(annotation) or (Any,)
        return tuple(_coerce(name, v, item) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key `{name}` expects true/false; received {value!r}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key `{name}` expects an int; received {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key `{name}` expects a number; received {value!r}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"config key `{name}` expects a string; received {value!r}.")
        return value
    return value


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"an override must look like key=value; received {text!r}.")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip(), value


# the one relative tolerance no float64 solve can go below
_EPS64 = 2.0**-52


def _check_range(name: str, value: Any, annotation: Any, nonnegative: bool) -> None:
    """Numbers of a config are sizes, counts, tolerances or scales: ints >= 1 (`seed` >= 0),
    floats finite and > 0 (ints and floats >= 0 for the keys a config lists in `NONNEGATIVE`),
    and solver tolerances (keys ending in `rtol`) in [eps, 1)."""
    if isinstance(value, tuple):
        (item, *_) = typing.get_args(annotation) or (Any,)
        for v in value:
            _check_range(name, v, item, nonnegative)
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, int) and not isinstance(value, bool) and annotation is int:
        low = 0 if name == "seed" or nonnegative else 1
        if value < low:
            raise ValueError(f"config key `{name}` must be an int >= {low}; received {value!r}.")
        return
    if name.endswith("rtol") and not _EPS64 <= value < 1:
        raise ValueError(
            f"config key `{name}` is a solver tolerance: it must be in [{_EPS64:.1e}, 1); "
            f"received {value!r}."
        )
    ok = value >= 0 if nonnegative else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if nonnegative else "> 0"
        raise ValueError(
            f"config key `{name}` must be a finite number {bound}; received {value!r}."
        )


def make_config(cls: type, values: Any) -> Any:
    """An instance of the dataclass `cls` from `values` (the other fields at their defaults).

    Values are coerced to the fields' annotations (an int where a float belongs, a list where
    a tuple does) and checked by these conventions: ints >= 1 (`seed` >= 0), floats finite and
    > 0, ints and floats >= 0 for the fields `cls.NONNEGATIVE` names (a class attribute), and
    keys ending in `rtol` (solver tolerances) in [2^-52, 1). The class's own `__post_init__`
    may check more (e.g. with `check_one_of`, `check_choices`).

    **Raises:** `ValueError` for `values` that is not a dict (e.g. a `config.json` holding
    `null`), an unknown key (listing the valid ones), a wrong type or a value out of range,
    naming the key and the value received.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"`cls` must be a dataclass; received {cls!r}.")
    if not isinstance(values, dict):
        raise ValueError(
            f"config values must be a mapping of key to value; received {values!r} "
            f"({type(values).__name__})."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} for {cls.__module__}.{cls.__name__}; "
            f"valid keys are {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    config = cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    nonnegative = getattr(cls, "NONNEGATIVE", ())
    for f in dataclasses.fields(cls):
        _check_range(f.name, getattr(config, f.name), hints[f.name], f.name in nonnegative)
    return config


def load_config(
    cls: type,
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    source: str | None = None,
) -> Any:
    """The config `cls` (a dataclass) from its defaults, then the TOML file `path`, then the
    `overrides` (`"key=value"`, the value in TOML: `dim=6`, `'checks=["a", "b"]'`, or a bare
    string), checked by `make_config`. `source` names the file in errors (default `config
    file <path>`; a command line names its option, e.g. `--config <path>`).

    **Raises:** `ValueError` for an unknown key (listing the valid ones), a wrong type, a value
    out of range, an override that is not `key=value`, or a config file that cannot be read
    (missing, a directory, unreadable, not UTF-8 or not TOML), naming the file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            detail = f"{type(e).__name__}: {e}"
            source = source or f"config file {path}"
            raise ValueError(f"{source}: cannot be read as TOML ({detail})") from None
    for text in overrides:
        key, value = _parse_override(text)
        values[key] = value
    return make_config(cls, values)


def check_one_of(name: str, value: Any, valid: Any) -> None:
    """Refuse a config value that is not one of `valid`.

    **Raises:** `ValueError` naming the config key `name`, the valid values and `value`.
    """
    if value not in valid:
        raise ValueError(f"`{name}` must be one of {list(valid)}; received {value!r}.")


def check_choices(
    name: str, chosen: Any, valid: Any, *, required: Any = (), empty: bool = False
) -> None:
    """Refuse a config list unless it names distinct entries of `valid`, every one of
    `required` among them, and at least one unless `empty`.

    **Raises:** `ValueError` naming the config key `name`, the valid entries and `chosen`.
    """
    chosen = list(chosen)
    if (
        (not chosen and not empty)
        or len(set(chosen)) != len(chosen)
        or not set(chosen) <= set(valid)
        or not set(required) <= set(chosen)
    ):
        need = f" (including {', '.join(map(repr, required))})" if required else ""
        raise ValueError(
            f"`{name}` must name distinct entries of {list(valid)}{need}; received {chosen}."
        )
