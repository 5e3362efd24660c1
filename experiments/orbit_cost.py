"""Adaptive-solver cost along a gauge orbit, and gauge fixing by optimisation.

A neural-ODE classifier (`gj.ODEClassifier`) is trained on a 2-D data set (`gj.train`). Its
gauge orbit (finite spatial diffeomorphisms, time reparametrisations and their composition;
each keeps the function) is swept at a measuring tolerance (`gj.sweep`): the per-lane adaptive
steps and field evaluations (NFE) give the cost distribution along the orbit and its cheapest
sampled representative (rebuilt with `gj.cheapest_lane`). Then the gauge element's parameters
(not the model's) are optimised with Adam on smooth proxies of the cost (`gj.optimise_gauge`):
the steps an ideal controller would take, estimated from the solver's error estimates
(`estimated_steps`), and the kinetic or uniform-motion functional of the transformed
trajectories. Reported: the NFE at the measuring tolerance on held-out inputs against the
trained model's, and the output deviation at a tight tolerance.
"""

import dataclasses
import math
import warnings
from pathlib import Path
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj
from gaugejax import check_choices, check_one_of, claim, gauge_search as gs, io, optimizer, pyplot

from ._training import TrainingRun


FAMILIES = ("diffeo", "reparam", "composed")
PROXIES = ("adaptive", "kinetic", "uniform_motion")
DATASETS = ("moons", "circles")
TEST_FRACTION = 0.25  # gj.load_dataset's default split


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `orbit_cost` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    dataset: str = "moons"
    num_data: int = 500
    data_noise: float = 0.1
    augment: int = 1  # zero channels appended to the 2-D inputs: state dim 2 + augment
    width: int = 16
    depth: int = 2
    t1: float = 1.0
    train_steps: int = 300
    steps_per_chunk: int = 50
    batch_size: int = 64
    learning_rate: float = 1e-2
    train_rtol: float = 1e-5
    measure_rtol: float = 1e-8
    tight_rtol: float = 1e-10
    tight_atol: float = 1e-12
    measure_max_steps: int = 4096  # solver steps allowed per solve at measure_rtol
    num_inputs: int = 32
    families: tuple[str, ...] = FAMILIES
    num_samples: int = 1000
    chunk_size: int = 16
    num_features: int = 32
    num_modes: int = 3
    rho: float = 0.5
    spread_min: float = 1.1
    optimise_family: str = "diffeo"
    proxies: tuple[str, ...] = ("adaptive", "kinetic", "uniform_motion")
    optimise_inputs: int = 32
    optimise_steps: int = 200
    optimise_lr: float = 3e-3
    optimise_chunk: int = 25
    proxy_grid: int = 32
    max_deviation: float = 1e-6

    NONNEGATIVE: ClassVar[tuple[str, ...]] = ("augment", "data_noise")

    def __post_init__(self):
        check_one_of("dataset", self.dataset, DATASETS)  # the 2-D sets
        check_choices("families", self.families, FAMILIES)
        check_choices("proxies", self.proxies, PROXIES)
        check_one_of("optimise_family", self.optimise_family, FAMILIES)
        num_test = math.ceil(TEST_FRACTION * self.num_data)  # as sklearn splits
        num_train = self.num_data - num_test
        if self.num_data < 8:
            raise ValueError(f"`num_data` must be >= 8; received {self.num_data}.")
        if self.num_inputs > num_test:
            raise ValueError(
                f"`num_inputs` must be at most the {num_test} test examples of num_data = "
                f"{self.num_data}; received {self.num_inputs}."
            )
        if self.optimise_inputs > num_train:
            raise ValueError(
                f"`optimise_inputs` must be at most the {num_train} training examples of "
                f"num_data = {self.num_data}; received {self.optimise_inputs}."
            )
        for name, chunk in (("train", self.steps_per_chunk), ("optimise", self.optimise_chunk)):
            if (steps := getattr(self, f"{name}_steps")) % chunk:
                raise ValueError(f"`{name}_steps` must be a multiple of its chunk ({chunk}): "
                                 f"checkpoints fall on chunk ends; received {steps}.")  # fmt: skip
        for name in ("rho", "max_deviation"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in (0, 1); received {getattr(self, name)}.")
        if not self.spread_min > 1:
            raise ValueError(
                f"`spread_min` (max/min NFE along the orbit) must be > 1 (a ratio <= 1 always "
                f"holds); received {self.spread_min}."
            )
        if not (self.tight_rtol < self.measure_rtol and self.tight_atol < self.measure_rtol):
            raise ValueError(
                f"`tight_rtol` and `tight_atol` must be below measure_rtol = "
                f"{self.measure_rtol:g} (the output deviation is measured tighter than the "
                f"cost); received {self.tight_rtol:g}, {self.tight_atol:g}."
            )
        if self.measure_rtol > self.train_rtol:
            warnings.warn(
                f"measure_rtol = {self.measure_rtol:g} is looser than train_rtol = "
                f"{self.train_rtol:g}: the orbit's costs are then measured at a tolerance the "
                "model was not trained at (its outputs there carry more solver error than in "
                "training); the comparison needs measure_rtol <= train_rtol.",
                stacklevel=2,
            )


def _at(node: gj.NeuralODE, rtol: float, atol: float, **options) -> gj.NeuralODE:
    # array tolerances: the measuring and the tight model share every compiled program
    pid = diffrax.PIDController(rtol=jnp.asarray(rtol), atol=jnp.asarray(atol))
    return node.with_options(stepsize_controller=pid, **options)


def _classifier(cfg: Config, key) -> gj.ODEClassifier:
    """An MLP field on the input padded with zeros, read out linearly: the gauge acts on the
    node alone. Float tolerances while training (arrays would be trained leaves)."""
    train = diffrax.PIDController(rtol=cfg.train_rtol, atol=cfg.train_rtol)
    return gj.ODEClassifier.mlp(2, 2, key=key, augment=cfg.augment, width=cfg.width,
                                depth=cfg.depth, t1=cfg.t1, stepsize_controller=train)  # fmt: skip


def _families(cfg: Config, key) -> dict:
    dim = 2 + cfg.augment
    diffeo = gj.SpatialDiffeoGauge(dim, cfg.t1, key=key, num_features=cfg.num_features, rho=cfg.rho)
    reparam = gj.TimeReparamGauge(cfg.t1, num_modes=cfg.num_modes, rho=cfg.rho)
    return {"diffeo": diffeo, "reparam": reparam, "composed": gj.ComposedGauge(diffeo, reparam)}


_LABELS = dict(diffeo="spatial diffeomorphisms", reparam="time reparametrisations",
               composed="diffeomorphism then reparametrisation")  # fmt: skip
_PROXY_LABELS = dict(adaptive="estimated adaptive steps", kinetic="kinetic energy",
                     uniform_motion="uniform-motion functional")  # fmt: skip


@eqx.filter_jit
def _trajectories(model: gj.NeuralODE, xs, ts):
    """`x(ts)` of every input, one solve each: (n, len(ts), d)."""
    return jax.vmap(lambda x: model.solve(x, saveat=diffrax.SaveAt(ts=ts))[0])(xs)


def run(config: Config, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    arms = list(config.proxies)
    steps = config.train_steps + len(config.families) * config.num_samples
    steps += len(arms) * config.optimise_steps
    with TrainingRun("orbit_cost", config, run_dir, steps) as tr:
        cfg_dict = dataclasses.asdict(config)
        k_init, k_train, k_gauge, k_sweep = jax.random.split(jax.random.key(config.seed), 4)
        data = gj.load_dataset(
            config.dataset, seed=config.seed, num_samples=config.num_data, noise=config.data_noise
        )
        # 1. the trained classifier (checkpointed: a killed run resumes inside training)
        adam, batches = optimizer("adam", config.learning_rate), data.batch_fn(config.batch_size)
        with tr.stage("training", config.train_steps) as on_chunk:
            trained = gj.train(gj.classification_loss, _classifier(config, k_init), adam,
                               batches, key=k_train, num_steps=config.train_steps,
                               steps_per_chunk=config.steps_per_chunk,
                               checkpoint_every=config.steps_per_chunk, run_dir=run_dir / "train",
                               config=cfg_dict, on_chunk=on_chunk)  # fmt: skip
        clf = trained.model
        measure = _at(
            clf.node, config.measure_rtol, config.measure_rtol, max_steps=config.measure_max_steps
        )
        tight = _at(clf.node, config.tight_rtol, config.tight_atol)
        inputs = jax.vmap(clf.initial_state)(data.x_test[: config.num_inputs])
        opt_inputs = jax.vmap(clf.initial_state)(data.x_train[: config.optimise_inputs])
        families = _families(config, k_gauge)
        any_family = families[config.families[0]]
        base = gs.element_cost(measure, any_family, any_family.identity(), inputs)
        affine, affine_row = _affine_null(config, measure, inputs)
        # 2. the orbit: one sweep per family (saved: a resumed run loads finished ones)
        sweeps = _sweeps(config, run_dir, tr, measure, families, inputs, k_sweep, base)
        # 3. gauge fixing by optimisation: the element's parameters, the model fixed
        gauge = families[config.optimise_family]
        ts = jnp.linspace(0.0, config.t1, 41)
        models, both = (measure, tight), (inputs, opt_inputs)
        optimised = {p: _optimise(config, tr, p, models, gauge, both, base, ts) for p in arms}
        # through the identity element: the same program as the transformed trajectories
        original = np.asarray(_trajectories(gauge.act(gauge.identity(), tight), inputs[:8], ts))
        accuracy = float(clf.evaluate(data.x_test, data.y_test)["accuracy"])
        base_nfe = base.reference_evaluations
        results = dict(accuracy=accuracy, train_curve=[r["loss"] for r in trained.history],
                       base_nfe=base_nfe, base_steps=base.reference_steps, sweeps=sweeps,
                       optimised=optimised, affine=affine, ts=ts,
                       original_trajectories=original)  # fmt: skip
        big = ("nfe", "trajectories", "objective_curve")  # kept out of the one-line records
        records = [{"family": n, **s} for n, s in sweeps.items()]
        records += [{"proxy": p, **o} for p, o in optimised.items()]
        records = [{k: v for k, v in r.items() if k not in big} for r in records]
        claims = _claims(config, sweeps, optimised, base_nfe, accuracy) + [affine_row]
        # every key derives from `seed`: split(key(seed), 4) -> (init, train, gauge features,
        # sweeps; fold_in(sweeps, family index)); the data set, its split and the affine null's
        # matrix use `seed` too
        seeds = {"seed": config.seed, "data_seed": config.seed}
        return tr.finish(results, plot, records, claims, config=cfg_dict, seeds=seeds)


def _affine_null(cfg: Config, measure: gj.NeuralODE, inputs) -> tuple[dict, dict]:
    """A constant gauge `x = A y + b`, `s = 3 t` (cond(A) = 10, from `seed`) on the test inputs:
    with the norm pulled back at rtol 0 and a fixed dt0; with the model's own controller; the
    time scale alone (the automatic first step is not scale-covariant). Records and claim."""
    dim, rng = 2 + cfg.augment, np.random.default_rng(cfg.seed)
    A = np.linalg.qr(rng.normal(size=(dim, dim)))[0] * np.logspace(-0.5, 0.5, dim)
    gauge = dict(shift=rng.normal(size=dim), time_scale=3.0)
    exact = _at(measure, 0.0, cfg.measure_rtol, dt0=cfg.t1 / 16)
    same, own, time = (gj.affine_step_report(m, inputs, a, **kw) for m, a, kw in (
        (exact, A, gauge), (measure, A, dict(pull_back_norm=False, **gauge)),
        (measure, np.eye(dim), dict(time_scale=3.0))))  # fmt: skip
    ok = same.same_steps and same.status == "successful" and same.max_rel < 1e-10
    row = claim("affine_null", "A constant affine gauge (x = A y + b, cond(A) = 10, s = 3 t) "
                "moves an adaptive Runge-Kutta solve only through its error norm: pulled back "
                "through A (rtol 0, dt0 fixed), every test input takes the trained model's steps",
                "RK = affine-equivariant (McLachlan et al. 2016)", same.ratio, ok,
                "same steps, NFE ratio 1, outputs to 1e-10",
                f"NFE {same.gauged_evaluations} vs {same.plain_evaluations}, outputs "
                f"{same.max_rel:.1e}; the model's own controller (RMS norm of A e, rtol > 0): "
                f"{own.ratio:.3f}x; the time scale alone {time.ratio:.3f}x (diffrax's automatic "
                "first step is not scale-covariant)")  # fmt: skip
    keep = ("plain_evaluations", "gauged_evaluations", "ratio", "same_steps", "max_rel", "status")
    reports = {"pulled_back": same, "own_norm": own, "time_only": time}
    return {n: {k: getattr(r, k) for k in keep} for n, r in reports.items()}, row


def _sweeps(config: Config, run_dir: Path, tr, measure, families, inputs, k_sweep, base) -> dict:
    """Per family: the NFE along its orbit (`gj.sweep`), its cheapest lane rebuilt, measured."""
    base_nfe = base.reference_evaluations
    sweeps = {}
    for i, name in enumerate(config.families):
        gauge, key = families[name], jax.random.fold_in(k_sweep, i)
        path = run_dir / "sweeps" / f"{name}.json"
        if path.exists():
            result = gj.SweepResult.load(path)
        else:
            result = gj.sweep(
                measure,
                gauge,
                inputs,
                key=key,
                num_samples=config.num_samples,
                chunk_size=config.chunk_size,
            )
            result.save(path)
        tr.advance(config.num_samples, f"sweep {name}")
        nfe = result.num_evaluations[result.ok]
        if nfe.size == 0:  # nothing to measure: the family's rows fail with the reason
            sweeps[name] = {
                "summary": result.summary(),
                "nfe": nfe,
                "unsolved": f"no lane of {result.num_samples} solved (failures "
                f"{result.failures()}; measure_max_steps = {config.measure_max_steps})",
            }
            continue
        cheapest = gs.cheapest_lane(result, gauge, key)
        rebuilt = gs.element_cost(measure, gauge, cheapest.element, inputs)
        sweeps[name] = {
            "summary": result.summary(),
            "nfe": nfe,
            "nfe_min": int(nfe.min()),
            "nfe_median": float(np.median(nfe)),
            "nfe_max": int(nfe.max()),
            "spread": float(nfe.max() / nfe.min()),
            "fraction_cheaper": float(np.mean(nfe < base_nfe)),
            "cheapest": {
                "index": cheapest.index,
                "num_evaluations": cheapest.num_evaluations,
                "max_rel": cheapest.max_rel,
                "rebuilt_num_evaluations": rebuilt.num_evaluations,
                "rebuilt_max_rel": rebuilt.max_rel,
            },
        }
    return sweeps


def _optimise(config: Config, tr, proxy, models, gauge, inputs, base, ts) -> dict:
    """One arm of gauge fixing by optimisation (`gj.optimise_gauge` on `proxy`): NFE along the
    path and at its end, the output deviation at the tight tolerance, trajectories."""
    (measure, tight), (inputs, opt_inputs) = models, inputs
    objective = (
        gs.AdaptiveCostObjective(opt_inputs, config.proxy_grid)
        if proxy == "adaptive"
        else gs.TrajectoryObjective(proxy, opt_inputs)
    )
    with tr.stage(f"gauge fixing ({proxy})", config.optimise_steps) as on_chunk:
        res = gs.optimise_gauge(
            measure,
            gauge,
            objective,
            optimizer=optimizer("adam", config.optimise_lr),
            num_steps=config.optimise_steps,
            steps_per_chunk=config.optimise_chunk,
            checkpoint_every=config.optimise_chunk,
            run_dir=tr.dir / f"optimise_{proxy}",
            config={**dataclasses.asdict(config), "proxy": proxy},
            on_chunk=on_chunk,
        )
    path = [
        (step, gs.element_cost(measure, gauge, g, inputs).num_evaluations) for step, g in res.path
    ]
    final = gs.element_cost(measure, gauge, res.element, inputs)
    final_train = gs.element_cost(measure, gauge, res.element, opt_inputs)
    keys = ("num_evaluations", "num_steps", "max_rel", "max_abs", "status")
    _cost_row = lambda cost: {k: getattr(cost, k) for k in keys}  # noqa: E731
    return {
        "objective_curve": [r["loss"] for r in res.train.history],
        "initial_objective": res.initial_objective,
        "final_objective": res.final_objective,
        "path_steps": [s for s, _ in path],
        "path_nfe": [n for _, n in path],
        "final": _cost_row(final),
        "train_inputs": {
            "num_evaluations": final_train.num_evaluations,
            "reference_evaluations": final_train.reference_evaluations,
        },
        "tight": _cost_row(gs.element_cost(tight, gauge, res.element, inputs)),
        "nfe_ratio": final.num_evaluations / base.reference_evaluations,
        "trajectories": np.asarray(_trajectories(gauge.act(res.element, tight), inputs[:8], ts)),
    }


def _family_row(n: str, s: dict, base_nfe: int) -> str:
    if "unsolved" in s:
        return f"{n}: {s['unsolved']}"
    return (
        f"{n}: NFE {s['nfe_min']}/{s['nfe_median']:.0f}/{s['nfe_max']} (min/median/max), "
        f"cheapest lane #{s['cheapest']['index']} at {s['cheapest']['num_evaluations']} "
        f"({s['cheapest']['num_evaluations'] / base_nfe:.3f}x, deviation "
        f"{s['cheapest']['max_rel']:.1e}; its rebuilt element "
        f"{s['cheapest']['rebuilt_num_evaluations']}), {100 * s['fraction_cheaper']:.1f}% of "
        "lanes cheaper than the trained model"
    )


def _claims(cfg: Config, sweeps: dict, optimised: dict, base_nfe: int, accuracy: float) -> list:
    table = "; ".join(_family_row(n, s, base_nfe) for n, s in sweeps.items())
    # a family with no solved lane has no NFE and no deviation: NaN, which fails both rows
    # (the spread too, although an aim: nothing was measured, so nothing was missed)
    unsolved = [f"{n}: {s['unsolved']}" for n, s in sweeps.items() if "unsolved" in s]
    spread = math.nan if unsolved else min(s["spread"] for s in sweeps.values())
    verdicts = {n: s["summary"]["verdict"] for n, s in sweeps.items()}
    deviation = math.nan if unsolved else max(s["summary"]["max_rel_max"] for s in sweeps.values())
    found = "; ".join([", ".join(f"{n}: {v}" for n, v in verdicts.items()), *unsolved])
    rows = [
        claim("orbit_keeps_function", "Every swept family keeps the trained classifier's x(T) "
              f"({cfg.num_samples} samples per family, {cfg.num_inputs} test inputs, rtol "
              f"{cfg.measure_rtol:g})", "Eq. 13-20", deviation,
              all(v == "holds" for v in verdicts.values()),
              "sweep verdict 'holds' for every family", f"{found}; test accuracy {accuracy:.3f}"),
        claim("orbit_nfe_spread", "The adaptive solver's cost varies measurably along one gauge "
              f"orbit (max/min NFE over the sampled elements, smallest over {len(sweeps)} "
              "families)", "Sec. 2 (gauge freedom)", spread, spread >= cfg.spread_min,
              f">= {cfg.spread_min:g}", f"trained model NFE {base_nfe}; " + table,
              aim=not unsolved),  # the aims, not claims of the paper
    ]  # fmt: skip
    for proxy, o in optimised.items():
        ratio, dev, final, tight = o["nfe_ratio"], o["tight"]["max_rel"], o["final"], o["tight"]
        ok = "successful" == final["status"] == tight["status"] and ratio < 1
        rows.append(claim(
            f"gauge_fixing_{proxy}", f"Gauge fixing by optimisation ({_PROXY_LABELS[proxy]}, "
            f"{_LABELS[cfg.optimise_family]}, Adam {cfg.optimise_steps} steps) lowers the NFE on "
            "held-out inputs at identical outputs", "Sec. 5 (gauge fixing)", ratio,
            ok and dev < cfg.max_deviation, f"NFE ratio < 1 at deviation < {cfg.max_deviation:g}",
            f"NFE {final['num_evaluations']} vs {base_nfe} (test inputs), "
            f"{o['train_inputs']['num_evaluations']} vs "
            f"{o['train_inputs']['reference_evaluations']} (optimisation inputs); proxy "
            f"{o['initial_objective']:.4g} -> {o['final_objective']:.4g}; output deviation "
            f"{dev:.1e} relative ({tight['max_abs']:.1e} absolute) at rtol {cfg.tight_rtol:g}, "
            f"atol {cfg.tight_atol:g}", aim=True))  # fmt: skip
    return rows


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    plt = pyplot()
    fig_dir, out = Path(fig_dir), []
    base, sweeps, inputs = results["base_nfe"], results["sweeps"], config.num_inputs
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), squeeze=False)
    all_nfe = np.concatenate([np.asarray(s["nfe"], float) for s in sweeps.values()] + [[base]])
    lo, hi = all_nfe.min(), all_nfe.max()
    step = 6  # Tsit5: 6 evaluations per attempted step (per input)
    bins = np.arange(lo - step / 2, hi + step, step) if hi - lo < 60 * step else 40
    for ax, (name, s) in zip(axes[0], sweeps.items(), strict=True):
        ax.hist(s["nfe"], bins=bins, color="tab:blue", alpha=0.75)
        ax.axvline(base, color="k", ls="--", label=f"trained model ({base})")
        if "unsolved" in s:  # an empty histogram, saying why
            ax.text(0.5, 0.5, "no solved lane", transform=ax.transAxes, ha="center")
        else:
            ax.axvline(s["nfe_min"], color="tab:purple", ls=":", label=f"cheapest ({s['nfe_min']})")
        ax.set_title(f"{_LABELS[name]}\n({len(s['nfe'])} samples)", fontsize=9)
        ax.set_xlabel(f"NFE over {inputs} test inputs")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("samples")
    title = f"Adaptive cost along one gauge orbit (Tsit5, rtol {config.measure_rtol:g})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.append(io.save_figure(fig, fig_dir / "nfe_distribution.png", close=True))

    opt = results["optimised"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for proxy, o in opt.items():
        curve = np.asarray(o["objective_curve"], float)
        axes[0].plot(curve / curve[0], label=_PROXY_LABELS[proxy])
        axes[1].plot(o["path_steps"], o["path_nfe"], "o-", label=_PROXY_LABELS[proxy])
    axes[0].set(xlabel="optimiser step", ylabel="proxy / proxy at the trained model",
                title="Proxy during gauge optimisation")  # fmt: skip
    axes[1].axhline(base, color="k", ls="--", label="trained model")
    solved = [s["nfe_min"] for s in sweeps.values() if "unsolved" not in s]
    if solved:
        axes[1].axhline(min(solved), color="tab:purple", ls=":", label="cheapest sampled element")
    axes[1].set(xlabel="optimiser step (checkpoints)", ylabel=f"NFE over {inputs} test inputs",
                title=f"Measured NFE (rtol {config.measure_rtol:g})")  # fmt: skip
    first = next(iter(opt))
    orig = np.asarray(results["original_trajectories"], float)
    moved = np.asarray(opt[first]["trajectories"], float)
    for i in range(orig.shape[0]):
        axes[2].plot(orig[i, :, 0], orig[i, :, 1], "-", color="tab:blue", alpha=0.7)
        axes[2].plot(moved[i, :, 0], moved[i, :, 1], "--", color="tab:red", alpha=0.7)
        axes[2].plot(orig[i, 0, 0], orig[i, 0, 1], "k.", ms=4)
        axes[2].plot(orig[i, -1, 0], orig[i, -1, 1], "kx", ms=5)
    axes[2].plot([], [], "-", color="tab:blue", label="trained model x(t)")
    axes[2].plot([], [], "--", color="tab:red", label=f"optimised gauge y(t) ({first})")
    axes[2].set(xlabel="state 1", ylabel="state 2",
                title="Trajectories (dots: x(0), crosses: x(T), shared)")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out.append(io.save_figure(fig, fig_dir / "gauge_optimisation.png", close=True))
    return out
