"""Symmetry teleportation (Zhao et al. 2022) of ReLU MLPs on digits, against plain SGD and Adam.

Arms, for each optimiser: `plain` (no move), `teleport` (`gj.teleport`: gradient ascent on the log
squared gradient norm along the rescaling orbit, which keeps the function), `balance` (the control
move: `gj.balance`, the orbit's minimum-norm point, blind to the gradient), `adam_step` (Adam only:
teleport on the Adam-aware objective, the loss decrease of a fresh Adam's first step), `early` (the
anchors' protocol: teleports in the first `early_segments` segments only, each followed by a fresh
optimiser; objective `adam_step` under Adam, `objective` under SGD) and `carry` (Adam only:
`teleport`'s moves, Adam's moments carried through each by `gj.transport_adam_state`, not restarted)
and `kept` (Adam only: plain, never restarted, the baseline `carry` keeps its state beside). A move
happens every `teleport_every` steps, the first at step 0 (Zhao et al. 2022); every arm takes the
same optimiser steps. Seeds train together as one stacked model (`gj.stack_models`: each as if
alone); every seed, arm and optimiser draws the same minibatches, and the move at segment k the same
teleport batch.

Each arm is one `gj.train` run whose hook, every `teleport_every` steps, makes the move (if any) and
restarts the optimiser (every arm but `carry` and `kept`; SGD has no state). A killed run resumes
exactly from its last checkpoint; a non-finite loss stops it with `gj.TrainingDiverged` at its step,
naming the checkpoint `LATEST` still names.

Measured: every seed's full training loss at every step (a gradient-free monitor), the steps
each arm needs to reach plain's final training loss, test accuracy, the loss and gradient norm
before and after each move, and the rescaling charges around moves and at segment ends. Every
arm's work is counted in gradient evaluations (`_grad_evals`, minibatch gradients): one per
step, two per teleport objective evaluation on the teleport batch (the gradient, the backward
pass through it); gradients that only measure a move are left out. Moves are also timed.
"""

import dataclasses
import functools
import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj
from gaugejax import TELEPORT_OBJECTIVES, check_choices, check_one_of, claim, io, optimizer, pyplot

from ._training import TrainingRun


OPTIMIZERS = ("sgd", "adam")
ARMS = ("plain", "teleport", "balance", "adam_step", "early", "carry", "kept")
_MOVES = {"teleport": 1, "adam_step": 1, "early": 1, "carry": 1}  # moves that cost gradients
_NO_ARM = (("sgd", "adam_step"), ("sgd", "carry"), ("sgd", "kept"))  # Adam's: Adam only


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `teleportation` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    num_seeds: int = 5
    width: int = 32
    depth: int = 2
    optimizers: tuple[str, ...] = ("sgd", "adam")
    arms: tuple[str, ...] = ARMS
    sgd_learning_rate: float = 0.1
    adam_learning_rate: float = 3e-3
    batch_size: int = 64
    num_steps: int = 500
    teleport_every: int = 100
    steps_per_chunk: int = 100
    teleport_steps: int = 5
    teleport_learning_rate: float = 1.0
    max_log_step: float = 0.05
    teleport_batch_size: int = 512
    objective: str = "grad_norm"
    early_segments: int = 1  # the `early` arm's moves: the first segments only
    # claim: every move keeps the loss to this relative change (rounding: the rescaled network's
    # sums have terms times alpha / alpha, ~1e-15 relative; another function changes it at O(1))
    function_rtol: float = 1e-10

    def __post_init__(self):
        check_choices("optimizers", self.optimizers, OPTIMIZERS)
        check_choices("arms", self.arms, ARMS, required=("plain", "teleport"))  # the comparison
        check_one_of("objective", self.objective, TELEPORT_OBJECTIVES)
        # (sizes < 1 are refused by the config loader after this; these divisions need >= 1)
        n, every = self.num_steps, self.teleport_every
        if every < 1 or n % every:
            raise ValueError(f"`teleport_every` must divide `num_steps`={n} (segments between "
                             f"moves); received {every}.")  # fmt: skip
        if not self.early_segments <= n // every:
            raise ValueError(f"`early_segments` must be <= the {n // every} segments; received "
                             f"{self.early_segments}.")  # fmt: skip
        if (chunk := self.steps_per_chunk) < 1 or every % chunk:
            raise ValueError(f"`steps_per_chunk` must divide `teleport_every`={every} (a "
                             f"checkpoint per chunk); received {chunk}.")  # fmt: skip


# ---------------------------------------------------------------------------- model and moves


class _Loss(eqx.Module):
    """The seeds' summed minibatch loss, and as terms each seed's loss on the whole training
    split: monitors (zero weight, no gradient: one forward pass of the split, no backward)."""

    x: jax.Array
    y: jax.Array

    def __call__(self, models, batch):
        full = eqx.filter_vmap(lambda m: gj.classification_loss(m, (self.x, self.y)))(models)
        full = jax.lax.stop_gradient(full)
        terms = {f"train_loss_{s}": full[s] for s in range(full.shape[0])}
        return gj.StackedLoss(gj.classification_loss)(models, batch), terms


@eqx.filter_jit
def _move(kind: str, models, batch, gauge, config: Config):
    """Every seed moved (`kind`: "balance" or a teleport objective) and what the move changed
    on `batch` (one program per kind and config: every segment and arm reuses it)."""

    def one(m):
        extra = {}
        if kind != "balance":
            adam_lr = config.adam_learning_rate if kind == "adam_step" else None
            res = gj.teleport(m, gj.classification_loss, batch, gauge=gauge,
                              num_steps=config.teleport_steps, objective=kind,
                              learning_rate=config.teleport_learning_rate,
                              max_log_step=config.max_log_step,
                              adam_learning_rate=adam_lr)  # fmt: skip
            logs = jnp.stack([jnp.max(jnp.abs(jnp.log(e))) for e in res.element])
            moved, element = res.model, res.element
            extra = {"accepted_steps": res.num_accepted, "max_abs_log_scale": jnp.max(logs)}
        else:
            moved, element = (res := gj.balance(m, gauge)).model, res.scales
        vg = eqx.filter_value_and_grad(gj.classification_loss)
        (l0, g0), (l1, g1) = vg(m, batch), vg(moved, batch)
        norm = lambda g: jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))  # noqa: E731
        norms = {"grad_norm_before": norm(g0), "grad_norm_after": norm(g1)}
        return (moved, element), {"loss_before": l0, "loss_after": l1, **norms, **extra}

    return eqx.filter_vmap(one)(models)


@eqx.filter_jit
def _carry(state, gauge, elements, models):  # each seed's Adam moments through its own move
    axes = jax.tree.map(lambda x: 0 if jnp.ndim(x) else None, state)  # a shared step count
    vmap = functools.partial(eqx.filter_vmap, in_axes=(axes, 0, eqx.if_array(0)), out_axes=axes)
    return vmap(lambda s, e, m: gj.transport_adam_state(s, gauge, e, m))(state, elements, models)


_charges = eqx.filter_jit(eqx.filter_vmap(gj.rescaling_conserved_quantity))  # per seed


class _Segments:
    """The hook of one arm's `gj.train`, every `teleport_every` steps: the charges where a
    segment ends, then (before the last step) the arm's move (on the same teleport batch in
    every arm) and a fresh optimiser state (`carry`: the state carried through the move).
    Records go to `moves.json` at once: a resumed run calls the hook again where its
    checkpoint stands, and finds the earlier ones there."""

    def __init__(self, config: Config, opt: str, arm: str, data, gauge, key, path):
        every = config.num_steps // config.teleport_every
        self.segments = {"plain": 0, "kept": 0, "early": config.early_segments}.get(arm, every)
        early = "adam_step" if opt == "adam" else config.objective  # Adam's own objective
        self.kind = {"balance": arm, "adam_step": arm, "early": early}.get(arm, config.objective)
        self.optimizer = optimizer(opt, getattr(config, f"{opt}_learning_rate"))
        self.config, self.data, self.gauge, self.key, self.path = config, data, gauge, key, path
        self.carry, self.kept, self.seconds = arm == "carry", arm == "kept", 0.0  # in moves

    def __call__(self, step, models, opt_state):
        start, cfg = time.perf_counter(), self.config
        record = {"step": step, "charges": jax.device_get(_charges(models))}
        if step < self.segments * cfg.teleport_every:  # a move begins this segment
            key = jax.random.fold_in(self.key, step // cfg.teleport_every)
            batch = self.data.batch(key, cfg.teleport_batch_size)
            before = models
            (models, elements), move = _move(self.kind, models, batch, self.gauge, cfg)
            move = jax.device_get(move)
            change = np.abs(move["loss_after"] - move["loss_before"])
            move["relative_loss_change"] = change / np.abs(move["loss_before"])
            move["seconds"] = time.perf_counter() - start
            record["move"] = {"segment": step // cfg.teleport_every, "step": step, **move}
        record["charges_after"] = jax.device_get(_charges(models))
        self.seconds += time.perf_counter() - start
        saved = io.read_json(self.path) if self.path.exists() else {}
        io.write_json(self.path, {**saved, str(step): record})
        if self.carry and "move" in record:  # Adam's moments carried through the move
            return models, _carry(opt_state, self.gauge, elements, before)
        fresh = self.optimizer.init(eqx.filter(models, eqx.is_inexact_array))  # a restart
        return (models, fresh) if step < cfg.num_steps and not self.kept else None


@eqx.filter_jit
def _evaluate(models, d: gj.Dataset):
    one = lambda m: {"train_loss": gj.classification_loss(m, (d.x_train, d.y_train)),  # noqa: E731
                     "test_accuracy": gj.accuracy(jax.vmap(m)(d.x_test), d.y_test)}  # fmt: skip
    return jax.device_get(eqx.filter_vmap(one)(models))


# ---------------------------------------------------------------------------- one arm, the run


def _run_arm(config: Config, opt: str, arm: str, tr: TrainingRun, data, init, gauge, keys):
    """Train one arm (its moves in the hook): its curves, moves, charges and final numbers."""
    arm_dir = tr.dir / opt / arm
    hook = _Segments(config, opt, arm, data, gauge, keys[1], arm_dir / "moves.json")
    monitors = {f"train_loss_{s}": (0.0, None) for s in range(config.num_seeds)}
    run_config = {**io.jsonable(dataclasses.asdict(config)), "optimizer": opt, "arm": arm}
    try:
        with tr.stage(f"{opt}/{arm}", config.num_steps) as on_chunk:
            loss, batches = _Loss(data.x_train, data.y_train), data.batch_fn(config.batch_size)
            res = gj.train(loss, init, hook.optimizer, batches, key=keys[0],
                           num_steps=config.num_steps, steps_per_chunk=config.steps_per_chunk,
                           checkpoint_every=config.steps_per_chunk, regularizers=monitors,
                           run_dir=arm_dir, config=run_config, on_chunk=on_chunk, hook=hook,
                           hook_every=config.teleport_every)  # fmt: skip
    except gj.TrainingDiverged as err:  # the CLI stops on it cleanly (exit code 3)
        cause = (f"{opt}/{arm}: {err.cause}; lower `{opt}_learning_rate` (or the teleport's "
                 "`max_log_step`) and start a new run")  # fmt: skip
        raise gj.TrainingDiverged(err.step, cause, err.result, err.latest) from err
    records = sorted(io.read_json(hook.path).values(), key=lambda r: r["step"])
    final = _evaluate(res.model, data)
    curve = [[r[f"train_loss_{s}"] for s in range(config.num_seeds)] for r in res.history]
    moves = [r["move"] for r in records if "move" in r]
    return {
        "grad_evals": _grad_evals(config, arm, moves),
        "train_loss": np.concatenate([curve, final["train_loss"][None]]).T,  # (seeds, steps + 1)
        "test_accuracy": final["test_accuracy"],
        "moves": moves,
        "charges": _charge_table(records),
        "seconds": {"train": res.seconds - hook.seconds, "moves": hook.seconds},
    }


def _norm(charges) -> np.ndarray:  # per seed: of every hidden unit's charge, all layers
    return np.sqrt(sum(np.sum(np.asarray(q) ** 2, axis=-1) for q in charges))


def _charge_table(records: list[dict]) -> list[dict]:
    """Per segment: charge norms (per seed) before and after its move and at its end; the
    move's jump and the drift over the segment that follows."""
    rows = []
    for k, (start, end) in enumerate(zip(records[:-1], records[1:], strict=True)):
        q0, q1, q2 = start["charges"], start["charges_after"], end["charges"]
        diff = lambda a, b: _norm([np.subtract(x, y) for x, y in zip(a, b, strict=True)])  # noqa: E731
        rows.append({"segment": k, "step": start["step"], "norm_before": _norm(q0),
                     "norm_after": _norm(q1), "norm_end": _norm(q2), "jump": diff(q1, q0),
                     "drift": diff(q2, q1)})  # fmt: skip
    return rows


def _grad_evals(config: Config, arm: str, moves: list[dict]) -> np.ndarray:
    """Cumulative gradient evaluations at each point of an arm's loss curve, in minibatch
    gradients: one per step, and from each teleport on, two per objective evaluation."""
    per = _MOVES.get(arm, 0) * 2 * (config.teleport_steps + 1) * config.teleport_batch_size
    steps = np.arange(config.num_steps + 1)
    return steps + per / config.batch_size * sum(steps >= m["step"] for m in moves)


def _reach(curve: np.ndarray, target: float) -> float:
    """The first step at which `curve <= target` (inf if never)."""
    hit = np.nonzero(curve <= target)[0]
    return float(hit[0]) if hit.size else math.inf


def _summary(config: Config, by_arm: dict) -> dict:
    """Of one optimiser, every arm: the steps (seed mean, each seed) and gradient evaluations
    (seed mean) to reach plain's final loss (`teleport`'s also `reach_mean`, `reach_seeds`)."""
    target = by_arm["plain"]["train_loss"][:, -1]
    row = {"plain_final_loss": float(np.mean(target))}
    for arm, res in by_arm.items():
        loss, acc = res["train_loss"], np.asarray(res["test_accuracy"])
        reach = _reach(np.mean(loss, 0), float(np.mean(target)))
        evals = math.inf if math.isinf(reach) else float(res["grad_evals"][int(reach)])
        seeds = zip(loss, target, strict=True)
        row[arm] = {"final_loss": float(np.mean(loss[:, -1])),
                    "final_loss_seeds": loss[:, -1].tolist(),
                    "test_accuracy": float(np.mean(acc)), "test_accuracy_seeds": acc.tolist(),
                    "reach": reach, "reach_grad_evals": evals,
                    "reach_seeds": [_reach(c, float(t)) for c, t in seeds]}  # fmt: skip
    row["reach_mean"], row["reach_seeds"] = row["teleport"]["reach"], row["teleport"]["reach_seeds"]
    return row


def _cost(config: Config, res: dict, arm: str) -> dict:
    """An arm's gradient work: training gradients (minibatch examples x steps) against the
    teleport's objective evaluations (teleport-batch examples x evaluations), and their time."""
    evaluations = len(res["moves"]) * (config.teleport_steps + 1) * _MOVES.get(arm, 0)
    train = config.num_steps * config.batch_size
    return {"optimizer_steps": config.num_steps, "train_example_gradients": train,
            "gradient_evaluations": float(res["grad_evals"][-1]),  # minibatch gradients, all
            "teleport_objective_evaluations": evaluations,
            "teleport_to_train_examples": evaluations * config.teleport_batch_size / train,
            "train": {"seconds": res["seconds"]["train"]},
            "moves": {"seconds": res["seconds"]["moves"]}}  # fmt: skip


def run(config: Config, run_dir: Path) -> dict:
    arm_list = [(o, a) for o in config.optimizers for a in config.arms if (o, a) not in _NO_ARM]
    with TrainingRun("teleportation", config, run_dir, len(arm_list) * config.num_steps) as tr:
        k_init, *keys = jax.random.split(jax.random.key(config.seed), 3)  # train, teleport
        data = gj.load_dataset("digits", seed=config.seed)
        mlp = functools.partial(eqx.nn.MLP, 64, 10, config.width, config.depth, jax.nn.relu)
        init = gj.stack_models(lambda k: mlp(key=k), jax.random.split(k_init, config.num_seeds))
        gauge = gj.RescalingGauge.from_model(gj.unstack_model(init, 0))
        arms = {opt: {} for opt in config.optimizers}
        for opt, arm in arm_list:
            arms[opt][arm] = _run_arm(config, opt, arm, tr, data, init, gauge, keys)
        results = {k: {} for k in ("summary", "curves", "grad_evals", "moves", "charges", "cost")}
        for opt, by_arm in arms.items():
            results["summary"][opt] = _summary(config, by_arm)
            results["curves"][opt] = {a: r["train_loss"] for a, r in by_arm.items()}
            results["grad_evals"][opt] = {a: r["grad_evals"] for a, r in by_arm.items()}
            still = ("plain", "kept")  # arms without moves
            results["moves"][opt] = {a: r["moves"] for a, r in by_arm.items() if a not in still}
            results["charges"][opt] = {a: r["charges"] for a, r in by_arm.items()}
            results["cost"][opt] = {a: _cost(config, r, a) for a, r in by_arm.items()}
        # one line per optimiser and arm: its final numbers and steps to plain's final loss
        records = [{"optimizer": o, "arm": a, **results["summary"][o][a]} for o, a in arm_list]
        return tr.finish(results, plot, records, lambda saved: _claims(config, saved))


def _claims(config: Config, results: dict) -> list[dict]:
    n, seeds, rtol = config.num_steps, config.num_seeds, config.function_rtol
    moves = [m for by_arm in results["moves"].values() for ms in by_arm.values() for m in ms]
    tele = [m for by_arm in results["moves"].values() for m in by_arm.get("teleport", [])]
    worst = max(float(np.max(m["relative_loss_change"])) for m in moves)
    ratios = np.concatenate([np.divide(m["grad_norm_after"], m["grad_norm_before"]) for m in tele])
    claims = [
        claim("teleport_keeps_function", f"Every move along the rescaling orbit ({len(moves)} "
              f"moves of {seeds} seeds: teleports and balancing) keeps the training loss on its "
              "batch", "Eq. 29-30", worst, worst <= rtol, f"<= {rtol:g} relative",
              "max relative loss change over moves and seeds"),
        claim("teleport_raises_grad_norm", f"Every teleport ({len(tele)} x {seeds} seeds, "
              f"{config.teleport_steps} ascent steps of <= {config.max_log_step:g} in log scale) "
              "raises the gradient norm", "Zhao et al. 2022", float(np.min(ratios)),
              bool(np.min(ratios) > 1.0), "min ratio > 1", "gradient norm ratio after/before: "
              f"min {np.min(ratios):.3g}, median {np.median(ratios):.3g}, max "
              f"{np.max(ratios):.3g}"),
    ]  # fmt: skip
    # the charges: gradient flow conserves them, a teleport changes them
    drift = {o: float(max(np.max(np.divide(r["drift"], r["jump"])) for r in by_arm["teleport"]))
             for o, by_arm in results["charges"].items()}  # fmt: skip
    if "sgd" in drift:
        others = "; ".join(f"{o}: {v:.3g}" for o, v in drift.items() if o != "sgd")
        claims.append(claim(
            "sgd_keeps_teleported_charges", "Between teleports SGD nearly conserves the "
            "rescaling charges (gradient flow conserves them exactly), so each teleport's change "
            "of the charges persists: drift over a segment < the teleport's jump (every segment "
            "and seed)", "Noether charge, Kunin et al. 2020", drift["sgd"], drift["sgd"] < 1.0,
            "max drift / jump < 1", "|Q(segment end) - Q(after teleport)| / |Q(after) - "
            "Q(before)|, max over segments and seeds; not expected of other optimisers "
            f"({others or 'none run'})"))  # fmt: skip
    need = math.ceil(0.8 * seeds)  # the "4 of 5 seeds"
    when = lambda v: "never" if math.isinf(v) else f"{v:.0f}"  # noqa: E731
    for opt, row in results["summary"].items():
        name, arms = opt.upper(), [a for a in ARMS if a in row]
        at = {a: [float(x) for x in row[a]["reach_seeds"]] for a in arms}  # "inf": never
        told = {a: f"{a} at step {when(float(row[a]['reach']))} (seed mean) = "
                   f"{float(row[a]['reach_grad_evals']):.0f} gradient evaluations, per seed "
                   f"{', '.join(map(when, at[a]))}" for a in arms}  # fmt: skip
        acc = ", ".join(f"{a} {row[a]['test_accuracy']:.4f}" for a in arms)
        reach, final = float(row["reach_mean"]), row["plain"]["final_loss"]
        kept = f"; kept, never: {row['kept']['final_loss']:.4g}" if "kept" in row else ""
        ratio = row["teleport"]["final_loss"] / final
        claims += [  # the aims, not claims of the paper
            claim(f"fewer_steps_{opt}", f"{name} with teleportation every "
                  f"{config.teleport_every} steps reaches plain {name}'s final training loss "
                  f"(step {n}) in fewer optimiser steps (seed mean and each of {seeds} seeds)",
                  "Zhao et al. 2022", reach, reach < n and all(r < n for r in at["teleport"]),
                  f"< {n} steps (seed mean and every seed)", f"plain final loss {final:.4g} "
                  f"({n} gradient evaluations, in minibatch gradients); reached: "
                  f"{'; '.join(told[a] for a in arms[1:])}; test accuracy: {acc}", aim=True),
            claim(f"final_loss_{opt}", f"{name} with teleportation ends at a training loss no "
                  f"higher than plain {name} after the same {n} steps (seed mean)",
                  "Zhao et al. 2022", ratio, ratio <= 1.0, "<= 1",
                  f"teleport {row['teleport']['final_loss']:.4g} vs plain {final:.4g}", aim=True),
        ]  # fmt: skip
        for arm in [a for a in arms if a in _MOVES and opt == "adam"]:  # teleports of Adam
            hits = sum(x <= 0.9 * n for x in at[arm])
            why = f"; final loss {row[arm]['final_loss']:.4g} (plain restarts Adam each "
            why = (why + f"{config.teleport_every} steps, carry never{kept})") * (arm == "carry")
            claims.append(claim(f"adam_90pct_{arm}", f"ADAM, arm {arm}: plain ADAM's final "
                                f"training loss reached within 90% of its {n} steps in at least "
                                f"{need} of {seeds} seeds", "issue 25 aim", hits, hits >= need,
                                f">= {need} seeds", told[arm] + why, aim=True))  # fmt: skip
        if opt == "sgd":
            fast = {a: (n / float(row[a]["reach"]), n / float(row[a]["reach_grad_evals"]))
                    for a in ("teleport", "early") if a in row}  # fmt: skip
            claims.append(claim("sgd_speedup", "SGD with teleportation reaches plain SGD's "
                                "final training loss at least 1.25x sooner in steps (seed mean; "
                                "1.19x at 54e92d4)", "issue 25 aim", fast["teleport"][0],
                                fast["teleport"][0] >= 1.25, ">= 1.25x", "speedup in steps, in "
                                "gradient evaluations: " + "; ".join(f"{a} {f[0]:.3g}x, "
                                f"{f[1]:.3g}x" for a, f in fast.items()), aim=True))  # fmt: skip
    return claims


# ---------------------------------------------------------------------------- figure

_COLORS = {"plain": "tab:blue", "teleport": "tab:red", "balance": "tab:green", "kept": "tab:gray",
           "adam_step": "tab:purple", "early": "tab:orange", "carry": "tab:brown"}  # fmt: skip


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    plt = pyplot()
    opts = list(results["curves"])
    fig, axes = plt.subplots(len(opts), 4, figsize=(20, 4.2 * len(opts)), squeeze=False)
    steps, T = np.arange(config.num_steps + 1), config.teleport_every
    for row, opt in zip(axes, opts, strict=True):
        summary, name = results["summary"][opt], opt.upper()
        ax = row[0]
        for arm, curve in results["curves"][opt].items():
            curve = np.asarray(curve, dtype=float)
            ax.semilogy(steps, curve.T, color=_COLORS[arm], alpha=0.25, lw=0.8)
            ax.semilogy(steps, np.mean(curve, 0), color=_COLORS[arm], lw=2, label=arm)
            row[3].semilogy(results["grad_evals"][opt][arm], np.mean(curve, 0),
                            color=_COLORS[arm], lw=2, label=arm)  # fmt: skip
        row[3].set(xlabel="gradient evaluations (minibatch gradients, teleports' included)",
                   ylabel="full training loss (seed mean)", title=f"{name}: loss vs work "
                   "(test accuracy: the claims)")  # fmt: skip
        for ax in row[[3, 0]]:  # row[0] last: the panel the lines below draw on
            ax.axhline(summary["plain_final_loss"], color="k", ls="--", lw=0.8,
                       label="plain final loss")  # fmt: skip
        reach = float(summary["reach_mean"])  # "inf" in JSON: never reached
        if reach <= config.num_steps:
            ax.axvline(reach, color="tab:red", ls=":", lw=1,
                       label=f"teleport reaches it: step {reach:.0f}")  # fmt: skip
        for k in range(0, config.num_steps, T):
            ax.axvline(k, color="0.7", lw=0.5, zorder=0)
        ax.set(xlabel="optimiser step (grey: moves)", ylabel="full training loss",
               title=f"{name}: training loss (thin: seeds, thick: mean)")  # fmt: skip
        ax = row[1]
        for arm, table in results["charges"][opt].items():
            xs = [x for r in table for x in (r["step"], r["step"], r["step"] + T)]
            keys = ("norm_before", "norm_after", "norm_end")
            ys = [np.mean(r[k]) for r in table for k in keys]
            ax.semilogy(xs, ys, "o-", color=_COLORS[arm], ms=3, label=arm)
        ax.set(xlabel="optimiser step", ylabel="|Q| over all hidden units (seed mean)",
               title=f"{name}: charges before/after moves, at segment ends")  # fmt: skip
        ax = row[2]
        for arm, moves in results["moves"][opt].items():
            ks = [m["step"] for m in moves]
            before = [np.mean(m["grad_norm_before"]) for m in moves]
            after = [np.mean(m["grad_norm_after"]) for m in moves]
            ax.semilogy(ks, before, "o", mfc="none", color=_COLORS[arm], label=f"{arm}: before")
            ax.semilogy(ks, after, "^", color=_COLORS[arm], label=f"{arm}: after")
        ax.set(xlabel="step of the move", ylabel="|grad loss| on the teleport batch (seed mean)",
               title=f"{name}: gradient norm at each move")  # fmt: skip
    for ax in axes.flat:
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return [io.save_figure(fig, Path(fig_dir) / "teleportation.png", close=True)]
