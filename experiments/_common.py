"""What every experiment shares around the library's claims and check runner (`gj.claim`,
`gj.run_checks`): the summary a run returns, config choices, the output files, the experiments'
check signature (`_training.TrainingRun` is the training experiments' scaffold)."""

import contextvars
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

import gaugejax as gj
from gaugejax import io


def experiment_summary(
    experiment: str, claims: list, figures, run_dir: Path, start: float, **extra
) -> dict:
    """What every experiment's `run` returns (and the CLI writes as `summary.json`): its claims
    with their pass count, its figures relative to `run_dir`, `extra` facts, and the wall time
    since `start` (a `time.perf_counter()` value)."""
    return {
        "experiment": experiment,
        "claims": claims,
        "num_pass": sum(c["verdict"] == "pass" for c in claims),
        "num_claims": len(claims),
        "figures": [str(Path(f).relative_to(run_dir)) for f in figures],
        **extra,
        "wall_time_s": time.perf_counter() - start,
    }


def write_outputs(run_dir: Path, results: dict, records: list[dict], plot, config):
    """The files a run ends with: `results.json`, `metrics.jsonl` (one line per record, written
    at once: a resumed run does not append them again) and the figures `plot(saved, fig_dir,
    config)` draws from the saved results (so they are what a reader of `results.json` would
    draw). Returns `(saved results, figure paths)`."""
    text = "".join(json.dumps(io.jsonable(r)) + "\n" for r in records)
    io.atomic_write_bytes(run_dir / "metrics.jsonl", text.encode())
    io.write_json(run_dir / "results.json", results)
    saved = io.read_json(run_dir / "results.json")
    import matplotlib.pyplot as plt

    with gj.PLOT_LOCK:  # pyplot's figure registry is global: one plot at a time
        opened = set(plt.get_fignums())
        try:
            figures = plot(saved, run_dir / "figures", config)
        except BaseException:
            # a plot that fails closes what it opened: the process's later plots (another
            # experiment, a resumed run) would otherwise find its figures in the registry
            for number in set(plt.get_fignums()) - opened:
                plt.close(number)
            raise
    return saved, figures


def run_checks(
    experiment: str,
    checks: Sequence[tuple[str, Callable]],
    config,
    setup,
    run_dir: Path,
    plot: Callable[[dict, Path, object], list[Path]],
    expensive_first: Sequence[str] = (),
) -> dict:
    """`gj.run_checks` of `check(config, key, setup) -> (rows, data)` for every check, on
    `config.workers` threads, restricted to `config.checks` (when not empty), each with the key
    it has in a full run (split from `config.seed`), resumable in `run_dir/checks/`; then
    `metrics.jsonl`, `results.json` and the figures `plot(results, fig_dir, config)` draws from
    `results.json`. Returns the experiment's summary."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    claims, results, records = gj.run_checks(
        [(name, functools.partial(_call, check, config, setup)) for name, check in checks],
        run_dir,
        key=jax.random.fold_in(jax.random.key(config.seed), 1),
        config=config,
        selected=config.checks,
        workers=config.workers,
        expensive_first=expensive_first,
        name=experiment,
        progress_line=BAR_POSITION.get(),
    )
    # written once, in `checks` order (the per-check files are the progress record)
    _, figures = write_outputs(run_dir, results, records, plot, config)
    return experiment_summary(experiment, claims, figures, run_dir, start)


def _call(check, config, setup, key):
    return check(config, key, setup)


# the line of an experiment's progress bar: reproduce gives each concurrent experiment its own
BAR_POSITION: contextvars.ContextVar[int] = contextvars.ContextVar("bar_position", default=0)
