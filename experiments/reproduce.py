"""Run every experiment's checks at one preset and write `report.md` with measured numbers."""

import concurrent.futures
import dataclasses
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from gaugejax import claims_table, format_measured, io, make_config, validate_checks

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
    # experiments run concurrently on this many threads (1: one after another, so each
    # experiment's wall time in the report is its own). 2: the training experiments run one
    # compiled program at a time on one core, so a second experiment fills the other core
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
        configs = {}
        for name in self.experiments:
            found = presets(name)
            if self.preset not in found:
                raise ValueError(
                    f"`preset` must be one of {sorted(found)} for {name}; received {self.preset!r}."
                )
            values = dict(found[self.preset])
            if name in selection:
                values["checks"] = list(selection[name])
            configs[name] = make_config(REPRODUCIBLE[name].Config, values)
        return configs

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


EXPENSIVE_FIRST = ("regularizers", "node_symmetry", "gauge_fixing", "orbit_cost")


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
            selection.get(name) or make_config(module.Config, presets(name)[config.preset]).checks
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
        f"- preset: `{config.preset}`; experiments: {', '.join(config.experiments)}"
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


def run(config: Config, run_dir: Path) -> dict:
    """Run each experiment at `config.preset` in `run_dir/<name>/`; write `report.md`."""
    run_dir = Path(run_dir)
    env = io.env_info()
    configs = config.experiment_configs()

    total = len(config.experiments)
    number = {name: i + 1 for i, name in enumerate(config.experiments)}

    def say(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def one(name):
        # this thread's experiment draws its bar on its own line (workers run side by side)
        BAR_POSITION.set(order.index(name) % config.workers)
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
        start = time.perf_counter()
        summary = REPRODUCIBLE[name].run(configs[name], sub_dir)
        io.write_json(sub_dir / "summary.json", summary)
        wall = time.perf_counter() - start
        say(
            f"[{number[name]}/{total}] {name}: {summary['num_pass']}/{summary['num_claims']} "
            f"claims pass ({wall:.0f} s)"
        )
        return summary, wall

    # with several workers the long ones start first; the report keeps `experiments` order
    order = sorted(config.experiments, key=lambda n: n not in EXPENSIVE_FIRST)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers)
    try:
        futures = {name: pool.submit(one, name) for name in order}
        done = {name: f.result() for name, f in futures.items()}
    except BaseException:  # Ctrl-C or a failure: do not start the experiments still queued
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
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
