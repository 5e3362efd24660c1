"""Benchmark of the sweep engine: gauge samples per second for one jitted per-sample function,
called in a Python loop, vmapped over one chunk in one call, and run by `gaugejax.sweep` over
all samples (fixed-size vmapped chunks), measured
side by side in one run (DESIGN.md's protocol: compile once and report compile time apart,
`block_until_ready`, median of repeats, same solver and precision on every side).

Workloads:

- `lie`: a tanh-MLP neural ODE (Tsit5, PID rtol = atol = `rtol`) and `LieDeformationGauge`
  with boundary-vanishing generators; the lane is the first-order response, solved as the
  forward sensitivity system (what `sweep` uses for infinitesimal families).
- `w1`: DESIGN.md's reference workload W1: a linear neural ODE, d = 16,
  `w(t) = W0 + sin(pi t) W1`, `b(t) = b0 + cos(pi t) b1`, and finite gauges `LinearGauge`
  (one mode, `G = expm(sin(pi t/T) A)`, `c = sin(pi t/T) c0`), integrated by classic RK4 with
  100 fixed steps; the deformed ODE is really integrated. `LinearGauge` normalises `A` by its
  spectral norm (`|A|_2 = rho u`, u ~ U(1/4, 1)) instead of W1's `0.3 N(0, 1)/sqrt(d)`.

Known problem (jaxlib 0.10.2, CPU): a vmapped loop body with two independent "inner loop ->
LU solve" chains never returns at a batch of about 100 or more (README: a pure-JAX reproducer).
The w1 lane had that shape until `LinearGauge` fused its weight and bias into one solve
(`GaugedLinearField`); chunks of 128 to 1024 now return. The vmap side is timed on one chunk.

This is a benchmark, not a check: it has no claims; numbers go to `results.json`,
`summary.json` (the `table`) and `figures/throughput.png`.
"""

import dataclasses
import statistics
import time
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import gaugejax as gj
from gaugejax import io

from ._common import pyplot


WORKLOADS = ("lie", "w1")
# compile times are measured: the CLI leaves the persistent compilation cache off for this module
PERSISTENT_COMPILE_CACHE = False


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `benchmark_sweep` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    workloads: tuple[str, ...] = WORKLOADS
    num_samples: int = 512
    loop_samples: int = 32
    chunk_size: int = 32
    repeats: int = 5
    precision: str = "highest"
    # lie workload
    dim: int = 4
    width: int = 32
    num_inputs: int = 8
    rtol: float = 1e-8
    # w1 workload
    w1_dim: int = 16
    w1_inputs: int = 8
    w1_steps: int = 100
    w1_rho: float = 0.6

    def __post_init__(self):
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ValueError(
                f"`workloads` must be a non-empty list from {list(WORKLOADS)}; "
                f"received {list(self.workloads)}."
            )
        for name in ("num_samples", "loop_samples", "chunk_size", "repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0; received {getattr(self, name)}.")
        for name in ("loop_samples", "chunk_size"):
            if getattr(self, name) > self.num_samples:
                raise ValueError(
                    f"`{name}` must be <= num_samples={self.num_samples}; "
                    f"received {getattr(self, name)}."
                )


PRESETS = {
    "default": {},
    "smoke": {"num_samples": 32, "loop_samples": 8, "chunk_size": 16, "repeats": 2},
}


def _lie_workload(cfg: Config, key):
    km, kg, kx = jax.random.split(key, 3)
    field = gj.MLPField(cfg.dim, cfg.width, 2, key=km, out_scale=0.7)
    model = gj.NeuralODE(
        field, t1=1.0, stepsize_controller=diffrax.PIDController(rtol=cfg.rtol, atol=cfg.rtol)
    )
    gauge = gj.LieDeformationGauge(cfg.dim, 1.0, key=kg)
    return model, gauge, jax.random.normal(kx, (cfg.num_inputs, cfg.dim))


def _w1_workload(cfg: Config, key):
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
    return model, gauge, jax.random.normal(kx, (cfg.w1_inputs, d))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(cfg: Config, name: str, key) -> dict:
    """Samples/s of one workload by loop, vmap and sweep, with compile times and deviations."""
    kw, ks = jax.random.split(key)
    model, gauge, inputs = {"lie": _lie_workload, "w1": _w1_workload}[name](cfg, kw)
    lane = gj.sweep_lane(model, gauge, inputs, precision=cfg.precision)
    indices = jnp.arange(cfg.num_samples, dtype=jnp.uint32)
    keys = jax.vmap(lambda i: jax.random.fold_in(ks, i))(indices)
    loop_keys = list(keys[: cfg.loop_samples])

    # the same traced per-sample function on every side; the lane Module is a jit argument
    start = time.perf_counter()
    one = jax.jit(lambda lane, k: lane(k)).lower(lane, keys[0]).compile()
    loop_compile = time.perf_counter() - start
    start = time.perf_counter()
    chunk = keys[: cfg.chunk_size]
    many = jax.jit(lambda lane, ks: jax.vmap(lane)(ks)).lower(lane, chunk).compile()
    vmap_compile = time.perf_counter() - start

    def loop():
        # block on every sample, as a loop that reads each result does (queueing 64 async
        # calls of the unfused w1 program deadlocked jaxlib 0.10.2's CPU runtime)
        return [jax.block_until_ready(one(lane, k)) for k in loop_keys]

    loop_time = _median_time(loop, cfg.repeats)
    vmap_time = _median_time(lambda: many(lane, chunk), cfg.repeats)
    first = gj.sweep(
        model, gauge, inputs, key=ks, num_samples=cfg.num_samples, chunk_size=cfg.chunk_size
    )
    sweep_times = [first.run_time_s]
    for _ in range(cfg.repeats - 1):
        # timing repeats: no control or re-check (the first sweep gave the verdict)
        again = gj.sweep(
            model,
            gauge,
            inputs,
            key=ks,
            num_samples=cfg.num_samples,
            chunk_size=cfg.chunk_size,
            control_samples=0,
        )
        sweep_times.append(again.run_time_s)
    sweep_time = statistics.median(sweep_times)

    looped = np.array([float(one(lane, k)["max_abs"]) for k in loop_keys])
    vmapped = np.asarray(many(lane, chunk)["max_abs"])
    rows = [
        ("loop", cfg.loop_samples, loop_compile, loop_time),
        ("vmap", cfg.chunk_size, vmap_compile, vmap_time),
        ("sweep", cfg.num_samples, first.compile_time_s, sweep_time),
    ]
    loop_rate = cfg.loop_samples / loop_time
    return {
        "workload": name,
        "methods": {
            m: {
                "samples": n,
                "compile_s": c,
                "run_s_median": t,
                "samples_per_s": n / t,
                "speedup_vs_loop": (n / t) / loop_rate,
            }
            for m, n, c, t in rows
        },
        # the three sides compute the same numbers (a benchmark of a wrong program is void)
        "loop_vs_vmap_max_diff": float(np.max(np.abs(looped - vmapped[: cfg.loop_samples]))),
        "sweep_vs_vmap_max_diff": float(np.max(np.abs(first.max_abs[: cfg.chunk_size] - vmapped))),
        "deviation_max": float(first.max_abs.max()),
        "deviation_median": float(np.median(first.max_abs)),
        "mode": first.mode,
        "num_steps_median": float(np.median(first.num_steps)),
        "num_evaluations_median": float(np.median(first.num_evaluations)),
        "failures": first.failures(),
        "dtype": first.dtype,
        "precision": cfg.precision,
        "device": str(jax.devices()[0]),
    }


def run(config: Config, run_dir: Path) -> dict:
    """Measure every workload; write `results.json`, `metrics.jsonl` and the figure."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    keys = jax.random.split(jax.random.key(config.seed), len(config.workloads))
    results = {}
    for name, key in tqdm(list(zip(config.workloads, keys, strict=True)), desc="benchmark_sweep"):
        results[name] = measure(config, name, key)
        io.append_jsonl(run_dir / "metrics.jsonl", results[name])
    io.write_json(run_dir / "results.json", results)
    table = [
        f"{name:<4} {m:<5} {r['samples_per_s']:>10.1f} samples/s  x{r['speedup_vs_loop']:<6.1f} "
        f"compile {r['compile_s']:.2f} s  run {r['run_s_median']:.3f} s ({r['samples']} samples)"
        for name, res in results.items()
        for m, r in res["methods"].items()
    ]
    for line in table:
        tqdm.write(line)
    figures = plot(io.read_json(run_dir / "results.json"), run_dir / "figures", config)
    return {
        "experiment": "benchmark_sweep",
        "claims": [],
        "table": table,
        "figures": [str(Path(f).relative_to(run_dir)) for f in figures],
        "wall_time_s": time.perf_counter() - start,
    }


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    """Bar chart of samples/s per workload and method (log scale), from `results.json`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    methods = ("loop", "vmap", "sweep")
    width = 0.25
    for i, m in enumerate(methods):
        rates = [results[w]["methods"][m]["samples_per_s"] for w in results]
        ax.bar(np.arange(len(results)) + (i - 1) * width, rates, width, label=m)
    ax.set_xticks(np.arange(len(results)), list(results))
    ax.set_yscale("log")
    ax.set_ylabel("gauge samples / s")
    ax.set_title(f"sweep throughput on {next(iter(results.values()))['device']}")
    ax.legend()
    fig.tight_layout()
    path = io.save_figure(fig, fig_dir / "throughput.png")
    plt.close(fig)
    return [path]
