"""Section 5 of the paper: training linear neural ODEs with and without gauge fixing (Eq. 45).

S seeds of a `LinearNODE` (Fourier time basis) are trained on noisy samples of an affine map for
each regulariser strength lambda. Without fixing, the trained models agree as functions but
scatter over the gauge orbit ("a random sample of the vacuum gauge orbit"); with Eq. 45 they
collapse towards the canonical (uniform-motion) representative. Seeds are trained together as
one stacked model: Adam is elementwise, so the summed loss trains them independently.
"""

import dataclasses
import json
import time
from pathlib import Path
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gaugejax as gj
from gaugejax import io

from ._common import BAR_POSITION, PLOT_LOCK, claim, pyplot


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `gauge_fixing` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    dim: int = 4
    t1: float = 1.0
    num_modes: int = 2
    num_seeds: int = 8
    lambdas: tuple[float, ...] = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
    num_steps: int = 600
    steps_per_chunk: int = 100
    learning_rate: float = 3e-2
    batch_size: int = 32
    noise: float = 0.01
    train_rtol: float = 1e-6
    test_rtol: float = 1e-8
    num_test: int = 64
    spread_reduction: float = 10.0
    loss_ratio: float = 1.1
    # "eq45" (Eq. 45, data-free) or a trajectory regulariser on the first `regularizer_inputs`
    # inputs of each batch: "uniform_motion" (Eq. 43) or "kinetic" (RNODE; its minimisers on an
    # orbit are also straight lines at constant speed)
    regularizer: str = "eq45"
    regularizer_inputs: int = 8

    # lambda = 0 is the unregularised arm
    NONNEGATIVE: ClassVar[tuple[str, ...]] = ("lambdas",)

    def __post_init__(self):
        valid = ("eq45", "uniform_motion", "kinetic")
        if self.regularizer not in valid:
            raise ValueError(
                f"`regularizer` must be one of {list(valid)}; received {self.regularizer!r}."
            )
        if not 0 < self.regularizer_inputs <= self.batch_size:
            raise ValueError(
                f"`regularizer_inputs` must be in [1, batch_size={self.batch_size}]; received "
                f"{self.regularizer_inputs}."
            )
        if any(lam < 0 for lam in self.lambdas):
            raise ValueError(f"`lambdas` must be >= 0; received {list(self.lambdas)}.")
        if 0.0 not in self.lambdas or len(self.lambdas) < 2:
            raise ValueError(
                f"`lambdas` must contain 0 (the unfixed baseline) and a value > 0; received "
                f"{list(self.lambdas)}."
            )


PRESETS = {
    "default": {},
    "smoke": {"num_seeds": 4, "lambdas": [0.0, 0.1], "num_steps": 200, "num_test": 16},
}


def _task(cfg: Config, key):
    kM, km = jax.random.split(key)
    M = jax.scipy.linalg.expm(0.5 * jax.random.normal(kM, (cfg.dim, cfg.dim)) / np.sqrt(cfg.dim))
    m = 0.5 * jax.random.normal(km, (cfg.dim,))

    def batch_fn(k):
        kx, kn = jax.random.split(k)
        x = jax.random.normal(kx, (cfg.batch_size, cfg.dim))
        return x, x @ M.T + m + cfg.noise * jax.random.normal(kn, x.shape)

    return M, m, batch_fn


def _models(cfg: Config, key, rtol):
    basis = gj.FourierBasis(cfg.t1, cfg.num_modes)
    controller = diffrax.PIDController(rtol=rtol, atol=rtol)

    def make(k):
        return gj.random_linear_node(
            cfg.dim, cfg.t1, key=k, basis=basis, stepsize_controller=controller
        )

    return eqx.filter_vmap(make)(jax.random.split(key, cfg.num_seeds))


def _data_loss(models, batch):
    x, y = batch
    per_seed = eqx.filter_vmap(lambda mod: jnp.mean((jax.vmap(mod)(x) - y) ** 2))(models)
    return jnp.sum(per_seed)


def _penalty(cfg):
    def penalty(models, batch):
        inputs = batch[0][: cfg.regularizer_inputs]
        per_seed = eqx.filter_vmap(
            lambda mod: gj.gauge_fixing_penalty(cfg.regularizer, mod, inputs)
        )(models)
        return jnp.sum(per_seed)

    return penalty


_NAMES = {"eq45": "Eq. 45", "uniform_motion": "uniform motion", "kinetic": "kinetic energy"}
_EQUATIONS = {"eq45": "Eq. 45", "uniform_motion": "Eq. 43", "kinetic": "Sec. 5 (RNODE)"}


@eqx.filter_jit  # the config is static (hashable): one program for every lambda
def _evaluate(cfg: Config, models, test):
    """Per-seed test metrics with a tight adaptive solver."""
    x, y = test
    tight = diffrax.PIDController(rtol=cfg.test_rtol, atol=cfg.test_rtol)

    def one(mod):
        mod = mod.with_options(stepsize_controller=tight)
        out, stats = jax.vmap(mod.solve)(x)
        M, m = gj.orbits.linear_node_fingerprint(mod)
        return {
            "loss": jnp.mean((out - y) ** 2),
            "steps": jnp.mean(stats.num_steps),
            "evaluations": jnp.mean(stats.num_evaluations),
            "M": M,
            "m": m,
            "penalty": gj.linear_gauge_fixing_penalty(mod.weight, mod.bias, cfg.t1),
        }

    return eqx.filter_vmap(one)(models)


def _canonical_distances(cfg: Config, models, M, m) -> np.ndarray:
    """Per seed: `gj.orbits.canonical_distance` (16 Gauss nodes over [0, T]), reusing the
    fingerprints of `_evaluate` (eager: the existence check of the canonical gauge runs on the
    host)."""
    return np.asarray(
        [
            float(gj.orbits.canonical_distance(_seed(models, s), fingerprint=(M[s], m[s])))
            for s in range(cfg.num_seeds)
        ]
    )


def _seed(models, s):
    """Seed s of a stacked model."""
    return jax.tree.map(lambda a: a[s] if eqx.is_array(a) else a, models)


def _weight_trajectories(models, ts) -> np.ndarray:
    """w(t)[0, :2] of every seed on the grid ts."""
    return np.asarray(eqx.filter_vmap(lambda mod: jax.vmap(mod.weight)(ts))(models))[:, :, 0, :2]


def run(config: Config, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    start_all = time.perf_counter()
    k_task, k_init, k_train, k_test = jax.random.split(jax.random.key(config.seed), 4)
    M, m, batch_fn = _task(config, k_task)
    init = _models(config, k_init, config.train_rtol)
    test = batch_fn(k_test)
    test = (test[0][: config.num_test], test[1][: config.num_test])
    rows = {}
    curves = {}
    # one optimiser and penalty for every lambda: the runs then share one compiled chunk
    optimizer, penalty = optax.adam(config.learning_rate), _penalty(config)
    # one bar over every lambda's steps, advanced after each compiled chunk (a resumed run
    # starts it at the steps already done); its line is the one `reproduce` gives this thread
    bar = tqdm(
        total=len(config.lambdas) * config.num_steps,
        desc="gauge_fixing",
        unit="step",
        position=BAR_POSITION.get(),
        leave=True,
    )

    def advance(i, lam):
        def on_chunk(step, metrics):
            bar.set_postfix_str(f"lambda {lam:g}, loss {metrics['loss']:.2e}", refresh=False)
            bar.update(i * config.num_steps + step - bar.n)

        return on_chunk

    for i, lam in enumerate(config.lambdas):
        start = time.perf_counter()
        res = gj.train(
            _data_loss,
            init,
            optimizer,
            batch_fn,
            key=k_train,
            num_steps=config.num_steps,
            steps_per_chunk=config.steps_per_chunk,
            # a checkpoint per chunk: a killed run resumes inside the lambda it was training
            checkpoint_every=config.steps_per_chunk,
            regularizers={"gauge": (lam, penalty)},
            run_dir=run_dir / f"lambda_{lam:g}",
            config={**dataclasses.asdict(config), "lambda": lam},
            on_chunk=advance(i, lam),
        )
        bar.update((i + 1) * config.num_steps - bar.n)  # a lambda finished before a resume
        wall = time.perf_counter() - start
        ev = jax.device_get(_evaluate(config, res.model, test))
        rows[lam] = {
            "lambda": lam,
            "final_loss": float(np.mean(ev["loss"])),
            # the spread of the I/O maps x -> M x + m: of the fingerprints from `_evaluate`
            "function_spread": float(gj.orbits.seed_spread((ev["M"], ev["m"]))),
            # the basis coefficients only (the stacked model's Fourier frequencies are arrays too)
            "parameter_spread": float(
                gj.orbits.parameter_spread(
                    res.model, where=lambda mod: (mod.field.weights, mod.field.biases)
                )
            ),
            "canonical_distance": float(
                np.mean(_canonical_distances(config, res.model, ev["M"], ev["m"]))
            ),
            "penalty": float(np.mean(ev["penalty"])),
            "test_steps": float(np.mean(ev["steps"])),
            "test_evaluations": float(np.mean(ev["evaluations"])),
            "wall_time_s": wall,
        }
        # the whole curve from the lambda's own log: a resumed (or finished) run's history
        # holds only the steps it ran itself
        logged = io.read_jsonl(run_dir / f"lambda_{lam:g}" / "metrics.jsonl")
        curves[lam] = [r["loss"] / config.num_seeds for r in logged if "loss" in r]
        rows[lam]["w_trajectories"] = _weight_trajectories(
            res.model, jnp.linspace(0.0, config.t1, 50)
        )

    bar.close()
    base = rows[0.0]
    fixed = [rows[lam] for lam in config.lambdas if lam > 0]
    good = [
        r
        for r in fixed
        if r["parameter_spread"] * config.spread_reduction <= base["parameter_spread"]
        and r["final_loss"] <= config.loss_ratio * base["final_loss"]
    ]
    table = "; ".join(
        f"lambda {r['lambda']:g}: loss {r['final_loss']:.2e}, "
        f"param spread {r['parameter_spread']:.2e}, steps {r['test_steps']:.1f}"
        for r in rows.values()
    )
    best = min(fixed, key=lambda r: r["parameter_spread"])
    claims = [
        claim(
            "vacuum_orbit",
            "Without gauge fixing, seeds agree as functions but scatter over the gauge orbit "
            "(parameter spread / function spread across seeds)",
            "Sec. 5",
            base["parameter_spread"] / max(base["function_spread"], 1e-300),
            base["parameter_spread"] > 10 * base["function_spread"],
            "> 10",
            f"parameter spread {base['parameter_spread']:.2e}, "
            f"function spread {base['function_spread']:.2e}",
        ),
        claim(
            "fixing_collapses_orbit",
            f"With {_NAMES[config.regularizer]} some lambda > 0 cuts the parameter spread by >= "
            f"{config.spread_reduction:g}x at a loss <= {config.loss_ratio:g}x the unfixed loss "
            f"({config.num_seeds} seeds)",
            _EQUATIONS[config.regularizer],
            base["parameter_spread"] / best["parameter_spread"],
            bool(good),
            f">= {config.spread_reduction:g}x at loss ratio <= {config.loss_ratio:g}",
            table,
        ),
        claim(
            "fixing_steps",
            "Test-time adaptive solver steps do not increase with gauge fixing "
            f"(lambda {best['lambda']:g} vs 0, rtol {config.test_rtol:g})",
            "Sec. 5",
            best["test_steps"] / base["test_steps"],
            best["test_steps"] <= base["test_steps"],
            "<= 1",
            f"{best['test_steps']:.1f} vs {base['test_steps']:.1f} steps; distance to the "
            f"canonical gauge {best['canonical_distance']:.2e} vs {base['canonical_distance']:.2e}",
        ),
    ]
    results = {
        "rows": {f"{k:g}": v for k, v in rows.items()},
        "curves": {f"{k:g}": v for k, v in curves.items()},
    }
    io.write_json(run_dir / "results.json", results)
    with PLOT_LOCK:
        figures = plot(io.read_json(run_dir / "results.json"), run_dir / "figures", config)
    # one record per lambda, written once (a resumed run must not append them again)
    records = "".join(
        json.dumps(io.jsonable({k: v for k, v in rows[lam].items() if k != "w_trajectories"}))
        + "\n"
        for lam in config.lambdas
    )
    io.atomic_write_bytes(run_dir / "metrics.jsonl", records.encode())
    return {
        "experiment": "gauge_fixing",
        "claims": claims,
        "num_pass": sum(c["verdict"] == "pass" for c in claims),
        "num_claims": len(claims),
        "figures": [str(Path(f).relative_to(run_dir)) for f in figures],
        "wall_time_s": time.perf_counter() - start_all,
    }


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    plt = pyplot()
    fig_dir = Path(fig_dir)
    rows, curves = results["rows"], results["curves"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for lam, curve in curves.items():
        axes[0].semilogy(curve, label=f"lambda {lam}")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("data loss (mean over seeds)")
    axes[0].set_title(f"Training with and without {_NAMES[config.regularizer]}")
    axes[0].legend(fontsize=8)
    lams = [float(k) for k in rows]
    spread = [rows[k]["parameter_spread"] for k in rows]
    fspread = [rows[k]["function_spread"] for k in rows]
    xs = [lam if lam > 0 else min(x for x in lams if x > 0) / 10 for lam in lams]
    axes[1].loglog(xs, spread, "o-", label="parameter spread")
    axes[1].loglog(xs, fspread, "s--", label="function spread")
    axes[1].set_xlabel("lambda (leftmost point: lambda = 0)")
    axes[1].set_title("Across-seed spread")
    axes[1].legend(fontsize=8)
    keys = list(rows)
    for key, style in [(keys[0], "-"), (keys[-1], "--")]:
        traj = np.asarray(rows[key]["w_trajectories"])
        ts = np.linspace(0.0, config.t1, traj.shape[1])
        for s in range(traj.shape[0]):
            axes[2].plot(
                ts, traj[s, :, 0], style, color="tab:blue" if style == "-" else "tab:red", alpha=0.6
            )
    axes[2].set_xlabel("t")
    axes[2].set_ylabel("w_00(t)")
    axes[2].set_title(f"w(t) of all seeds: lambda {keys[0]} (blue) vs {keys[-1]} (red)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    out = [io.save_figure(fig, fig_dir / "gauge_fixing.png")]
    plt.close(fig)
    return out
