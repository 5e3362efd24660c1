"""Experiment configs: frozen dataclasses, TOML presets and `key=value` overrides, validated."""

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
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


def make_config(cls: type, values: dict[str, Any]) -> Any:
    """Instance of the dataclass `cls` from `values`, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} for {cls.__module__}.{cls.__name__}; "
            f"valid keys are {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def load_config(
    cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Any:
    """The config `cls` from its embedded defaults, then the TOML file `path`, then overrides.

    **Raises:** `ValueError` for an unknown key (listing the valid ones), a wrong type, or an
    override that is not `key=value`; `FileNotFoundError` for a missing file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            values.update(tomllib.load(f))
    for text in overrides:
        key, value = _parse_override(text)
        values[key] = value
    return make_config(cls, values)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
