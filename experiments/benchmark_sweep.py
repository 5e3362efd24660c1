"""Benchmark of the sweep engine against the paths a user would write, side by side in one
process (compile once and report compile time apart, `block_until_ready`, median of repeats,
same solver, step count and precision on every side; the README's Performance section).

Workloads:

- `w1`: a linear neural ODE, d = 16, `w(t) = W0 + sin(pi t) W1`, `b(t) = b0 + cos(pi t) b1`,
  and finite gauges `LinearGauge` (one mode, `G = expm(sin(pi t/T) A)`, `c = sin(pi t/T) c0`,
  `|A|_2 = rho u`, u ~ U(1/4, 1)), classic RK4 with 100 fixed steps: the deformed ODE is
  really integrated.
- `w2`: a tanh-MLP neural ODE (d = 16, width 64) under infinitesimal Lie deformations with
  boundary-vanishing generators: the first-order output response per sample (zero for a
  symmetry), Tsit5 with 100 fixed steps.
- `w3`: `w2` with a PID controller at rtol = atol = `w3_rtol`; lane efficiency (mean / max
  steps per lane) and the per-lane step counts are recorded.

Sides (a row per workload, batch size and side): `gaugejax` (`gj.sweep` at its defaults, the
chunk `chunk_size` when set; samples/s of the whole call, reference, re-check and control
included, beside its blocks alone; the first call's compile seconds and program count;
first-order responses from the forward sensitivity system under error
control); `gaugejax_sharded` (the same sweep under `jax.shard_map` over every device: over a
mesh of one on a single GPU, the sharded path's overhead; over N CPU devices with
`--cpu-devices N`); and the baselines of `experiments/_baselines.py`: `naive_diffrax`,
`hand_sensitivity` (w2, w3: the forward sensitivity system written by hand, the cost of the
mathematics), `torchdiffeq`, `torchdiffeq_closed_form` (w1 only: dG/dt in closed form) and
`gradsolve` (w3 is not expressible there: the row says why).

Known problem (jaxlib 0.10.2, CPU): batched LAPACK kernels wait on XLA:CPU's intra-op pool
and deadlock when they occupy all of its threads (`gj.configure_cpu_devices`). The CLI sizes
the pool (`NPROC`) for two kernels per device; the w1 lane fuses its weight and bias into one
solve (`GaugedLinearField`).

Op count (what each side computes, not one "useful work" for all): the FLOPs of one evaluation
of the workload's vector field on one sample's M inputs, from XLA's cost analysis
(`field_flops`: `gj.program_flops`), over M, times the side's own field evaluations per sample,
summed over its M inputs (`gj.count_evaluations` for the JAX sides, counted calls for torch;
gradsolve reports none, so its rows use gaugejax's count: `op_count` says which). The ceiling is
a measured square matmul on the same device, dtype and precision (`gj.matmul_ceiling`);
`ceiling_fraction` is the ratio. No claims: rows go to `results.json`, `summary.json` and the
figure.
"""

import dataclasses
import statistics
import time
import warnings
from pathlib import Path
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import gaugejax as gj
from gaugejax import PRECISIONS, REDUCED_PRECISIONS, io, markdown_table, plain_log_ticks, pyplot

from . import _baselines
from ._common import experiment_summary


WORKLOADS = ("w1", "w2", "w3")
SIDES = (
    "gaugejax",
    "gaugejax_sharded",
    "naive_diffrax",
    "hand_sensitivity",
    "torchdiffeq",
    "torchdiffeq_closed_form",
    "gradsolve",
)
# compile times are measured: the CLI leaves the persistent compilation cache off for this module
PERSISTENT_COMPILE_CACHE = False
# and exposes one CPU device per core unless --cpu-devices says otherwise: the sharded side then
# uses every core (measured on 2 cores: W1 1.64x, W2 1.12x over one device; `sharded-2dev/`),
# the unsharded sides run on the first device as before
CPU_DEVICES = "auto"


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `benchmark_sweep` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    workloads: tuple[str, ...] = WORKLOADS
    sides: tuple[str, ...] = SIDES
    batch_sizes: tuple[int, ...] = (1024,)
    chunk_size: int = 0  # 0: the sweep's default chunk (`gj.default_chunk_size`)
    repeats: int = 5
    precision: str = "highest"
    dtype: str = "float64"
    # w1
    w1_dim: int = 16
    w1_inputs: int = 8
    w1_steps: int = 100
    w1_rho: float = 0.6
    # w2 / w3
    w2_dim: int = 16
    w2_width: int = 64
    w2_inputs: int = 8
    w2_steps: int = 100
    w3_rtol: float = 1e-6
    # torch threads for the torchdiffeq side (0: torch's default)
    torch_threads: int = 0
    # the other sides run only up to this many samples (0: at every batch size); the naive
    # side vmaps all of them at once, and the GPU preset's largest B would dominate its time
    baseline_max_samples: int = 0

    NONNEGATIVE: ClassVar[tuple[str, ...]] = ("torch_threads", "baseline_max_samples", "chunk_size")

    def __post_init__(self):
        gj.check_choices("workloads", self.workloads, WORKLOADS)
        gj.check_choices("sides", self.sides, SIDES)
        # sizes and counts >= 1, w3_rtol in [eps, 1), the NONNEGATIVE keys >= 0: `make_config`
        if not self.batch_sizes:
            raise ValueError("`batch_sizes` must be a non-empty list of ints > 0; received [].")
        gj.check_one_of("dtype", self.dtype, ("float32", "float64"))
        gj.check_one_of("precision", self.precision, PRECISIONS)
        if self.dtype == "float64":  # before a run directory exists or anything is measured
            lacking = sorted({d.platform for d in jax.devices() if not gj.supports_float64(d)})
            if lacking:
                raise ValueError(
                    f"`dtype` = 'float64', but the {', '.join(lacking)} devices do not compute "
                    "in float64 (x64 off, or the backend lacks it); expected dtype = 'float32'."
                )
        elif self.precision in REDUCED_PRECISIONS:
            warnings.warn(
                f"`precision` = {self.precision!r} with float32: matmuls on GPUs and TPUs then "
                f"round to about {REDUCED_PRECISIONS[self.precision]:.0e} relative, so the "
                "max_deviation column measures the rounding, not the solve (its floor rises to "
                "~1e-3); 'highest' keeps float32's own floor.",
                stacklevel=2,
            )


class Workload(eqx.Module):
    """One workload: the model, the gauge family, the inputs, and its raw arrays (for the
    torch side)."""

    model: eqx.Module
    gauge: gj.AbstractGauge
    inputs: jax.Array
    arrays: dict


def _w1_workload(cfg: Config, key) -> Workload:
    kw, kb, kx = jax.random.split(key, 3)
    d = cfg.w1_dim
    W0, W1 = jax.random.normal(kw, (2, d, d)) / np.sqrt(d)
    b0, b1 = jax.random.normal(kb, (2, d))
    # FourierBasis(T, 1) is (1, cos(pi t/T), sin(pi t/T)): W1 rides on sin, b1 on cos
    field = gj.BasisLinearField(
        gj.FourierBasis(1.0, 1),
        jnp.stack([W0, jnp.zeros_like(W0), W1]),
        jnp.stack([b0, b1, 0 * b1]),
    )
    model = gj.LinearNODE(
        field,
        t1=1.0,
        solver=gj.RK4(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=1.0 / cfg.w1_steps,
    )
    gauge = gj.LinearGauge(d, 1.0, num_modes=1, rho=cfg.w1_rho, bias_scale=0.3)
    arrays = {"W0": W0, "W1": W1, "b0": b0, "b1": b1}
    return Workload(model, gauge, jax.random.normal(kx, (cfg.w1_inputs, d)), arrays)


def _w2_workload(cfg: Config, key, adaptive: bool) -> Workload:
    km, kg, kx = jax.random.split(key, 3)
    field = gj.MLPField(cfg.w2_dim, cfg.w2_width, 2, key=km, out_scale=0.7)
    if adaptive:
        controller = diffrax.PIDController(rtol=cfg.w3_rtol, atol=cfg.w3_rtol)
        options = dict(stepsize_controller=controller)
    else:
        options = dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=1.0 / cfg.w2_steps)
    model = gj.NeuralODE(field, t1=1.0, solver=diffrax.Tsit5(), **options)
    gauge = gj.LieDeformationGauge(cfg.w2_dim, 1.0, key=kg)
    return Workload(model, gauge, jax.random.normal(kx, (cfg.w2_inputs, cfg.w2_dim)), {})


def workload(cfg: Config, name: str, key) -> Workload:
    """The workload `name` ("w1", "w2", "w3") drawn from `key`, in the config's dtype."""
    w = _w1_workload(cfg, key) if name == "w1" else _w2_workload(cfg, key, name == "w3")
    dtype = jnp.dtype(cfg.dtype)

    def cast(tree):
        return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)

    return Workload(cast(w.model), cast(w.gauge), cast(w.inputs), cast(w.arrays))


def _gaugejax(
    cfg: Config, w: Workload, key, num_samples: int, sharded: bool
) -> tuple[dict, np.ndarray]:
    # unsharded: the first device; sharded: `jax.shard_map` over every device (also over one,
    # so the sharded path's overhead is measured on a single GPU)
    devices = jax.devices() if sharded else jax.devices()[:1]
    kwargs = dict(key=key, num_samples=num_samples, precision=cfg.precision)
    kwargs.update(devices=devices, shard=sharded)
    if cfg.chunk_size:  # else the sweep's own default (`gj.default_chunk_size`)
        kwargs["chunk_size"] = min(cfg.chunk_size, -(-num_samples // len(devices)))
    start = time.perf_counter()
    first = gj.sweep(w.model, w.gauge, w.inputs, **kwargs)
    first_call_s = time.perf_counter() - start
    # timing repeats: the whole call at the sweep's defaults (reference, blocks, re-check and
    # control), and its blocks alone (`run_time_s`)
    calls, blocks = [], []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        again = gj.sweep(w.model, w.gauge, w.inputs, **kwargs)
        calls.append(time.perf_counter() - start)
        blocks.append(again.run_time_s)
    if first.failures():
        raise RuntimeError(f"lanes failed: {first.failures()}")
    # field evaluations per sample: `gj.count_evaluations` (the solver's tableau)
    row = {"samples_per_s": num_samples / statistics.median(calls),
           "blocks_samples_per_s": num_samples / statistics.median(blocks),
           "first_call_s": first_call_s, "compile_s": first.compile_time_s,
           "num_programs": first.num_programs, "noise_floor": first.noise_floor,
           "verdict": first.verdict, "chunk_size": first.chunk_size,
           "num_devices": len(devices),
           **gj.deviation_summary(first.max_abs, first.num_steps),
           "evaluations_mean": float(np.mean(np.asarray(first.num_evaluations)))}  # fmt: skip
    steps, counts = np.unique(np.asarray(first.num_steps), return_counts=True)
    row["steps_histogram"] = {int(a): int(b) for a, b in zip(steps, counts, strict=True)}
    return row, np.asarray(first.max_abs)


def skip_reason(cfg: Config, name: str, side: str, num_samples: int) -> str | None:
    """Why a side does not run (None: it runs)."""
    if side.startswith("gaugejax"):
        return None
    if cfg.baseline_max_samples and num_samples > cfg.baseline_max_samples:
        return f"skipped: B > baseline_max_samples = {cfg.baseline_max_samples}"
    return _baselines.unavailable(side, name)


def field_flops(cfg: Config, name: str, w: Workload, key) -> float:
    """FLOPs of one evaluation of the workload's vector field on one sample's M inputs, from
    XLA's cost analysis of that straight-line program (no loops, so nothing is counted once for
    many iterations): w1 the gauge-transformed linear field (G(t), dG/dt and the solve are
    shared by the M inputs, as in every side's program); w2/w3 the forward sensitivity field
    (`gj.gauge_sensitivity`: for the Lie family `gj.DeformationSensitivityField`, one jvp of the
    field and one of the generator, the hand-written system's work). Matmuls, adds and multiplies
    count; transcendentals (tanh, sin) are not FLOPs in XLA's count."""
    g = w.gauge.sample(key)
    t = jnp.asarray(0.5, w.inputs.dtype)
    if name == "w1":
        moved = w.gauge.act(g, w.model)

        def evaluate(xs):
            return jax.vmap(lambda x: moved.field(t, x, None))(xs)

    else:
        sensitivity = gj.gauge_sensitivity(w.model, w.gauge, g)

        def evaluate(xs):
            return jax.vmap(lambda x: sensitivity(t, (x, x), None))(xs)

    with jax.default_matmul_precision(cfg.precision):
        return gj.program_flops(evaluate, w.inputs)


def run_side(cfg: Config, name: str, w: Workload, side: str, key, num_samples: int) -> tuple:
    """`(row, per_sample)` of one side on the workload `name` (drawn as `w`), sample i's gauge
    element from `fold_in(key, i)` on every side: the side's measured numbers and its
    per-sample deviations."""
    if side.startswith("gaugejax"):
        return _gaugejax(cfg, w, key, num_samples, side != "gaugejax")
    if side == "naive_diffrax":
        return _baselines.naive_diffrax(cfg, w, key, num_samples, name != "w1")
    if side == "hand_sensitivity":
        return _baselines.hand_sensitivity(cfg, w, key, num_samples)
    if side == "torchdiffeq_closed_form":
        return _baselines.torch_w1(cfg, w, key, num_samples, closed_form=True)
    if side == "torchdiffeq" and name == "w1":
        return _baselines.torch_w1(cfg, w, key, num_samples)
    if side == "torchdiffeq":
        return _baselines.torch_w2(cfg, w, key, num_samples, name == "w3")
    return _baselines.gradsolve(cfg, w, key, num_samples, name != "w1")


def measure(
    cfg: Config, name: str, key, num_samples: int, ceiling: float | None = None
) -> list[dict]:
    """One row per side for workload `name` at `num_samples` samples; with `ceiling` (FLOP/s)
    every row also gets `flop_per_s` and `ceiling_fraction` (module docstring: the op count)."""
    kw, ks = jax.random.split(key)
    w = workload(cfg, name, kw)
    rows, base = [], None
    for side in cfg.sides:
        row = {"workload": name, "num_samples": num_samples, "side": side, "dtype": cfg.dtype}
        row["precision"] = cfg.precision
        reason = skip_reason(cfg, name, side, num_samples)
        if reason is not None:
            rows.append({**row, "status": reason})
            continue
        try:
            data, per_sample = run_side(cfg, name, w, side, ks, num_samples)
        except Exception as e:  # a side that fails (e.g. out of memory) is a row, not a crash
            rows.append({**row, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"})
            continue
        row.update(status="ok", **data, **gj.peak_memory())  # cumulative over the rows
        if base is None and side == "gaugejax":
            base = per_sample
        elif base is not None:
            # the same gauge elements on every side: per-sample deviations must agree
            row["max_diff_vs_gaugejax"] = float(np.max(np.abs(per_sample - base)))
        rows.append(row)
    rate = {r["side"]: r.get("samples_per_s") for r in rows}
    for r in rows:
        if r.get("samples_per_s") and rate.get("gaugejax"):
            r["gaugejax_speedup"] = rate["gaugejax"] / r["samples_per_s"]
    ours = next((r for r in rows if r["side"] == "gaugejax" and r["status"] == "ok"), None)
    per_input = field_flops(cfg, name, w, ks) / len(w.inputs) if any(
        r.get("samples_per_s") for r in rows
    ) else None  # fmt: skip
    for r in rows:
        if not r.get("samples_per_s"):
            continue
        # a side's own field evaluations where it reports them (summed over the M inputs),
        # else gaugejax's (gradsolve's engines report none)
        own = r.get("evaluations_mean")
        if own is None and ours is None:
            continue
        r["op_count"] = "own evaluations" if own is not None else "gaugejax's evaluations"
        r["flops_per_sample"] = (own if own is not None else ours["evaluations_mean"]) * per_input
        r["flop_per_s"] = r["flops_per_sample"] * r["samples_per_s"]
        if ceiling:
            r["ceiling_fraction"] = r["flop_per_s"] / ceiling
    return rows


def _table(rows: list[dict]) -> list[str]:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, int | float) else "-"

    header = ["workload", "B", "side", "samples/s", "blocks only", "gaugejax x", "compile s",
              "programs", "max deviation", "vs gaugejax", "lane eff.", "GFLOP/s", "of ceiling",
              "status"]  # fmt: skip
    cells = [
        [r["workload"], r["num_samples"], r["side"], fmt(r.get("samples_per_s"), ".1f"),
         fmt(r.get("blocks_samples_per_s"), ".1f"),
         fmt(r.get("gaugejax_speedup"), ".2f"), fmt(r.get("compile_s"), ".2f"),
         fmt(r.get("num_programs"), "d"),
         fmt(r.get("max_deviation"), ".2e"), fmt(r.get("max_diff_vs_gaugejax"), ".1e"),
         fmt(r.get("lane_efficiency"), ".2f"),
         fmt(r["flop_per_s"] / 1e9 if r.get("flop_per_s") else None, ".3g"),
         fmt(r["ceiling_fraction"] * 100, ".2g") + "%" if r.get("ceiling_fraction") else "-",
         r["status"]]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, cells)


def run(config: Config, run_dir: Path) -> dict:
    """Measure every workload, batch size and side; write `results.json`, `metrics.jsonl`, the
    Markdown table and the figure."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    env = io.env_info()
    # the n x n matmul ceiling (n = 1024 on a CPU, 8192 on an accelerator), at least 5 repeats
    ceiling = gj.matmul_ceiling(config.dtype, config.precision, repeats=max(config.repeats, 5))
    env["ceiling"] = ceiling
    keys = jax.random.split(jax.random.key(config.seed), len(config.workloads))
    cases = [(name, key, b) for name, key in zip(config.workloads, keys, strict=True)
             for b in config.batch_sizes]  # fmt: skip
    rows = []
    for name, key, b in tqdm(cases, desc="benchmark_sweep"):
        for row in measure(config, name, key, b, env["ceiling"]["flop_per_s"]):
            rows.append(row)
            io.append_jsonl(run_dir / "metrics.jsonl", row)
    table = _table(rows)
    io.write_json(run_dir / "results.json", {"env": env, "rows": rows})
    io.atomic_write_bytes(run_dir / "table.md", ("\n".join(table) + "\n").encode())
    for line in table:
        tqdm.write(line)
    figures = plot(io.read_json(run_dir / "results.json"), run_dir / "figures", config)
    return experiment_summary("benchmark_sweep", [], figures, run_dir, start, env=env, rows=rows,
                              table=table)  # fmt: skip


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    """Samples/s per side, one panel per workload (log scale): bars labelled with the max
    deviation at one batch size (a fast side with a large deviation computes something else),
    lines against the batch size at several."""
    plt = pyplot()
    rows = [r for r in results["rows"] if r["status"] == "ok"]
    workloads = [w for w in config.workloads if any(r["workload"] == w for r in rows)]
    n = max(len(workloads), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.6 * n, 3.8))  # room for six labelled bars
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, workloads, strict=False):
        mine = [r for r in rows if r["workload"] == name]
        if len(config.batch_sizes) == 1:
            sides = [r["side"] for r in mine]
            rates = [r["samples_per_s"] for r in mine]
            ax.bar(range(len(mine)), rates, color=[f"C{SIDES.index(s)}" for s in sides])
            for i, r in enumerate(mine):
                label = f"{r['samples_per_s']:.0f}/s\ndev {r['max_deviation']:.1e}"
                ax.annotate(label, (i, r["samples_per_s"]), ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(mine)), sides, fontsize=8, rotation=20, ha="right")
            ax.set_ylim(min(rates) / 3, max(rates) * 4)
            ax.set_title(f"{name} (B = {config.batch_sizes[0]})")
        else:
            for side, marker in zip(SIDES, "oxsvd^<", strict=True):
                line = sorted(
                    (r["num_samples"], r["samples_per_s"]) for r in mine if r["side"] == side
                )
                if line:
                    ax.plot(*zip(*line, strict=True), marker=marker, label=side)
            ax.set_xscale("log")
            ax.set_xlabel("samples per sweep (B)")
            ax.legend(fontsize=8)
            ax.set_title(name)
        ax.set_yscale("log")
        ax.set_ylabel("samples / s")
        plain_log_ticks(ax)
        ax.grid(True, which="major", axis="y", alpha=0.3)
    device = results["env"]["devices"][0] if results["env"]["devices"] else "?"
    fig.suptitle(f"Gauge-sweep throughput on {device} ({config.dtype})", fontsize=10)
    fig.tight_layout()
    return [io.save_figure(fig, fig_dir / "throughput.png", close=True)]
