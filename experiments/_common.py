"""What every experiment shares: claim rows, the config lock and output files, Markdown tables,
the threaded check runner and its figures (`_training.TrainingRun` is the training experiments'
scaffold)."""

import concurrent.futures
import contextvars
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from gaugejax import io


def claim(id_, text, equation, measured, ok, tolerance, detail="", *, aim: bool = False) -> dict:
    """One row of the report: what the paper claims, what we measured, and the verdict.

    `aim=True` marks a target beyond the paper (an issue's aim, e.g. "2x fewer evaluations"):
    not met, its verdict is "missed", reported with its measured value like any row, and it
    does not fail the run (a paper claim that does not hold is "FAIL" and does)."""
    return {
        "id": id_,
        "claim": text,
        "equation": equation,
        "measured": measured,
        "tolerance": tolerance,
        "verdict": "pass" if ok else ("missed" if aim else "FAIL"),
        "detail": detail,
    }


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


def check_one_of(name: str, value, valid) -> None:
    """`ValueError` naming the config key `name` unless `value` is one of `valid`."""
    if value not in valid:
        raise ValueError(f"`{name}` must be one of {list(valid)}; received {value!r}.")


def check_choices(name: str, chosen, valid, *, required=(), empty: bool = False) -> None:
    """`ValueError` naming the config key `name` unless `chosen` names distinct entries of
    `valid`, every one of `required` among them, and at least one unless `empty`."""
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


def lock_config(path: Path, experiment: str, config) -> None:
    """A run directory belongs to one config: the first run writes `config` to `path`; a later
    run (a resume) with another config is refused, as it would mix the two configs' numbers.

    **Raises:** `ValueError` naming the directory when `path` holds another config.
    """
    wanted = json.loads(json.dumps(io.jsonable(dataclasses.asdict(config))))
    if not path.exists():
        io.write_json(path, wanted)
    elif io.read_json(path) != wanted:
        raise ValueError(
            f"{path.parent} holds a run of another {experiment} config: resume it with its own "
            "config.json, or use a new run directory."
        )


def write_outputs(run_dir: Path, results: dict, records: list[dict], plot, config):
    """The files a run ends with: `results.json`, `metrics.jsonl` (one line per record, written
    at once: a resumed run does not append them again) and the figures `plot(saved, fig_dir,
    config)` draws from the saved results (so they are what a reader of `results.json` would
    draw). Returns `(saved results, figure paths)`."""
    text = "".join(json.dumps(io.jsonable(r)) + "\n" for r in records)
    io.atomic_write_bytes(run_dir / "metrics.jsonl", text.encode())
    io.write_json(run_dir / "results.json", results)
    saved = io.read_json(run_dir / "results.json")
    with PLOT_LOCK:
        figures = plot(saved, run_dir / "figures", config)
    return saved, figures


def in_band(value, target, band) -> bool:
    return bool(abs(value - target) <= band)


def below(id_, text, equation, measured, bound, detail="", *, ok=True, tolerance=None) -> dict:
    """A claim row that `measured` stays below `bound` (and `ok`, any further condition);
    `tolerance` is the row's description of the bound, `< bound` unless given."""
    ok = ok and measured < bound
    return claim(id_, text, equation, measured, ok, tolerance or f"< {bound:g}", detail)


def above(id_, text, equation, measured, bound, detail="", *, ok=True, tolerance=None) -> dict:
    """A claim row that `measured` exceeds `bound` (a negative control moves the output)."""
    ok = ok and measured > bound
    return claim(id_, text, equation, measured, ok, tolerance or f"> {bound:g}", detail)


def slope_claim(id_, text, equation, slope, target, band, detail="", *, ok=True) -> dict:
    """A claim row on a convergence order: `slope` (e.g. `gj.loglog_slope`) within `band` of
    `target`, and `ok` (any further condition of the claim)."""
    ok = ok and in_band(slope, target, band)
    return claim(id_, text, equation, slope, ok, f"slope {target:g} +- {band}", detail)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line per row (cells as `str`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def validate_checks(selected: Sequence[str], checks: Sequence[tuple[str, Callable]]) -> None:
    """`ValueError` naming the unknown entries of a config's `checks` and the valid names."""
    valid = [name for name, _ in checks]
    unknown = [name for name in selected if name not in valid]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown} in `checks`; valid checks are {valid}.")
    if len(set(selected)) != len(selected):
        raise ValueError(f"`checks` names a check twice; received {list(selected)}.")


def run_checks(
    experiment: str,
    checks: Sequence[tuple[str, Callable]],
    config,
    setup,
    run_dir: Path,
    plot: Callable[[dict, Path, object], list[Path]],
    expensive_first: Sequence[str] = (),
) -> dict:
    """Run `check(config, key, setup) -> (rows, data)` for every check and write the results.

    `config.checks` (when not empty) restricts the run to the named checks; each check keeps
    the key it has in a full run, so a subset reproduces the full run's numbers.

    Checks are independent and mostly XLA compilation, which is single-threaded: they run on
    `config.workers` threads, the names in `expensive_first` first. Each check has its own
    fixed key (split from `config.seed`), so results do not depend on the schedule; rows are
    reported in `checks` order. Writes `metrics.jsonl` (one record per check), `results.json`
    and the figures drawn from `results.json` by `plot(results, fig_dir, config)`.

    Resumable: each finished check is saved at once to `checks/<name>.json` (rows, data,
    seconds; atomically); a check whose file exists in `run_dir` is loaded instead of run, so
    a killed run continued in the same directory (`python -m experiments NAME --resume DIR`)
    runs only what was left and writes the same files (timings aside).
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1), len(checks))
    order = list(expensive_first)

    def priority(item):
        name = item[0][0]
        return order.index(name) if name in order else len(order)

    cache = run_dir / "checks"
    lock_config(cache / "config.json", experiment, config)  # saved checks belong to one config

    def one(item):
        (name, check), key = item
        saved = cache / f"{name}.json"
        if saved.exists():  # finished by an earlier, interrupted run in this directory
            done = io.read_json(saved)
            return name, done["rows"], done["data"], done["seconds"]
        t0 = time.perf_counter()
        rows, data = check(config, key, setup)
        elapsed = time.perf_counter() - t0
        io.write_json(saved, {"rows": rows, "data": data, "seconds": elapsed})
        return name, rows, data, elapsed

    claims, results, records = [], {}, []
    items = list(zip(checks, keys, strict=True))
    if config.checks:
        items = [item for item in items if item[0][0] in config.checks]
        checks = [c for c in checks if c[0] in config.checks]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers)
    done = {}
    try:
        futures = {pool.submit(one, item): item[0][0] for item in sorted(items, key=priority)}
        # the bar advances as checks finish (completion order: its ETA is from finished work)
        bar = tqdm(total=len(items), desc=experiment, position=BAR_POSITION.get(), leave=True)
        for future in concurrent.futures.as_completed(futures):
            done[futures[future]] = future.result()
            bar.set_postfix_str(futures[future], refresh=False)
            bar.update(1)
        bar.close()
        for name, _ in checks:  # rows reported in `checks` order
            _, rows, data, elapsed = done[name]
            claims += rows
            results[name] = data
            records.append(
                {"check": name, "seconds": elapsed, **{r["id"]: r["measured"] for r in rows}}
            )
    except BaseException:  # Ctrl-C or a failed check: drop the checks not started yet
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    # written once, in `checks` order (the per-check files are the progress record)
    _, figures = write_outputs(run_dir, results, records, plot, config)
    return experiment_summary(experiment, claims, figures, run_dir, start)


# the line of an experiment's progress bar: reproduce gives each concurrent experiment its own
BAR_POSITION: contextvars.ContextVar[int] = contextvars.ContextVar("bar_position", default=0)
PLOT_LOCK = threading.Lock()  # pyplot's figure registry is global: one plot at a time


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (figures are files). Hold
    `PLOT_LOCK` while drawing: experiments may run concurrently (`reproduce` workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_histogram(
    ax, series, *, xlabel: str, title: str, tolerance: float | None = None, bins=None
):
    """Histograms of log10 of several per-sample deviation series on common bins."""
    logs = [np.log10(np.maximum(np.asarray(v, dtype=float), 1e-17)) for _, v in series]
    if bins is None:
        lo = min(float(np.nanmin(v)) for v in logs) - 0.5
        hi = max(float(np.nanmax(v)) for v in logs) + 0.5
        bins = np.linspace(lo, hi, 60)
    for (label, _), v in zip(series, logs, strict=True):
        ax.hist(v, bins=bins, alpha=0.6, label=label)
    if tolerance is not None:
        ax.axvline(np.log10(tolerance), color="k", ls=":", label=f"tolerance {tolerance:g}")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, never 2.5 samples
    ax.set_title(title)
    ax.legend(fontsize=7)


def histogram_figure(path: Path, series, *, xlabel: str, title: str, tolerance=None) -> Path:
    """One `log_histogram` figure written to `path` (call with `PLOT_LOCK` held)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    log_histogram(ax, series, xlabel=xlabel, title=title, tolerance=tolerance)
    path = io.save_figure(fig, path)
    plt.close(fig)
    return path


def small_multiples(axes, panels, *, xlabel: str) -> None:
    """One `log_histogram` per axis, `panels` = [(title, series), ...], on a shared x range
    (one quantity per axis, instead of many series overlaid on one)."""
    logs = [
        np.log10(np.maximum(np.asarray(v, dtype=float), 1e-17))
        for _, series in panels
        for _, v in series
    ]
    lo = min(float(np.nanmin(v)) for v in logs) - 0.5
    hi = max(float(np.nanmax(v)) for v in logs) + 0.5
    for ax, (title, series) in zip(axes, panels, strict=True):
        log_histogram(ax, series, xlabel=xlabel, title=title, bins=np.linspace(lo, hi, 50))


def small_multiples_figure(path: Path, panels, *, xlabel: str, title: str) -> Path:
    """`small_multiples` in one row, written to `path` (call with `PLOT_LOCK` held)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharex=True)
    small_multiples(np.atleast_1d(axes), panels, xlabel=xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    path = io.save_figure(fig, path)
    plt.close(fig)
    return path


def loglog_figure(path: Path, panels, *, title: str | None = None, ticks=False) -> Path:
    """A row of log-log panels written to `path` (call with `PLOT_LOCK` held): `panels` =
    `[(title, xlabel, ylabel, [(label, xs, ys), ...]), ...]`, the series of a panel drawn
    "o-", "s--", "^:" (values floored at 1e-17); with `ticks`, the x values run are the ticks."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), squeeze=False)
    for ax, (name, xlabel, ylabel, series) in zip(axes[0], panels, strict=True):
        for (label, xs, ys), style in zip(series, ("o-", "s--", "^:"), strict=False):
            ax.loglog(xs, np.maximum(np.asarray(ys, dtype=float), 1e-17), style, label=label)
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        plain_log_ticks(ax)
        if ticks:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = io.save_figure(fig, path)
    plt.close(fig)
    return path


def plain_log_ticks(ax) -> None:
    """Log axes without minor tick labels (they collide, e.g. '3x10^1 4x10^1')."""
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
