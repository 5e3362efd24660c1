"""Run every experiment's checks at one preset and write `report.md` with measured numbers."""

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from gaugejax import (
    claims_table,
    format_measured,
    io,
    make_config,
    use_compilation_cache,
    use_fast_compile,
    use_tracing_gc,
    validate_checks,
)

from . import (
    alignment,
    attention_symmetry,
    few_step_gauges,
    gauge_fixing,
    linear_symmetry,
    node_symmetry,
    orbit_cost,
    orbit_geometry,
    regularizers,
    symmetry_census,
    teleportation,
)
from ._common import BAR_POSITION
from ._config import presets
from ._cores import child_cores, set_cores, unpin


# the experiments `reproduce` can run, in report order (the benchmark is run on its own)
REPRODUCIBLE = {
    "node_symmetry": node_symmetry,
    "linear_symmetry": linear_symmetry,
    "attention_symmetry": attention_symmetry,
    "gauge_fixing": gauge_fixing,
    "orbit_geometry": orbit_geometry,
    "symmetry_census": symmetry_census,
    "regularizers": regularizers,
    "orbit_cost": orbit_cost,
    "teleportation": teleportation,
    "alignment": alignment,
    "few_step_gauges": few_step_gauges,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `reproduce`: which preset each experiment runs at, which experiments, and
    optionally which checks (`"experiment.check"` entries: the experiments named there run only
    those checks, the others run every check; the report lists every check left out)."""

    preset: str = "default"
    experiments: tuple[str, ...] = tuple(REPRODUCIBLE)  # all of them, in report order
    checks: tuple[str, ...] = ()
    # "experiment=preset" entries: those experiments run at their own preset instead
    presets: tuple[str, ...] = ()
    # experiments run concurrently in this many processes (1: one after another in this
    # process, so each experiment's wall time in the report is its own). 2: the training
    # experiments run one compiled program at a time on one core, so a second experiment fills
    # the other core; processes, not threads, so that one's tracing does not wait for the
    # other's on the interpreter lock (measured, node_symmetry beside gauge_fixing on 2 cores:
    # 92.6 s in two threads, 81.6 s in two processes)
    workers: int = 2

    def __post_init__(self):
        if isinstance(self.workers, bool) or self.workers < 1:
            raise ValueError(f"`workers` must be an int >= 1; received {self.workers!r}.")
        self.experiment_configs()  # validates every part before a run directory exists

    def experiment_configs(self) -> dict:
        """`{experiment: its Config}` at `preset`, restricted to the selected checks.

        **Raises:** `ValueError` for an unknown experiment or check, or a preset an experiment
        does not have (naming the ones it has).
        """
        selection = self.selection()
        names = [e.partition("=")[0] for e in self.presets]
        if (
            not all("=" in e for e in self.presets)
            or sorted(set(names)) != sorted(names)
            or (not set(names) <= set(self.experiments))
        ):
            raise ValueError(
                "`presets` entries must look like 'experiment=preset', one per experiment of "
                f"`experiments`; received {list(self.presets)}."
            )
        configs = {}
        for name in self.experiments:
            found, preset = presets(name), self.preset_of(name)
            if preset not in found:
                raise ValueError(
                    f"`preset` must be one of {sorted(found)} for {name}; received {preset!r}."
                )
            values = dict(found[preset])
            if name in selection:
                values["checks"] = list(selection[name])
            configs[name] = make_config(REPRODUCIBLE[name].Config, values)
        return configs

    def preset_of(self, name: str) -> str:
        """The preset experiment `name` runs at: its `presets` entry, else `preset`."""
        return dict(e.partition("=")[::2] for e in self.presets).get(name, self.preset)

    def selection(self) -> dict[str, tuple[str, ...]]:
        """`{experiment: checks}` for the experiments that `checks` restricts."""
        unknown = [e for e in self.experiments if e not in REPRODUCIBLE]
        if unknown:
            valid = list(REPRODUCIBLE)
            raise ValueError(f"unknown experiment(s) {unknown} in `experiments`; valid: {valid}.")
        out: dict[str, tuple[str, ...]] = {}
        for entry in self.checks:
            name, _, check = entry.partition(".")
            if name not in self.experiments or not hasattr(REPRODUCIBLE[name], "CHECKS"):
                with_checks = [e for e in self.experiments if hasattr(REPRODUCIBLE[e], "CHECKS")]
                raise ValueError(
                    f"`checks` entries must look like 'experiment.check' with an experiment of "
                    f"`experiments` that has checks ({with_checks}); received {entry!r}."
                )
            out[name] = out.get(name, ()) + (check,)
        for name, chosen in out.items():
            validate_checks(chosen, REPRODUCIBLE[name].CHECKS)
        return out


# with several workers, these start first, longest first (measured at the default preset, each
# in its own process on one core, the main job on the 2-core machine, 2026-12-06 at 3c8f995:
# 251, 135, 137 (124 optimised), 68, 62, 62 s; the others 17 to 41 s): a short one ends last
EXPENSIVE_FIRST = ("regularizers", "symmetry_census", "orbit_cost", "gauge_fixing",
                   "linear_symmetry", "few_step_gauges")  # fmt: skip


# (evidence row id, what the numerics say), in the paper's order; the README says the same
DISAGREEMENTS = [
    (
        "eq20_verdict",
        "**Eq. 20** (time reparametrisation): the printed `F + F eps0 + d_t F eps0` is not "
        "dimensionally consistent; derivation and numerics give `F + (d_t eps0) F + eps0 d_t F` "
        "(= `F + d/dt(eps0 F)`): field-gap slopes 2 (derived) against 1 (printed).",
    ),
    (
        "eq23_verdict",
        "**Eq. 23, second case**: for `t1 < t2` the printed reverse-ordered exponential of `+w` "
        "does not invert the forward Wilson line (O(1) miss); that of `-w` (the propagator, as "
        "Eq. 22 writes `W(-w)`) does.",
    ),
    (
        "eq27",
        "**Eq. 27's sign**: with Eq. 24's convention, `G = 1 + eps w`, `c = eps b` is the "
        "reparametrisation `t = s - eps(s)` (field gap O(eps^2)), not `t = s + eps(s)`.",
    ),
    (
        "thm31",
        "**Theorem 3.1 needs det G_n > 0**: a continuous `G(t)` with `G(0) = 1` stays in "
        "GL+(d), so a discrete gauge with a negative determinant has no lift (`lift` refuses it).",
    ),
    (
        "eq36_verdict",
        "**Eq. 36** as printed (`A B = alpha I`) does not leave Eq. 35 invariant for general A; "
        "the scores need `A B^T = alpha I`.",
    ),
    (
        "footnote12_invariance",
        "**Eq. 45's covariant derivative** is `d/dt - w` for Eq. 25 (`c = 0`): `(d/dt - w) b` "
        "transforms as `G^-1 (d/dt - w) b`, so footnote 12's rotation-invariant Higgs term is "
        "`int |(d/dt - w) b|^2`; Eq. 45's `(d/dt + w) b` is not invariant even under rotations.",
    ),
    (
        "jvp_through_solve",
        "**Method, not the paper**: first-order responses of neural ODEs are computed from the "
        "forward sensitivity system under error control; a jvp through an adaptive "
        "`diffeqsolve` leaves the tangent without error control.",
    ),
]


def _left_out(config: Config) -> list[str]:
    selection = config.selection()
    out = []
    for name in config.experiments:
        module = REPRODUCIBLE[name]
        if not hasattr(module, "CHECKS"):
            continue
        # the selection, else the preset's own choice (e.g. the census leaves `scale` out)
        chosen = (
            selection.get(name)
            or make_config(module.Config, presets(name)[config.preset_of(name)]).checks
        )
        out += [f"{name}.{check}" for check, _ in module.CHECKS if chosen and check not in chosen]
    return out


def write_report(path: Path, claims_by_exp: dict, env: dict, config: Config, wall: dict) -> Path:
    rows = [c for claims in claims_by_exp.values() for c in claims["claims"]]
    left_out = _left_out(config)
    passed = sum(r["verdict"] == "pass" for r in rows)
    missed = [r["id"] for r in rows if r["verdict"] == "missed"]
    lines = [
        "# gaugejax reproduction report",
        "",
        "Hashimoto, Hirono & Sannai, *Unification of Symmetries Inside Neural Networks* "
        "(arXiv 2402.02362), checked numerically.",
        "",
        f"- date (UTC): {env['date_utc']}",
        f"- preset: `{config.preset}` ({', '.join(config.presets) or 'every experiment'}); "
        f"experiments: {', '.join(config.experiments)}"
        + (f" ({config.workers} at a time: wall times overlap)" if config.workers > 1 else ""),
        f"- backend: {env['backend']} ({', '.join(env['devices'])}); x64: {env['x64']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        f"- result: **{passed} of {len(rows)} claims pass**"
        + (
            f"; {len(missed)} aims beyond the paper missed (measured values in their rows, "
            f"not failures): {', '.join(f'`{m}`' for m in missed)}"
            if missed
            else ""
        ),
    ]
    if left_out:
        lines.append(
            f"- checks left out at this preset ({len(left_out)}; run without `checks` for "
            "all): " + ", ".join(f"`{c}`" for c in left_out)
        )
    lines.append("")
    for name, summary in claims_by_exp.items():
        lines += [f"## {name} ({wall[name]:.0f} s)", "", *claims_table(summary["claims"]), ""]
        for fig in summary["figures"]:
            lines.append(f"![{Path(fig).stem}]({name}/{fig})")
        lines.append("")
        table = path.parent / name / "census.md"  # symmetry_census's table, as it wrote it
        if table.exists():
            lines += [table.read_text().rstrip(), ""]
    by_id = {r["id"]: r for r in rows}
    lines += ["## Where our numerics disagree with the paper as printed", ""]
    for row_id, text in DISAGREEMENTS:
        row = by_id.get(row_id)
        evidence = (
            f"`{row_id}` row: measured {format_measured(row['measured'])} ({row['tolerance']}), "
            f"{row['verdict']}"
            if row is not None
            else f"`{row_id}` row: not run at this preset"
        )
        lines.append(f"- {text} Evidence: {evidence}.")
    lines.append("")
    return io.atomic_write_bytes(path, "\n".join(lines).encode())


# children start from a fresh interpreter: JAX's threads make forking this process unsafe
SPAWN = multiprocessing.get_context("spawn")


def _jax_settings() -> dict:
    """What a child process must set as this one has it: float64, the compilation cache and
    the CPU device count (`--cpu-devices`; the thread pool's size `NPROC` is inherited)."""
    return {
        "x64": jax.config.jax_enable_x64,
        "cache": jax.config.jax_compilation_cache_dir,
        "cpu_devices": jax.config.jax_num_cpu_devices,
    }


def _run_and_save(name: str, config: Any, sub_dir: Path) -> dict:
    # `FAST_COMPILE` in this process for this run: JAX's switch (XLA's flags: `_run_in_child`)
    before = jax.config.read("jax_disable_most_optimizations")
    fast = before or getattr(REPRODUCIBLE[name], "FAST_COMPILE", False)
    jax.config.update("jax_disable_most_optimizations", fast)
    try:
        summary = REPRODUCIBLE[name].run(config, sub_dir)
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
    io.write_json(sub_dir / "summary.json", summary)
    return summary


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run_in_child(
    name: str, config: Any, sub_dir: Path, slot: int, cores: set[int] | None, settings: dict
) -> None:
    """A child process's whole life: one experiment, its summary written to `sub_dir`, on the
    cores `cores` when given (each child its own share: see `child_cores`). It
    stops as the CLI does on SIGTERM, which the parent sends once when it is interrupted (a
    Ctrl-C reaches the parent and its children alike: the children ignore it, so that the one
    stop request they get arrives while their experiment runs, not during its clean-up)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    if cores is not None:  # before XLA starts its threads (they inherit it); and every thread
        # started on import (e.g. BLAS's); the parent unpins the last ones (`unpin`)
        set_cores("self", cores)
    jax.config.update("jax_enable_x64", settings["x64"])
    jax.config.update("jax_num_cpu_devices", settings["cpu_devices"])
    use_tracing_gc()  # as the CLI runs it alone
    if getattr(REPRODUCIBLE[name], "FAST_COMPILE", False):
        use_fast_compile()
    if settings["cache"]:
        use_compilation_cache(settings["cache"])
    BAR_POSITION.set(slot)
    # bars of one process need only a thread lock; tqdm's default adds a process-shared
    # semaphore, which an interrupted child (it exits at once) would leave behind
    tqdm.set_lock(threading.RLock())
    try:
        _run_and_save(name, config, sub_dir)
    except KeyboardInterrupt:
        # exit now, not after the checks still running in the experiment's worker threads
        # (the interpreter would join them); what finished is on disk, atomically
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)


# a child's exit code when it stopped on request (the CLI's code for an interrupted run)
INTERRUPTED = 130


def _run_in_children(order, workers: int, start, finished, run_dir: Path) -> dict:
    """Run the experiments `order` in at most `workers` child processes at a time
    (`start(name, slot)` starts one or returns a kept result; `finished(name, summary, wall)`
    records one): `{name: (summary, wall time)}`. A child that fails stops the others and
    raises; an interruption of this process (Ctrl-C, or SIGTERM through the CLI) is passed on
    to the running children, which stop as the CLI does, and is raised once they have."""
    pending, running, done = list(order), {}, {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                name = pending.pop(0)
                slot = min(set(range(workers)) - {s for _, s, _ in running.values()})
                result = start(name, slot)
                if isinstance(result, tuple):
                    done[name] = result
                else:
                    running[name] = (result, slot, time.perf_counter())
            if not running:
                continue
            multiprocessing.connection.wait([c.sentinel for c, _, _ in running.values()])
            for name in [n for n, (c, _, _) in running.items() if not c.is_alive()]:
                child, _, began = running.pop(name)
                child.join()
                if child.exitcode == INTERRUPTED:  # stopped by a signal of its own
                    raise KeyboardInterrupt(f"{name} was stopped")
                if child.exitcode != 0:
                    raise RuntimeError(
                        f"reproduce: {name} failed in its process (exit code {child.exitcode}; "
                        f"its error is printed above); its files are in {run_dir / name}"
                    )
                summary = io.read_json(run_dir / name / "summary.json")
                done[name] = finished(name, summary, time.perf_counter() - began)
                if not pending:  # a core is free for good: the children left may use it
                    for child, _, _ in running.values():
                        unpin(child.pid)
    except BaseException:
        for child, _, _ in running.values():
            if child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        for child, _, _ in running.values():
            child.join()
        raise
    return done


def run(config: Config, run_dir: Path) -> dict:
    """Run each experiment at `config.preset` in `run_dir/<name>/`; write `report.md`."""
    run_dir = Path(run_dir)
    env = io.env_info()
    configs = config.experiment_configs()

    total = len(config.experiments)
    number = {name: i + 1 for i, name in enumerate(config.experiments)}

    def say(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def one(name: str, slot: int | None) -> tuple[dict, float] | multiprocessing.Process:
        """Run `name`: in this process when `slot` is None (its summary and wall time), else in
        a child process drawing its bar on line `slot` (the started child). A summary kept from
        an interrupted run is returned as it is."""
        sub_dir = run_dir / name
        sub_dir.mkdir(parents=True, exist_ok=True)
        # a resumed run: the same config or nothing (the first run writes it)
        io.lock_config(sub_dir / "config.json", configs[name], name)
        if (sub_dir / "summary.json").exists():  # finished before the interruption
            summary = io.read_json(sub_dir / "summary.json")
            say(f"[{number[name]}/{total}] {name}: kept from the interrupted run")
            return summary, float(summary.get("wall_time_s", 0.0))
        checks = getattr(configs[name], "checks", ()) or [
            c for c, _ in getattr(REPRODUCIBLE[name], "CHECKS", [])
        ]
        what = f"{len(checks)} checks" if checks else "training runs"
        say(f"[{number[name]}/{total}] {name}: {what}")
        if slot is not None:
            args = (name, configs[name], sub_dir, slot, cores[slot], _jax_settings())
            child = SPAWN.Process(target=_run_in_child, args=args, name=f"reproduce {name}")
            child.start()
            return child
        start = time.perf_counter()
        summary = _run_and_save(name, configs[name], sub_dir)
        return finished(name, summary, time.perf_counter() - start)

    def finished(name: str, summary: dict, wall: float) -> tuple[dict, float]:
        say(
            f"[{number[name]}/{total}] {name}: {summary['num_pass']}/{summary['num_claims']} "
            f"claims pass ({wall:.0f} s)"
        )
        return summary, wall

    cores = child_cores(config.workers)
    # with several workers the long ones start first; the report keeps `experiments` order
    rank = {name: i for i, name in enumerate(EXPENSIVE_FIRST)}
    order = sorted(config.experiments, key=lambda n: rank.get(n, len(rank)))
    if min(config.workers, len(order)) == 1:
        done = {name: one(name, None) for name in order}
    else:
        done = _run_in_children(order, config.workers, one, finished, run_dir)
    results = {name: done[name][0] for name in config.experiments}
    wall = {name: done[name][1] for name in config.experiments}
    report = write_report(run_dir / "report.md", results, env, config, wall)
    claims = [c for s in results.values() for c in s["claims"]]
    return {
        "experiment": "reproduce",
        "report": str(report.relative_to(run_dir)),
        "claims": claims,
        "num_pass": sum(c["verdict"] == "pass" for c in claims),
        "num_claims": len(claims),
        "checks_left_out": _left_out(config),
        "wall_time_s": wall,
    }
