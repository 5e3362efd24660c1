"""Section 5 of the paper: training linear neural ODEs with and without gauge fixing (Eq. 45).

S seeds of a `LinearNODE` (Fourier time basis) are trained on noisy samples of an affine map for
each regulariser strength lambda. Without fixing, the trained models agree as functions but
scatter over the gauge orbit ("a random sample of the vacuum gauge orbit"); with Eq. 45 they
collapse towards the canonical (uniform-motion) representative. Seeds are trained together as
one stacked model (`gj.stack_models`: Adam is elementwise, so the summed loss trains them
independently); every lambda and extra arm is a run of one shared compiled program, whose
loss returns every regulariser and whose traced weights pick the run's own.
"""

import dataclasses
import warnings
from pathlib import Path
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj
from gaugejax import check_choices, check_one_of, claim, io, optimizer, pyplot

from ._training import TrainingRun


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
    # more arms, each trained at `arm_lambda` with its own regulariser beside the lambda sweep:
    # by default the rotation-covariant Higgs term of footnote 12, invariant under rotations
    # G(t) in SO(d) (so it cannot fix them: the "weak regulariser" the footnote announces)
    arms: tuple[str, ...] = ("rotation_covariant",)
    arm_lambda: float = 0.1
    # random rotation (SO(d)) and GL(d) gauges of the invariance check on the trained models
    invariance_samples: int = 8

    # lambda = 0 is the unregularised arm
    NONNEGATIVE: ClassVar[tuple[str, ...]] = ("lambdas",)

    def __post_init__(self):
        check_one_of("regularizer", self.regularizer, REGULARIZERS)
        check_choices("arms", self.arms, REGULARIZERS, empty=True)
        if self.test_rtol > self.train_rtol:
            warnings.warn(
                f"test_rtol = {self.test_rtol:g} is looser than train_rtol = {self.train_rtol:g}: "
                "the test-time losses and step counts then measure the solver more than the "
                "trained models (the comparison needs test_rtol <= train_rtol).",
                stacklevel=2,
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


REGULARIZERS = ("eq45", "rotation_covariant", "uniform_motion", "kinetic")


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

    return gj.stack_models(make, jax.random.split(key, cfg.num_seeds))


class _SeedLoss(eqx.Module):
    """One seed's data loss, and as terms each regulariser of `names` (`gj.StackedLoss` sums
    them over seeds). One program for every run: a run weights its own regulariser by its
    lambda, the others by 0, which adds exact zeros. Stacking the runs too was measured 2x
    slower per step: a batched adaptive solve steps until its slowest lane is done."""

    names: tuple[str, ...] = eqx.field(static=True)
    inputs: int = eqx.field(static=True)

    def __call__(self, mod, batch):
        x, y = batch
        penalties = {n: gj.gauge_fixing_penalty(n, mod, x[: self.inputs]) for n in self.names}
        return jnp.mean((jax.vmap(mod)(x) - y) ** 2), penalties


_NAMES = {
    "eq45": "Eq. 45",
    "rotation_covariant": "the rotation-covariant term",
    "uniform_motion": "uniform motion",
    "kinetic": "kinetic energy",
}
_EQUATIONS = {
    "eq45": "Eq. 45",
    "rotation_covariant": "footnote 12",
    "uniform_motion": "Eq. 43",
    "kinetic": "Sec. 5 (RNODE)",
}


@eqx.filter_jit  # the config is static (hashable): one program for every run
def _evaluate(cfg: Config, models, test):
    """Per seed: test metrics with a tight adaptive solver."""
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
            "w": jax.vmap(mod.weight)(jnp.linspace(0.0, cfg.t1, 50))[:, 0, :2],  # the figure's
        }

    return eqx.filter_vmap(one)(models)


def _row(cfg: Config, name: str, lam: float, models, ev) -> dict:
    """One run's numbers from its trained seeds and their `_evaluate` metrics."""
    # per seed: `gj.orbits.canonical_distance` (16 Gauss nodes over [0, T]) from the
    # fingerprints of `_evaluate` (eager: the canonical gauge's existence check is on the host)
    distances = [
        float(gj.orbits.canonical_distance(gj.unstack_model(models, s), fingerprint=(M, m)))
        for s, (M, m) in enumerate(zip(ev["M"], ev["m"], strict=True))
    ]
    # the basis coefficients only (the stacked model's Fourier frequencies are arrays too)
    where = lambda mod: (mod.field.weights, mod.field.biases)  # noqa: E731
    return {
        "regularizer": name,
        "lambda": lam,
        "final_loss": float(np.mean(ev["loss"])),
        # the spread of the I/O maps x -> M x + m: of the fingerprints from `_evaluate`
        "function_spread": float(gj.orbits.seed_spread((ev["M"], ev["m"]))),
        "parameter_spread": float(gj.orbits.parameter_spread(models, where=where)),
        "canonical_distance": float(np.mean(distances)),
        "penalty": float(np.mean(ev["penalty"])),
        "test_steps": float(np.mean(ev["steps"])),
        "test_evaluations": float(np.mean(ev["evaluations"])),
        "w_trajectories": ev["w"],
    }


@eqx.filter_jit
def _footnote12_invariance(config: Config, model, key) -> dict:
    """Relative changes of footnote 12's term and of Eq. 45 of one `model` under
    `invariance_samples` random rotation (`group="SO"`) and GL(d) linear gauges."""
    so = gj.LinearGauge(config.dim, config.t1, group="SO")
    gl = gj.LinearGauge(config.dim, config.t1)
    keys = jax.random.split(key, config.invariance_samples)

    def changes(gauge, penalty):
        base = penalty(model.weight, model.bias, config.t1)

        def one(k):
            moved = gauge.act(gauge.sample(k), model)
            return jnp.abs(penalty(moved.weight, moved.bias, config.t1) - base) / jnp.abs(base)

        return jax.vmap(one)(keys)

    return {
        "rotation_covariant_SO": changes(so, gj.rotation_covariant_penalty),
        "rotation_covariant_GL": changes(gl, gj.rotation_covariant_penalty),
        "eq45_SO": changes(so, gj.linear_gauge_fixing_penalty),
    }


def run(config: Config, run_dir: Path) -> dict:
    # the lambda sweep of `regularizer`, then one run per extra arm at `arm_lambda`
    jobs = [(config.regularizer, lam, f"lambda_{lam:g}") for lam in config.lambdas]
    jobs += [(arm, config.arm_lambda, f"arm_{arm}") for arm in config.arms]
    with TrainingRun("gauge_fixing", config, run_dir, len(jobs) * config.num_steps) as tr:
        k_task, k_init, k_train, k_test = jax.random.split(jax.random.key(config.seed), 4)
        M, m, batch_fn = _task(config, k_task)
        init = _models(config, k_init, config.train_rtol)
        test = jax.tree.map(lambda a: a[: config.num_test], batch_fn(k_test))
        names = tuple(dict.fromkeys(name for name, _, _ in jobs))  # each regulariser once
        loss = gj.StackedLoss(_SeedLoss(names, config.regularizer_inputs))
        rows, curves, trained = {}, {}, {}
        for i, (name, lam, sub) in enumerate(jobs):
            with tr.stage(f"{name} lambda {lam:g}", config.num_steps) as on_chunk:
                res = gj.train(loss, init, optimizer("adam", config.learning_rate), batch_fn,
                               key=k_train, num_steps=config.num_steps,
                               steps_per_chunk=config.steps_per_chunk,
                               # a checkpoint per chunk: a killed run resumes inside this run
                               checkpoint_every=config.steps_per_chunk,
                               regularizers={n: (lam * (n == name), None) for n in names},
                               run_dir=tr.dir / sub, on_chunk=on_chunk,
                               config={**dataclasses.asdict(config), "lambda": lam,
                                       "regularizer": name})  # fmt: skip
            ev = jax.device_get(_evaluate(config, res.model, test))
            key = lam if i < len(config.lambdas) else name
            rows[key] = {**_row(config, name, lam, res.model, ev), "wall_time_s": res.seconds}
            curves[key] = [r["loss"] / config.num_seeds for r in res.history]
            trained[key] = res.model
        unfixed = gj.unstack_model(trained[0.0], 0)  # seed 0 of lambda 0
        invariance = jax.device_get(
            _footnote12_invariance(config, unfixed, jax.random.fold_in(k_test, 12))
        )
        results = {
            "rows": {f"{k:g}": rows[k] for k in config.lambdas},
            "arms": {a: rows[a] for a in config.arms},
            "curves": {(f"{k:g}" if k in config.lambdas else k): v for k, v in curves.items()},
            "invariance": invariance,
        }
        # one record per run
        records = [{k: v for k, v in rows[key].items() if k != "w_trajectories"} for key in rows]
        return tr.finish(results, plot, records, _claims(config, rows, invariance))


def _claims(config: Config, rows: dict, invariance: dict) -> list:
    base = rows[0.0]
    fixed = [rows[lam] for lam in config.lambdas if lam > 0]
    good = [
        r
        for r in fixed
        if r["parameter_spread"] * config.spread_reduction <= base["parameter_spread"]
        and r["final_loss"] <= config.loss_ratio * base["final_loss"]
    ]
    table = "; ".join(
        f"lambda {rows[lam]['lambda']:g}: loss {rows[lam]['final_loss']:.2e}, "
        f"param spread {rows[lam]['parameter_spread']:.2e}, steps {rows[lam]['test_steps']:.1f}"
        for lam in config.lambdas
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
    worst_so = float(np.max(invariance["rotation_covariant_SO"]))
    least_gl = float(np.min(invariance["rotation_covariant_GL"]))
    least_eq45 = float(np.min(invariance["eq45_SO"]))
    claims.append(
        claim(
            "footnote12_invariance",
            "The Higgs kinetic term with the covariant derivative, int |(d/dt - w) b|^2, is "
            "invariant under rotation gauges G(t) in SO(d) (c = 0) and not under GL(d) gauges; "
            "Eq. 45's (d/dt + w) b term is not invariant even under rotations (largest relative "
            f"change over {config.invariance_samples} rotations of a trained unfixed model)",
            "footnote 12, Eq. 25",
            worst_so,
            worst_so < 1e-10 and least_gl > 1e-3 and least_eq45 > 1e-3,
            "SO(d) < 1e-10; GL(d) and Eq. 45 > 1e-3",
            f"smallest change under GL(d) {least_gl:.2e}; of Eq. 45 under SO(d) {least_eq45:.2e}",
        )
    )
    if "rotation_covariant" in config.arms:
        arm = rows["rotation_covariant"]
        # against the main regulariser at the same strength, or its best lambda
        same = rows.get(config.arm_lambda, best)
        cut = base["parameter_spread"] / arm["parameter_spread"]
        main_cut = base["parameter_spread"] / same["parameter_spread"]
        claims.append(
            claim(
                "footnote12_weak",
                "The rotation-covariant term is a weak regulariser: it leaves the rotation "
                "directions of the orbit free, so it cuts the across-seed parameter spread less "
                f"than {_NAMES[config.regularizer]} at lambda {same['lambda']:g}",
                "footnote 12",
                cut,
                cut < main_cut,
                f"< {main_cut:.3g} ({_NAMES[config.regularizer]})",
                f"spread {arm['parameter_spread']:.2e} (rotation-covariant, lambda "
                f"{config.arm_lambda:g}) vs {same['parameter_spread']:.2e} vs "
                f"{base['parameter_spread']:.2e} unfixed; loss {arm['final_loss']:.2e}; steps "
                f"{arm['test_steps']:.1f}",
            )
        )
    return claims


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    plt = pyplot()
    fig_dir = Path(fig_dir)
    rows, curves = results["rows"], results["curves"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    arms = results.get("arms", {})
    for lam, curve in curves.items():
        label = f"{lam}, lambda {arms[lam]['lambda']:g}" if lam in arms else f"lambda {lam}"
        axes[0].semilogy(curve, ":" if lam in arms else "-", label=label)
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
    for i, (name, arm) in enumerate(arms.items()):
        axes[1].loglog(
            [arm["lambda"]], [arm["parameter_spread"]], "*", ms=12, color=f"C{i + 2}",
            label=f"parameter spread, {name}",
        )  # fmt: skip
    axes[1].set_xlabel("lambda (leftmost point: lambda = 0)")
    axes[1].set_title(f"Across-seed spread ({_NAMES[config.regularizer]}; stars: other arms)")
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
    return [io.save_figure(fig, fig_dir / "gauge_fixing.png", close=True)]
