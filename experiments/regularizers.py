"""Regularisers head to head on real data: test-time solver cost of neural-ODE classifiers.

A neural-ODE classifier (`gj.ODEClassifier`: an MLP field on the input padded with zeros, a
linear read-out) is trained on each data set with fixed-step RK4 (as RNODE trains) under each
arm: no regulariser; RNODE's kinetic energy; the Jacobian Frobenius norm (Hutchinson, one probe
fixed per solve); both; the uniform-motion (gauge-fixing, Eq. 43) functional; uniform motion
plus kinetic. Every arm has the same seeds, steps and data; the regularisers ride along in the
training solve (`gj.integrate_regularizers`). Test time uses an adaptive Dopri5 at `test_rtol`:
accuracy, steps and field evaluations per example, inference and training wall time (compile
time apart), and the size of every regulariser. Seeds train together as one stacked model
(`gj.stack_models`: Adam is elementwise, so the summed loss trains them independently).
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


# arm -> its regularisers (each weighted by the config's `<term>_weight`)
ARMS = {
    "none": (),
    "kinetic": ("kinetic",),
    "jacobian": ("jacobian",),
    "kinetic+jacobian": ("kinetic", "jacobian"),
    "uniform_motion": ("uniform_motion",),
    "uniform_motion+kinetic": ("uniform_motion", "kinetic"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `regularizers` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    datasets: tuple[str, ...] = ("digits", "moons")
    arms: tuple[str, ...] = tuple(ARMS)
    num_seeds: int = 3
    # RNODE's weights on MNIST (lambda_K = lambda_J = 0.01); the same for uniform motion (>= 0,
    # `NONNEGATIVE`: a negative weight would reward the regulariser)
    kinetic_weight: float = 0.01
    jacobian_weight: float = 0.01
    uniform_motion_weight: float = 0.01
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

    NONNEGATIVE: ClassVar[tuple[str, ...]] = (
        "kinetic_weight",
        "jacobian_weight",
        "uniform_motion_weight",
        "augment",
        "accuracy_drop",
    )

    def __post_init__(self):
        check_choices("datasets", self.datasets, gj.DATASETS)
        check_choices("arms", self.arms, ARMS, required=("none",))  # the baseline
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


class _SeedLoss(eqx.Module):
    """One seed's mean cross-entropy and mean of each regulariser `terms`, all from one
    fixed-step solve per example (`(loss, terms)`; `gj.StackedLoss` sums them over seeds)."""

    terms: tuple[str, ...] = eqx.field(static=True)

    def __call__(self, clf, batch):
        x, y, probe_key = batch

        def one(xi, k):
            z1, integrals = gj.integrate_regularizers(
                clf.node, clf.initial_state(xi), self.terms, key=k
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
def _sizes(models, x, key):
    """Per seed: every regulariser's mean over `x`, integrated with the training solver."""
    keys = jax.random.split(key, x.shape[0])

    def one_seed(clf):
        def one(xi, k):  # every term (`integrate_regularizers`' default)
            return gj.integrate_regularizers(clf.node, clf.initial_state(xi), key=k)[1]

        return {t: jnp.mean(v) for t, v in jax.vmap(one)(x, keys).items()}

    return eqx.filter_vmap(one_seed)(models)


@eqx.filter_jit
def _trajectories(clf, x, ts):
    """States `z(ts)` of one classifier for inputs `x`, from one solve each: (len(ts), n, d+a)."""
    saveat = diffrax.SaveAt(ts=ts)
    zs = jax.vmap(lambda xi: clf.node.solve(clf.initial_state(xi), saveat=saveat)[0])(x)
    return jnp.swapaxes(zs, 0, 1)


def _train_arm(cfg, arm, data, init, key, run_dir, on_chunk) -> gj.TrainResult:
    terms = _program_terms(arm)
    return gj.train(
        gj.StackedLoss(_SeedLoss(terms)),
        init,
        optimizer("adam", cfg.learning_rate),
        _Batches(data, cfg.batch_size),
        key=key,
        num_steps=cfg.num_steps,
        steps_per_chunk=cfg.steps_per_chunk,
        checkpoint_every=cfg.steps_per_chunk,  # a killed run resumes inside the arm
        regularizers={t: (getattr(cfg, f"{t}_weight") * (t in ARMS[arm]), None) for t in terms},
        run_dir=run_dir,
        config={**dataclasses.asdict(cfg), "dataset": data.name, "arm": arm},
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
    curve = {t: [r[t] / cfg.num_seeds for r in res.history] for t in ("loss", *ARMS[arm])}
    test_models = _adaptive(cfg, res.model)
    x, y = data.x_test, data.y_test
    ev = jax.device_get(_evaluate(test_models, x, y))
    timed = lambda: jax.block_until_ready(_evaluate(test_models, x, y))  # noqa: E731
    # compiled above. The best of 5 timings of >= 0.1 s each, as timeit advises: on a shared
    # machine (load 15 on 2 cores) the median of 3 single calls moved the moons ratio from 0.52
    # to 0.99, and calls of ~1 ms (the smoke preset) are scheduler noise
    number = max(1, math.ceil(0.1 / timeit.timeit(timed, number=1)))
    wall = min(timeit.repeat(timed, number=number, repeat=5)) / number
    sizes = jax.device_get(_sizes(res.model, x, k_size))
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
    steps = len(config.datasets) * len(config.arms) * config.num_steps
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
            for arm in config.arms:
                arm_dir = tr.dir / name / arm
                with tr.stage(f"{name} {arm}", config.num_steps) as on_chunk:
                    res = _train_arm(config, arm, data, init, k_train, arm_dir, on_chunk)
                arms[arm] = _arm_row(config, arm, data, res, arm_dir, init, k_size)
                if data.num_features == 2 and n_traj:
                    seed0 = gj.unstack_model(_adaptive(config, res.model), 0)
                    trajectories[arm] = np.asarray(_trajectories(seed0, data.x_test[:n_traj], ts))
            results[name] = {"arms": arms, "num_test": int(data.x_test.shape[0])}
            if trajectories:
                labels, inputs = np.asarray(data.y_test[:n_traj]), np.asarray(data.x_test[:n_traj])
                results[name].update(trajectories=trajectories, trajectory_labels=labels,
                                     trajectory_inputs=inputs)  # fmt: skip
        claims = [c for name, entry in results.items() for c in _claims(config, name, entry)]
        records = [  # one line per arm: its numbers without the curves
            {"dataset": name, "arm": arm, **{k: v for k, v in row.items() if "curve" not in k}}
            for name, entry in results.items()
            for arm, row in entry["arms"].items()
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
        arms = results[name]["arms"]
        ax = axes[0, j]
        for i, (arm, row) in enumerate(arms.items()):
            nfe = np.asarray(row["evaluations_per_seed"], dtype=float)
            acc = np.asarray(row["accuracy_per_seed"], dtype=float)
            ax.scatter(nfe, 100 * acc, color=f"C{i}", alpha=0.5, s=20)
            ax.scatter([nfe.mean()], [100 * acc.mean()], color=f"C{i}", marker="*", s=160,
                       edgecolor="k", label=arm)  # fmt: skip
        ax.set(xscale="log", ylabel="test accuracy (%)",
               xlabel=f"test field evaluations per example (Dopri5, rtol {config.test_rtol:g})",
               title=f"{name}: accuracy against cost (dots: seeds, stars: means)")  # fmt: skip
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for i, (arm, row) in enumerate(arms.items()):
            curve = row["nfe_curve"]
            if curve:
                ax.plot([c["step"] for c in curve], [c["evaluations"] for c in curve], "o-",
                        color=f"C{i}", label=arm)  # fmt: skip
        ax.set(yscale="log", xlabel="optimiser step", ylabel="test field evaluations per example",
               title=f"{name}: solver cost over training")  # fmt: skip
        ax.legend(fontsize=7)
        for ax in axes[:, j]:
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.append(io.save_figure(fig, fig_dir / "regularizers.png", close=True))
    for name in names:
        entry = results[name]
        if "trajectories" not in entry:
            continue
        arms = list(entry["trajectories"])
        cols = min(3, len(arms))
        rows = -(-len(arms) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
        for ax in axes.flat[len(arms) :]:
            ax.set_visible(False)
        labels = np.asarray(entry["trajectory_labels"])
        x0 = np.asarray(entry["trajectory_inputs"], dtype=float)
        for ax, arm in zip(axes.flat, arms, strict=False):
            traj = np.asarray(entry["trajectories"][arm], dtype=float)  # (t, n, d)
            for n in range(traj.shape[1]):
                path = np.concatenate([x0[None, n, :2], traj[:, n, :2]])
                ax.plot(path[:, 0], path[:, 1], color=f"C{labels[n]}", lw=0.8, alpha=0.7)
                ax.plot(path[-1, 0], path[-1, 1], "o", color=f"C{labels[n]}", ms=3)
            nfe = entry["arms"][arm]["evaluations"]
            ax.set(xlabel="z_1", ylabel="z_2")
            ax.set_title(f"{arm}\nNFE {nfe:.0f} per example", fontsize=9)
        fig.suptitle(f"{name}: trajectories of seed 0 (colour: class; dot: z(T))")
        fig.tight_layout()
        out.append(io.save_figure(fig, fig_dir / f"trajectories_{name}.png", close=True))
    return out
