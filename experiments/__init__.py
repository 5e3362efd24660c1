"""gaugejax experiments: each module has a frozen-dataclass `Config`, `PRESETS` (the embedded
`default` and `smoke` values, mirrored by `configs/<name>/*.toml`) and `run(config, run_dir)`."""

from . import node_symmetry, reproduce


EXPERIMENTS = {"node_symmetry": node_symmetry, "reproduce": reproduce}
