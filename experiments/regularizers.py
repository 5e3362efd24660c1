"""Regularisers head to head on real data: test-time solver cost of neural-ODE classifiers.

A neural-ODE classifier (`gj.ODEClassifier`: an MLP field on the input padded with zeros, a
linear read-out) is trained on each data set with fixed-step RK4 (as RNODE trains) under each
arm: no regulariser; RNODE's kinetic energy; the Jacobian Frobenius norm (Hutchinson, one probe
fixed per solve); both; the uniform-motion (gauge-fixing, Eq. 43) functional; uniform motion
plus kinetic; TayNODE's third derivative (R_3); STEER (a random end time in training); the
solver's own local error estimate (Pal et al.; it trains with Dopri5 at the same fixed steps:
RK4 has no error estimate). Every arm has the same seeds, steps and data; the regularisers
ride along in the training solve (`gj.integrate_regularizers`). `weight_scales` makes the
frontier: every weighted arm trains at each multiple of its weights. Test time uses an
adaptive Dopri5 at `test_rtol`: accuracy, steps and field evaluations per example, inference
and training wall time (compile time apart), and the size of every regulariser. Seeds train
together as one stacked model (`gj.stack_models`: Adam is elementwise, so the summed loss
trains them independently).
"""

import dataclasses
import functools
import math
import timeit
from pathlib import Path
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj
from gaugejax import check_choices, claim, io, optimizer, pyplot

from ._training import TrainingRun


# arm -> its regularisers (each weighted by the config's `<term>_weight`), joined by "+"
_WEIGHTED = ("kinetic", "jacobian", "kinetic+jacobian", "uniform_motion", "uniform_motion+kinetic")
ARMS = {"none": (), **{a: tuple(a.split("+")) for a in (*_WEIGHTED, "r3", "steer", "local_error")}}
WEIGHTLESS = ("none", "steer")  # STEER's knob is its half-width, not a weight


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `regularizers` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    datasets: tuple[str, ...] = ("digits", "moons")
    arms: tuple[str, ...] = ("none", *_WEIGHTED)  # the frontier preset adds the other three
    num_seeds: int = 3
    # RNODE's weights on MNIST (lambda_K = lambda_J = 0.01); the same for uniform motion (>= 0,
    # `NONNEGATIVE`: a negative weight would reward the regulariser)
    kinetic_weight: float = 0.01
    jacobian_weight: float = 0.01
    uniform_motion_weight: float = 0.01
    r3_weight: float = 0.01
    # the fixed-step Dopri5 estimates are ~1e-10 to 1e-8 per solve (moons, 8 steps): a weight
    # that makes the term a fraction of the loss
    local_error_weight: float = 1e6
    steer_width: float = 0.5  # STEER's half-width b: T ~ U[t1 - b, t1 + b] in training
    # the frontier: every weighted arm trains at each of these multiples of its weights (a
    # run per multiple, named "arm@3x"); empty: once, at the weights above
    weight_scales: tuple[float, ...] = ()
    augment: int = 4
    width: int = 48
    depth: int = 2
    t1: float = 1.0
    train_solver_steps: int = 8  # fixed RK4 steps of a training solve
    num_steps: int = 400  # optimiser steps per arm
    steps_per_chunk: int = 80  # a checkpoint each: the NFE-over-training curve reads them
    learning_rate: float = 3e-3
    batch_size: int = 64
    test_rtol: float = 1e-5  # Dopri5, rtol = atol
    max_test_steps: int = 4096
    # test examples of the NFE-over-training curve, at most (all: the test evaluation's program)
    curve_examples: int = 1000
    trajectory_examples: int = 60  # of the 2-D task's figure
    moons_samples: int = 1000
    moons_noise: float = 0.1
    # the aims: at least this many times fewer test evaluations...
    nfe_reduction: float = 2.0
    # ...at no more than this loss of test accuracy (a fraction: 0.01 = 1 percentage point)
    accuracy_drop: float = 0.01

    # every term's weight (STEER has none); `curve_examples = 0`: no NFE-over-training curve
    NONNEGATIVE: ClassVar[tuple[str, ...]] = (
        *(f"{t}_weight" for t in gj.TRAJECTORY_TERMS if t != "steer"),
        *("augment", "accuracy_drop", "curve_examples"),
    )

    def __post_init__(self):
        check_choices("datasets", self.datasets, gj.DATASETS)
        check_choices("arms", self.arms, ARMS, required=("none",))  # the baseline
        if not 0 < self.steer_width < self.t1 or any(w <= 0 for w in self.weight_scales):
            raise ValueError(
                f"`steer_width` must be in (0, t1 = {self.t1:g}) and every `weight_scales` "
                f"> 0; received {self.steer_width!r} and {list(self.weight_scales)}."
            )
        if self.curve_examples > 0 and self.num_steps % self.steps_per_chunk:
            raise ValueError(
                f"`num_steps` ({self.num_steps}) must be a multiple of `steps_per_chunk` "
                f"({self.steps_per_chunk}): the NFE curve reads a checkpoint per chunk."
            )


def _program_terms(arm: str) -> tuple[str, ...]:
    """An arm's terms plus the kinetic one: arms that differ only by it share one compiled
    program (3 per data set, not 6). Its integrand is one sum of squares per evaluation, and at
    weight 0 (traced) it adds exact zeros to the loss and gradient: the arm trains as without."""
    return tuple(t for t in gj.TRAJECTORY_TERMS if t == "kinetic" or t in ARMS[arm])


class _Batches(eqx.Module):
    """`key -> (x, y, probe_key)`: a batch and the key of its Hutchinson probes (one a solve)."""

    data: gj.Dataset
    batch_size: int = eqx.field(static=True)

    def __call__(self, key):
        kb, kp = jax.random.split(key)
        x, y = self.data.batch(kb, self.batch_size)
        return x, y, kp


def _runs(cfg: Config) -> list[tuple[str, str, float]]:
    """`(name, arm, weight scale)` of every training run: each arm once at its weights, or,
    with `weight_scales`, each weighted arm once per scale (the baseline and STEER once)."""
    return [
        (arm if arm in WEIGHTLESS or not cfg.weight_scales else f"{arm}@{s:g}x", arm, s)
        for arm in cfg.arms
        for s in ((1.0,) if arm in WEIGHTLESS or not cfg.weight_scales else cfg.weight_scales)
    ]


def _training_model(cfg: Config, arm: str, init):
    """The stacked classifiers as `arm` trains them: STEER solves past t1 (its fixed steps of
    t1 / n cover t1 + b), the local-error arm with Dopri5 (an error estimate) at those steps."""
    if arm == "steer":
        n = math.ceil(cfg.train_solver_steps * (cfg.t1 + cfg.steer_width) / cfg.t1)
        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=n)
        return init.with_node(init.node.with_options(max_steps=n, adjoint=adjoint))
    if arm == "local_error":
        return init.with_node(init.node.with_options(solver=diffrax.Dopri5()))
    return init


class _SeedLoss(eqx.Module):
    """One seed's mean cross-entropy and mean of each regulariser `terms`, all from one
    fixed-step solve per example (`(loss, terms)`; `gj.StackedLoss` sums them over seeds)."""

    terms: tuple[str, ...] = eqx.field(static=True)
    steer_width: float = eqx.field(static=True)

    def __call__(self, clf, batch):
        x, y, probe_key = batch

        def one(xi, k):
            z1, integrals = gj.integrate_regularizers(
                clf.node, clf.initial_state(xi), self.terms, key=k, steer_width=self.steer_width
            )
            return clf.readout(z1), integrals

        logits, integrals = jax.vmap(one)(x, jax.random.split(probe_key, x.shape[0]))
        return gj.cross_entropy(logits, y), {t: jnp.mean(v) for t, v in integrals.items()}


def _models(cfg: Config, data: gj.Dataset, key):
    sizes = dict(augment=cfg.augment, width=cfg.width, depth=cfg.depth, t1=cfg.t1)
    opts = gj.fixed_steps(cfg.train_solver_steps, cfg.t1)
    make = functools.partial(gj.ODEClassifier.mlp, data.num_features, data.num_classes)
    return gj.stack_models(
        lambda k: make(key=k, **sizes, **opts), jax.random.split(key, cfg.num_seeds)
    )


def _adaptive(cfg: Config, models):
    """The (stacked) classifiers with the test-time solver (failures reported, not raised)."""
    opts = gj.adaptive(cfg.test_rtol, max_steps=cfg.max_test_steps)
    return models.with_node(models.node.with_options(**opts, throw=False))


@eqx.filter_jit
def _evaluate(models, x, y):
    """Per seed: accuracy and solver cost (`gj.ODEClassifier.evaluate`)."""
    return eqx.filter_vmap(lambda clf: clf.evaluate(x, y))(models)


@eqx.filter_jit
def _sizes(models, x, key, terms):
    """Per seed: each regulariser `terms`' mean over `x`, integrated with the training solver."""
    keys = jax.random.split(key, x.shape[0])

    def one_seed(clf):
        def one(xi, k):
            return gj.integrate_regularizers(clf.node, clf.initial_state(xi), terms, key=k)[1]

        return {t: jnp.mean(v) for t, v in jax.vmap(one)(x, keys).items()}

    return eqx.filter_vmap(one_seed)(models)


@eqx.filter_jit
def _trajectories(clf, x, ts):
    """States `z(ts)` of one classifier for inputs `x`, from one solve each: (len(ts), n, d+a)."""
    saveat = diffrax.SaveAt(ts=ts)
    zs = jax.vmap(lambda xi: clf.node.solve(clf.initial_state(xi), saveat=saveat)[0])(x)
    return jnp.swapaxes(zs, 0, 1)


def _train_arm(cfg, arm, scale, data, init, key, run_dir, on_chunk) -> gj.TrainResult:
    terms = _program_terms(arm)
    weighted = [t for t in terms if t != "steer"]  # STEER has no integral to weight
    weights = {t: scale * getattr(cfg, f"{t}_weight") * (t in ARMS[arm]) for t in weighted}
    return gj.train(
        gj.StackedLoss(_SeedLoss(terms, cfg.steer_width)),
        _training_model(cfg, arm, init),
        optimizer("adam", cfg.learning_rate),
        _Batches(data, cfg.batch_size),
        key=key,
        num_steps=cfg.num_steps,
        steps_per_chunk=cfg.steps_per_chunk,
        checkpoint_every=cfg.steps_per_chunk,  # a killed run resumes inside the arm
        regularizers={t: (w, None) for t, w in weights.items()},
        run_dir=run_dir,
        config={**dataclasses.asdict(cfg), "dataset": data.name, "arm": arm, "scale": scale},
        on_chunk=on_chunk,
    )


def _nfe_curve(cfg, arm_dir: Path, init, x, y) -> list[dict]:
    """Test accuracy and evaluations per example at every checkpoint of an arm."""
    params, static = eqx.partition(init, eqx.is_inexact_array)
    like = (params, optimizer("adam", cfg.learning_rate).init(params))
    out = []
    for path in sorted((arm_dir / "checkpoints").glob("step_*.eqx")):
        step, (p, _) = gj.read_checkpoint(path, like)
        ev = jax.device_get(_evaluate(_adaptive(cfg, eqx.combine(p, static)), x, y))
        means = {k: float(np.mean(ev[k])) for k in ("evaluations", "accuracy")}
        out.append({"step": step, **means})
    return out


def _arm_row(cfg: Config, arm: str, data, res, arm_dir: Path, init, k_size) -> dict:
    """An arm's numbers: training time and curves; at test time the adaptive solver's accuracy
    and cost, inference wall time (compiled, best of 5), the regulariser sizes and the NFE
    curve over training."""
    # one `seconds` value per chunk (its mean step time). The slowest chunk is the one that
    # compiled (the first arm of a program): the median of the others is the compile-free step
    # time (a resumed run compiles once more; with >= 5 chunks the median still leaves it out)
    chunks = np.sort([r["seconds"] for r in res.history[:: cfg.steps_per_chunk]])
    step_s = float(np.median(chunks[:-1])) if len(chunks) > 1 else float(chunks[0])
    logged = ("loss", *(t for t in ARMS[arm] if t != "steer"))
    curve = {t: [r[t] / cfg.num_seeds for r in res.history] for t in logged}
    test_models = _adaptive(cfg, res.model)
    x, y = data.x_test, data.y_test
    ev = jax.device_get(_evaluate(test_models, x, y))
    timed = lambda: jax.block_until_ready(_evaluate(test_models, x, y))  # noqa: E731
    # compiled above. The best of 5 timings of >= 0.1 s each, as timeit advises: on a shared
    # machine (load 15 on 2 cores) the median of 3 single calls moved the moons ratio from 0.52
    # to 0.99, and calls of ~1 ms (the smoke preset) are scheduler noise
    number = max(1, math.ceil(0.1 / timeit.timeit(timed, number=1)))
    wall = min(timeit.repeat(timed, number=number, repeat=5)) / number
    # RNODE's and Eq. 43's terms, and R_3 when an arm trains it (the others are a solver's)
    terms = ("kinetic", "jacobian", "uniform_motion", *(("r3",) * ("r3" in cfg.arms)))
    sizes = jax.device_get(_sizes(res.model, x, k_size, terms))
    n = min(cfg.curve_examples, x.shape[0])
    return {
        "accuracy": float(np.mean(ev["accuracy"])),
        "accuracy_per_seed": ev["accuracy"],
        "steps": float(np.mean(ev["steps"])),
        "max_steps": int(np.max(ev["max_steps"])),
        "evaluations": float(np.mean(ev["evaluations"])),
        "evaluations_per_seed": ev["evaluations"],
        "failed_solves": int(np.sum(ev["failed"])),
        "inference_s_per_example": wall / (cfg.num_seeds * x.shape[0]),
        "train_step_s": step_s,
        "train_time_s": step_s * cfg.num_steps,
        "compile_s": max(0.0, float(chunks[-1] - step_s) * cfg.steps_per_chunk),
        "final_loss": curve["loss"][-1],
        "regularizer_sizes": {t: float(np.mean(v)) for t, v in sizes.items()},
        "training_curve": curve,
        "nfe_curve": _nfe_curve(cfg, arm_dir, init, x[:n], y[:n]) if n else [],
    }


def run(config: Config, run_dir: Path) -> dict:
    steps = len(config.datasets) * len(_runs(config)) * config.num_steps
    with TrainingRun("regularizers", config, run_dir, steps) as tr:
        root = jax.random.key(config.seed)
        results = {}
        for d_index, name in enumerate(config.datasets):
            data = gj.load_dataset(
                name, seed=config.seed, num_samples=config.moons_samples, noise=config.moons_noise
            )
            k_init, k_train, k_size = jax.random.split(jax.random.fold_in(root, d_index), 3)
            init = _models(config, data, k_init)
            arms, trajectories = {}, {}
            # the 2-D task: trajectories of seed 0 of every arm at 20 times in (0, t1]
            n_traj = min(config.trajectory_examples, data.x_test.shape[0])
            ts = config.t1 * jnp.linspace(0.0, 1.0, 21)[1:]
            for run_name, arm, scale in _runs(config):
                arm_dir = tr.dir / name / run_name
                with tr.stage(f"{name} {run_name}", config.num_steps) as on_chunk:
                    res = _train_arm(config, arm, scale, data, init, k_train, arm_dir, on_chunk)
                row = _arm_row(config, arm, data, res, arm_dir, init, k_size)
                arms[run_name] = {"arm": arm, "weight_scale": scale, **row}
                if data.num_features == 2 and n_traj and scale == 1.0:  # a panel per arm
                    seed0 = gj.unstack_model(_adaptive(config, res.model), 0)
                    trajectories[arm] = np.asarray(_trajectories(seed0, data.x_test[:n_traj], ts))
            results[name] = {"arms": arms, "num_test": int(data.x_test.shape[0])}
            if trajectories:
                labels, inputs = np.asarray(data.y_test[:n_traj]), np.asarray(data.x_test[:n_traj])
                results[name].update(trajectories=trajectories, trajectory_labels=labels,
                                     trajectory_inputs=inputs)  # fmt: skip
        claims = [c for name, entry in results.items() for c in _claims(config, name, entry)]
        records = [  # one line per arm: its numbers without the curves
            {"dataset": name, "run": run, **{k: v for k, v in row.items() if "curve" not in k}}
            for name, entry in results.items()
            for run, row in entry["arms"].items()
        ]
        return tr.finish(results, plot, records, claims)


def _claims(cfg: Config, name: str, entry: dict) -> list[dict]:
    arms = entry["arms"]
    base = arms["none"]
    rows = {
        arm: (base["evaluations"] / row["evaluations"], base["accuracy"] - row["accuracy"])
        for arm, row in arms.items()
        if arm != "none"
    }
    table = "; ".join(
        f"{arm}: acc {row['accuracy']:.3f}, NFE {row['evaluations']:.1f}, "
        f"{1e3 * row['inference_s_per_example']:.2f} ms/example, train "
        f"{1e3 * row['train_step_s']:.1f} ms/step"
        for arm, row in arms.items()
    )
    within = {arm: r for arm, r in rows.items() if r[1] <= cfg.accuracy_drop}
    out = [
        claim(
            f"{name}_learns",
            f"The unregularised neural-ODE classifier learns {name} (mean test accuracy over "
            f"{cfg.num_seeds} seeds, {entry['num_test']} test examples)",
            "RNODE baseline",
            base["accuracy"],
            base["accuracy"] >= 0.9,
            ">= 0.9",
            f"per seed {np.round(base['accuracy_per_seed'], 3).tolist()}",
        )
    ]
    if not rows:
        return out
    best = max(within, key=lambda a: within[a][0]) if within else None
    reduction = within[best][0] if best else max(r[0] for r in rows.values())
    out.append(
        claim(
            f"{name}_nfe_reduction",
            f"Some regulariser cuts the test-time field evaluations per example by >= "
            f"{cfg.nfe_reduction:g}x at <= {100 * cfg.accuracy_drop:g} pp accuracy loss "
            f"(Dopri5, rtol {cfg.test_rtol:g})",
            "RNODE, Eq. 43",
            reduction,
            best is not None and reduction >= cfg.nfe_reduction,
            f">= {cfg.nfe_reduction:g}x at <= {100 * cfg.accuracy_drop:g} pp",
            (
                f"best within the accuracy budget: {best}; "
                if best
                else "no arm within the accuracy budget; measured: best reduction overall; "
            )
            + table,
            aim=True,  # the aim (RNODE, Pal et al. report such cuts), not the paper's
        )
    )
    if best is not None:
        ratio = arms[best]["inference_s_per_example"] / base["inference_s_per_example"]
        out.append(
            claim(
                f"{name}_wall_time",
                f"Fewer evaluations are faster inference in wall time ({best} vs none, "
                "compiled, best of 5 timings)",
                "RegNeuralDE #22",
                ratio,
                ratio < 1.0,
                "< 1",
                f"{1e3 * arms[best]['inference_s_per_example']:.3f} vs "
                f"{1e3 * base['inference_s_per_example']:.3f} ms per example; NFE "
                f"{arms[best]['evaluations']:.1f} vs {base['evaluations']:.1f}",
                aim=True,
            )
        )
    return out


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    plt = pyplot()
    fig_dir = Path(fig_dir)
    out = []
    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 8.5), squeeze=False)
    for j, name in enumerate(names):
        runs = results[name]["arms"]
        colour = {a: f"C{i}" for i, a in enumerate(dict.fromkeys(r["arm"] for r in runs.values()))}
        ax = axes[0, j]
        for arm, c in colour.items():  # an arm's runs joined in the order of their weights
            mine = sorted((r["weight_scale"], r) for r in runs.values() if r["arm"] == arm)
            nfe = np.array([r["evaluations_per_seed"] for _, r in mine], dtype=float)
            acc = 100 * np.array([r["accuracy_per_seed"] for _, r in mine], dtype=float)
            ax.scatter(nfe.ravel(), acc.ravel(), color=c, alpha=0.35, s=14)
            ax.plot(nfe.mean(1), acc.mean(1), "*-", color=c, ms=12, mec="k", label=arm)
            for (scale, _), x, y in zip(mine, nfe.mean(1), acc.mean(1), strict=True):
                ax.annotate(f"{scale:g}x" * (len(mine) > 1), (x, y), fontsize=6)
        nfe, acc = (np.array([r[k] for r in runs.values()]) for k in ("evaluations", "accuracy"))
        front = gj.pareto_front(nfe, acc)
        ax.step(nfe[front], 100 * acc[front], "ko--", where="post", lw=1, mfc="none", ms=16,
                label="Pareto front (means)")  # fmt: skip
        ax.set(xscale="log", ylabel="test accuracy (%)",
               xlabel=f"test field evaluations per example (Dopri5, rtol {config.test_rtol:g})",
               title=f"{name}: accuracy against cost (dots: seeds, stars: means)")  # fmt: skip
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for run, row in runs.items():  # each arm at its weights (scale 1)
            if row["nfe_curve"] and row["weight_scale"] == 1.0:
                curve = row["nfe_curve"]
                ax.plot([c["step"] for c in curve], [c["evaluations"] for c in curve], "o-",
                        color=colour[row["arm"]], label=run)  # fmt: skip
        ax.set(yscale="log", xlabel="optimiser step", ylabel="test field evaluations per example",
               title=f"{name}: solver cost over training (each arm at its weights)")  # fmt: skip
        ax.legend(fontsize=7)
        for ax in axes[:, j]:
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.append(io.save_figure(fig, fig_dir / "regularizers.png", close=True))
    for name in names:
        entry = results[name]
        if "trajectories" in entry:
            nfe = {
                r["arm"]: r["evaluations"] for r in entry["arms"].values() if r["weight_scale"] == 1
            }
            panels = [
                (f"{a}\nNFE {nfe[a]:.0f} per example", t) for a, t in entry["trajectories"].items()
            ]
            out.append(gj.planar_flow_figure(
                fig_dir / f"trajectories_{name}.png", entry["trajectory_inputs"], panels,
                np.asarray(entry["trajectory_labels"]).tolist(),
                title=f"{name}: trajectories of seed 0 (colour: class; dot: z(T))",
            ))  # fmt: skip
    return out
