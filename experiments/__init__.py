"""gaugejax experiments: each module has a frozen-dataclass `Config`, `PRESETS` (the embedded
`default` and `smoke` values, mirrored by `configs/<name>/*.toml`) and `run(config, run_dir)`."""

from . import (
    attention_symmetry,
    benchmark_sweep,
    gauge_fixing,
    linear_symmetry,
    node_symmetry,
    orbit_cost,
    orbit_geometry,
    regularizers,
    reproduce,
    symmetry_census,
    teleportation,
)


EXPERIMENTS = {
    "node_symmetry": node_symmetry,
    "linear_symmetry": linear_symmetry,
    "attention_symmetry": attention_symmetry,
    "gauge_fixing": gauge_fixing,
    "orbit_geometry": orbit_geometry,
    "symmetry_census": symmetry_census,
    "regularizers": regularizers,
    "orbit_cost": orbit_cost,
    "teleportation": teleportation,
    "reproduce": reproduce,
    "benchmark_sweep": benchmark_sweep,
}
