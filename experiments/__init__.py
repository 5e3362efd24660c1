"""gaugejax experiments: each module has a frozen-dataclass `Config`, `PRESETS` (the embedded
`default` and `smoke` values, mirrored by `configs/<name>/*.toml`) and `run(config, run_dir)`."""

from . import benchmark_sweep, reproduce


# every experiment the CLI runs: the ones `reproduce` runs, then `reproduce` and the benchmark
EXPERIMENTS = {
    **reproduce.REPRODUCIBLE,
    "reproduce": reproduce,
    "benchmark_sweep": benchmark_sweep,
}
