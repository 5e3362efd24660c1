"""The experiments' presets: `configs/<name>/<preset>.toml` (configs themselves are frozen
dataclasses loaded and validated by `gj.load_config`)."""

import tomllib
from pathlib import Path
from typing import Any


# the presets' one home: configs/<experiment>/<preset>.toml at the repository root
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def presets(name: str) -> dict[str, dict[str, Any]]:
    """Preset name -> the values of `configs/<name>/<preset>.toml`, for the experiment `name`
    (`default.toml` holds the embedded defaults, as a test checks).

    **Raises:** `ValueError` naming the folder when it holds no TOML file.
    """
    files = sorted((CONFIGS / name).glob("*.toml"))
    if not files:
        raise ValueError(f"no presets for `{name}`: {CONFIGS / name} holds no *.toml file.")
    return {f.stem: tomllib.loads(f.read_text()) for f in files}
