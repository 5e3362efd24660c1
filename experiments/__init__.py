"""gaugejax experiments: each module has a frozen-dataclass `Config` (its defaults are the
`default` preset) and `run(config, run_dir)`; its presets are `configs/<name>/*.toml`."""

from . import benchmark_sweep, reproduce


# every experiment the CLI runs: the ones `reproduce` runs, then `reproduce` and the benchmark
EXPERIMENTS = {
    **reproduce.REPRODUCIBLE,
    "reproduce": reproduce,
    "benchmark_sweep": benchmark_sweep,
}
