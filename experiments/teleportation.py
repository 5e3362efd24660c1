"""Symmetry teleportation (Zhao et al. 2022) of ReLU MLPs on digits, against plain SGD and Adam.

Arms, for each optimiser: `plain` (no move), `teleport` (`gj.teleport`: gradient ascent on the
log squared gradient norm along the rescaling orbit, which keeps the function) and `balance`
(the control move: `gj.balance`, the minimum-norm point of the orbit, which does not look at
the gradient). A move happens every `teleport_every` steps, the first at step 0 (the setting of
Zhao et al. 2022); every arm takes the same number of optimiser steps. Seeds (initialisations)
are trained together as one stacked model: the loss is the sum of the seeds' losses, so SGD and
Adam (elementwise) train them independently; every seed, arm and optimiser draws the same
minibatches (common random numbers), and the move at segment k uses the same teleport batch in
every arm.

Training runs in segments of `teleport_every` steps, each its own `gj.train` run (its own run
directory, a checkpoint every `steps_per_chunk` steps, exact resume). Every arm, `plain`
included, uses the same segments, so the optimiser state is reset at the same steps in every
arm (this matters for Adam, whose moments restart at each segment; SGD has no state). A killed
run resumes exactly: finished segments are read back from their last checkpoint, a move is
deterministic given the model, and the segment that was running continues from its last
checkpoint (or its start). A non-finite loss stops the run with `gj.TrainingDiverged` naming
the global step and the checkpoint `LATEST` still names.

Measured: the full training loss of every seed at every step (logged by `gj.train` as a
regulariser of weight 0: a monitor, not part of the update), the steps the teleport arm needs to
reach the plain arm's final training loss, final test accuracy, the loss and gradient norm
before and after each move, and the rescaling charges before and after each move and at the
end of each segment. Teleportation is not free: its objective evaluations (each a loss gradient
on the teleport batch and a backward pass through it) are counted and timed next to training.
"""

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gaugejax as gj
from gaugejax import TELEPORT_OBJECTIVES, io, teleport

from ._common import BAR_POSITION, PLOT_LOCK, claim, experiment_summary, pyplot


OPTIMIZERS = ("sgd", "adam")
ARMS = ("plain", "teleport", "balance")


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `teleportation` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    num_seeds: int = 5
    width: int = 32
    depth: int = 2
    optimizers: tuple[str, ...] = ("sgd", "adam")
    arms: tuple[str, ...] = ("plain", "teleport", "balance")
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
    # claim: every move keeps the loss to this relative change (rounding: the rescaled network
    # computes the same sums with terms multiplied by alpha / alpha, ~1e-15 relative; a move
    # that changed the function would change the loss at O(1))
    function_rtol: float = 1e-10

    def __post_init__(self):
        for name, values, valid in (
            ("optimizers", self.optimizers, OPTIMIZERS),
            ("arms", self.arms, ARMS),
        ):
            unknown = [v for v in values if v not in valid]
            if unknown or len(set(values)) != len(values) or not values:
                raise ValueError(
                    f"`{name}` must be distinct entries of {list(valid)}; received {list(values)}."
                )
        if "plain" not in self.arms or "teleport" not in self.arms:
            raise ValueError(
                f"`arms` must contain 'plain' and 'teleport' (the comparison); received "
                f"{list(self.arms)}."
            )
        if self.objective not in TELEPORT_OBJECTIVES:
            raise ValueError(
                f"`objective` must be one of {list(TELEPORT_OBJECTIVES)}; "
                f"received {self.objective!r}."
            )
        for name in ("num_seeds", "width", "depth", "num_steps", "teleport_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1; received {value!r}.")
        if self.num_steps % self.teleport_every:
            raise ValueError(
                f"`teleport_every` must divide `num_steps`={self.num_steps} (the segments "
                f"between moves); received {self.teleport_every}."
            )
        if self.steps_per_chunk < 1 or self.teleport_every % self.steps_per_chunk:
            raise ValueError(
                f"`steps_per_chunk` must divide `teleport_every`={self.teleport_every} (a "
                f"checkpoint per chunk); received {self.steps_per_chunk}."
            )

    @property
    def num_segments(self) -> int:
        return self.num_steps // self.teleport_every


PRESETS = {
    "default": {},
    "smoke": {
        "width": 16,
        "num_steps": 100,
        "teleport_every": 50,
        "steps_per_chunk": 50,
        "teleport_batch_size": 256,
    },
}


# ---------------------------------------------------------------------------- model and losses


def _seed_loss(model, batch):
    """Mean softmax cross-entropy of one model on `(x, y)`."""
    x, y = batch
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _stack_loss(models, batch):
    """The training loss of the stacked seeds: the sum of their losses on the same batch."""
    return jnp.sum(eqx.filter_vmap(lambda m: _seed_loss(m, batch))(models))


def _seed(models, s: int):
    """Seed s of a stacked model."""
    return jax.tree.map(lambda a: a[s] if eqx.is_array(a) else a, models)


class _FullTrainLoss(eqx.Module):
    """Seed `seed`'s loss on the whole training split, logged as a zero-weight regulariser (a
    Module, not a closure: every segment and arm shares one compiled chunk)."""

    x: jax.Array
    y: jax.Array
    seed: int = eqx.field(static=True)

    def __call__(self, models, batch):
        return _seed_loss(_seed(models, self.seed), (self.x, self.y))


@eqx.filter_jit
def _init_models(config: Config, key):
    def make(k):
        return eqx.nn.MLP(64, 10, config.width, config.depth, activation=jax.nn.relu, key=k)

    return eqx.filter_vmap(make)(jax.random.split(key, config.num_seeds))


@functools.cache
def _optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """One optimiser object per (name, learning rate): runs that use it share the compiled
    training chunk (`gj.train` keys it on the optimiser object)."""
    if name == "sgd":
        return optax.sgd(learning_rate)
    return optax.adam(learning_rate)


# ---------------------------------------------------------------------------- moves


def _sq(tree):
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))


@eqx.filter_jit
def _teleport_stack(models, data, key, gauge, config: Config):
    """Every seed teleported on the same batch; `(moved models, record)` (one program per
    config: every segment and arm reuses it)."""
    batch = data.batch(key, config.teleport_batch_size)

    def one(m):
        res = teleport(
            m,
            _seed_loss,
            batch,
            gauge=gauge,
            num_steps=config.teleport_steps,
            learning_rate=config.teleport_learning_rate,
            max_log_step=config.max_log_step,
            objective=config.objective,
        )
        return res.model, {
            "loss_before": res.loss_before,
            "loss_after": res.loss_after,
            "grad_norm_before": res.grad_norm_before,
            "grad_norm_after": res.grad_norm_after,
            "charges_before": res.charges_before,
            "charges_after": res.charges_after,
            "accepted_steps": res.num_accepted,
            "max_abs_log_scale": jnp.max(
                jnp.stack([jnp.max(jnp.abs(jnp.log(e))) for e in res.element])
            ),
        }

    return eqx.filter_vmap(one)(models)


@eqx.filter_jit
def _balance_stack(models, data, key, gauge, config: Config):
    """Every seed balanced (`gj.balance`), measured on the teleport batch."""
    batch = data.batch(key, config.teleport_batch_size)

    def one(m):
        res = gj.balance(m, gauge)
        loss0, g0 = eqx.filter_value_and_grad(_seed_loss)(m, batch)
        loss1, g1 = eqx.filter_value_and_grad(_seed_loss)(res.model, batch)
        return res.model, {
            "loss_before": loss0,
            "loss_after": loss1,
            "grad_norm_before": jnp.sqrt(_sq(g0)),
            "grad_norm_after": jnp.sqrt(_sq(g1)),
            "charges_before": gj.rescaling_conserved_quantity(m),
            "charges_after": gj.rescaling_conserved_quantity(res.model),
        }

    return eqx.filter_vmap(one)(models)


def _move(config: Config, arm: str, models, data, key, gauge):
    """`(moved models, record)` for the move of `arm` at a segment start (None for plain)."""
    if arm == "plain":
        return models, None
    start = time.perf_counter()
    stack = _teleport_stack if arm == "teleport" else _balance_stack
    moved, record = stack(models, data, key, gauge, config)
    record = jax.device_get(record)
    record["relative_loss_change"] = np.abs(record["loss_after"] - record["loss_before"]) / np.abs(
        record["loss_before"]
    )
    record["seconds"] = time.perf_counter() - start
    return moved, record


@eqx.filter_jit
def _evaluate(models, data: gj.Dataset):
    def one(m):
        test_logits = jax.vmap(m)(data.x_test)
        return {
            "train_loss": _seed_loss(m, (data.x_train, data.y_train)),
            "test_loss": _seed_loss(m, (data.x_test, data.y_test)),
            "test_accuracy": jnp.mean(
                (jnp.argmax(test_logits, axis=-1) == data.y_test).astype(data.x_test.dtype)
            ),
            "charges": gj.rescaling_conserved_quantity(m),
        }

    return jax.device_get(eqx.filter_vmap(one)(models))


# ---------------------------------------------------------------------------- one arm


def _diverged(config, opt, arm, segment, err, seg_dir, arm_dir) -> gj.TrainingDiverged:
    """The segment's `TrainingDiverged` at the global step, with the checkpoint still kept (the
    CLI stops on it cleanly: exit code 3, `status.json` "diverged")."""
    start = segment * config.teleport_every
    pointer = seg_dir / "checkpoints" / "LATEST"
    if pointer.exists():
        name = pointer.read_text().strip()
        kept = f"{pointer} ({name}, global step {start + int(name[5:13])})"
    elif segment > 0:
        prev = arm_dir / f"segment_{segment - 1:02d}" / "checkpoints" / "LATEST"
        kept = (
            f"{prev} ({prev.read_text().strip()}, global step {start}, before the move of "
            f"segment {segment}: this segment wrote no checkpoint)"
        )
    else:
        kept = None  # the first segment, before its first chunk: no checkpoint yet
    cause = (
        f"{opt}/{arm}, segment {segment} (its step {err.step}): {err.cause}; lower "
        f"`{opt}_learning_rate` (or the teleport's `max_log_step`) and start a new run"
    )
    return gj.TrainingDiverged(start + err.step, cause, err.result, kept)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every arm shares: the data, initial models, gauge, batches, monitors and keys."""

    data: gj.Dataset
    init: object
    gauge: gj.RescalingGauge
    batch_fn: object
    monitors: dict
    k_train: jax.Array
    k_teleport: jax.Array


def _run_arm(config: Config, opt: str, arm: str, optimizer, setup: _Setup, run_dir: Path, advance):
    """Train one arm segment by segment; returns its curves, moves and final evaluation."""
    data, gauge, k_train, k_teleport = setup.data, setup.gauge, setup.k_train, setup.k_teleport
    arm_dir = run_dir / opt / arm
    models = setup.init
    moves, ends, curves, seconds = [], [], [], 0.0
    for segment in range(config.num_segments):
        seg_dir = arm_dir / f"segment_{segment:02d}"
        key = jax.random.fold_in(k_teleport, segment)
        models, record = _move(config, arm, models, data, key, gauge)
        if record is not None:
            moves.append({"segment": segment, "step": segment * config.teleport_every, **record})
        try:
            res = gj.train(
                _stack_loss,
                models,
                optimizer,
                setup.batch_fn,
                key=jax.random.fold_in(k_train, segment),
                num_steps=config.teleport_every,
                steps_per_chunk=config.steps_per_chunk,
                checkpoint_every=config.steps_per_chunk,
                regularizers=setup.monitors,
                run_dir=seg_dir,
                config={
                    **io.jsonable(dataclasses.asdict(config)),
                    "optimizer": opt,
                    "arm": arm,
                    "segment": segment,
                },
                on_chunk=advance(segment, opt, arm),
            )
        except gj.TrainingDiverged as err:
            raise _diverged(config, opt, arm, segment, err, seg_dir, arm_dir) from err
        seconds += res.seconds
        models = res.model
        # the segment's whole log (a resumed run's history holds only the steps it ran)
        logged = [r for r in io.read_jsonl(seg_dir / "metrics.jsonl") if "loss" in r]
        curves.append([[r[f"train_loss_{s}"] for s in range(config.num_seeds)] for r in logged])
        ends.append(_evaluate(models, data)["charges"])
    final = _evaluate(models, data)
    curve = np.concatenate([np.asarray(c) for c in curves] + [final["train_loss"][None]], axis=0)
    return {
        "train_loss": curve.T,  # (seeds, num_steps + 1): the loss after t steps
        "final": final,
        "moves": moves,
        "segment_end_charges": ends,
        "train": {"seconds": seconds},
    }


# ---------------------------------------------------------------------------- the run


def _reach(curve: np.ndarray, target: float) -> float:
    """The first step at which `curve <= target` (inf if never)."""
    hit = np.nonzero(curve <= target)[0]
    return float(hit[0]) if hit.size else math.inf


def _norm(charges) -> np.ndarray:
    """Per seed: the Euclidean norm of every hidden unit's charge, all layers together."""
    return np.sqrt(sum(np.sum(np.asarray(q) ** 2, axis=-1) for q in charges))


def _summaries(config: Config, arms: dict) -> dict:
    """Per optimiser: steps to reach, final losses, accuracies, move statistics."""
    out = {}
    for opt, by_arm in arms.items():
        plain, tele = by_arm["plain"], by_arm["teleport"]
        target_seed = plain["train_loss"][:, -1]
        row = {
            "plain_final_loss": float(np.mean(target_seed)),
            "reach_mean": _reach(np.mean(tele["train_loss"], 0), float(np.mean(target_seed))),
            "reach_seeds": [
                _reach(tele["train_loss"][s], float(target_seed[s]))
                for s in range(config.num_seeds)
            ],
        }
        for arm, res in by_arm.items():
            acc = np.asarray(res["final"]["test_accuracy"])
            row[arm] = {
                "final_loss": float(np.mean(res["train_loss"][:, -1])),
                "final_loss_seeds": res["train_loss"][:, -1].tolist(),
                "test_accuracy": float(np.mean(acc)),
                "test_accuracy_seeds": acc.tolist(),
                "reach": _reach(np.mean(res["train_loss"], 0), float(np.mean(target_seed))),
            }
        out[opt] = row
    return out


def _charge_table(config: Config, res: dict) -> dict:
    """Per segment of an arm: charge norms (seed mean) before and after its move and at its
    end; the jump of a move and the drift over the segment that follows, per seed."""
    rows = []
    by_segment = {m["segment"]: m for m in res["moves"]}
    for segment, end in enumerate(res["segment_end_charges"]):
        move = by_segment.get(segment)
        if move is not None:
            before, after = move["charges_before"], move["charges_after"]
        else:
            before = after = (
                res["segment_end_charges"][segment - 1] if segment else res["init_charges"]
            )
        jump = _norm([np.asarray(a) - np.asarray(b) for a, b in zip(after, before, strict=True)])
        drift = _norm([np.asarray(e) - np.asarray(a) for e, a in zip(end, after, strict=True)])
        rows.append(
            {
                "segment": segment,
                "step": segment * config.teleport_every,
                "norm_before": _norm(before).tolist(),
                "norm_after": _norm(after).tolist(),
                "norm_end": _norm(end).tolist(),
                "jump": jump.tolist(),
                "drift": drift.tolist(),
            }
        )
    return rows


def run(config: Config, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    start_all = time.perf_counter()
    k_init, k_train, k_teleport = jax.random.split(jax.random.key(config.seed), 3)
    data = gj.load_dataset("digits", seed=config.seed)
    init = _init_models(config, k_init)
    setup = _Setup(
        data=data,
        init=init,
        gauge=gj.RescalingGauge.from_model(_seed(init, 0)),
        batch_fn=data.batch_fn(config.batch_size),
        monitors={
            f"train_loss_{s}": (0.0, _FullTrainLoss(data.x_train, data.y_train, s))
            for s in range(config.num_seeds)
        },
        k_train=k_train,
        k_teleport=k_teleport,
    )
    init_charges = _evaluate(init, data)["charges"]
    # one optimiser object per optimiser: its arms and segments share one compiled chunk
    optimizers = {
        opt: _optimizer(opt, getattr(config, f"{opt}_learning_rate")) for opt in config.optimizers
    }
    arm_list = [(opt, arm) for opt in config.optimizers for arm in config.arms]
    # one bar over every arm's steps, advanced after each compiled chunk; its line is the one
    # `reproduce` gives this thread
    bar = tqdm(
        total=len(arm_list) * config.num_steps,
        desc="teleportation",
        unit="step",
        position=BAR_POSITION.get(),
        leave=True,
    )

    def advance(i):
        def for_segment(segment, opt, arm):
            def on_chunk(step, metrics):
                loss = metrics["loss"] / config.num_seeds
                bar.set_postfix_str(f"{opt}/{arm}, loss {loss:.2e}", refresh=False)
                bar.update(i * config.num_steps + segment * config.teleport_every + step - bar.n)

            return on_chunk

        return for_segment

    arms: dict = {opt: {} for opt in config.optimizers}
    try:
        for i, (opt, arm) in enumerate(arm_list):
            res = _run_arm(config, opt, arm, optimizers[opt], setup, run_dir, advance(i))
            res["init_charges"] = init_charges
            arms[opt][arm] = res
            bar.update((i + 1) * config.num_steps - bar.n)  # an arm finished before a resume
    finally:  # a divergence or an interruption leaves the terminal clean
        bar.close()
    summary = _summaries(config, arms)
    results = {
        "summary": summary,
        "curves": {
            opt: {arm: res["train_loss"] for arm, res in by_arm.items()}
            for opt, by_arm in arms.items()
        },
        "moves": {
            opt: {arm: res["moves"] for arm, res in by_arm.items() if arm != "plain"}
            for opt, by_arm in arms.items()
        },
        "charges": {
            opt: {arm: _charge_table(config, res) for arm, res in by_arm.items()}
            for opt, by_arm in arms.items()
        },
        "cost": _cost(config, arms),
    }
    io.write_json(run_dir / "results.json", results)
    results = io.read_json(run_dir / "results.json")  # claims and figure from what was saved
    with PLOT_LOCK:
        figures = plot(results, run_dir / "figures", config)
    claims = _claims(config, results)
    # one record per optimiser and arm, written once (a resumed run must not append them again)
    records = [
        {
            "optimizer": opt,
            "arm": arm,
            "final_loss": summary[opt][arm]["final_loss"],
            "test_accuracy": summary[opt][arm]["test_accuracy"],
            "steps_to_plain_final_loss": summary[opt][arm]["reach"],
        }
        for opt, arm in arm_list
    ]
    text = "".join(json.dumps(io.jsonable(r)) + "\n" for r in records)
    io.atomic_write_bytes(run_dir / "metrics.jsonl", text.encode())
    return experiment_summary("teleportation", claims, figures, run_dir, start_all)


def _cost(config: Config, arms: dict) -> dict:
    """The gradient work of each arm: training gradients (minibatch examples x steps) against
    the teleport's objective evaluations (teleport-batch examples x evaluations, each a loss
    gradient plus a backward pass through it), and the measured time of both."""
    out = {}
    train_examples = config.num_steps * config.batch_size
    for opt, by_arm in arms.items():
        out[opt] = {}
        for arm, res in by_arm.items():
            evaluations = (
                len(res["moves"]) * (config.teleport_steps + 1) if arm == "teleport" else 0
            )
            out[opt][arm] = {
                "optimizer_steps": config.num_steps,
                "train_example_gradients": train_examples,
                "teleport_objective_evaluations": evaluations,
                "teleport_example_evaluations": evaluations * config.teleport_batch_size,
                "teleport_to_train_examples": evaluations
                * config.teleport_batch_size
                / train_examples,
                "train": {"seconds": res["train"]["seconds"]},
                "moves": {"seconds": float(sum(m["seconds"] for m in res["moves"]))},
            }
    return out


def _claims(config: Config, results: dict) -> list[dict]:
    claims = []
    n = config.num_steps
    moves = [
        m
        for by_arm in results["moves"].values()
        for arm_moves in by_arm.values()
        for m in arm_moves
    ]
    worst = max(float(np.max(m["relative_loss_change"])) for m in moves)
    claims.append(
        claim(
            "teleport_keeps_function",
            f"Every move along the rescaling orbit ({len(moves)} moves of {config.num_seeds} "
            "seeds: teleports and balancing) keeps the training loss on its batch",
            "Eq. 29-30",
            worst,
            worst <= config.function_rtol,
            f"<= {config.function_rtol:g} relative",
            "max relative loss change over moves and seeds",
        )
    )
    tele = [m for by_arm in results["moves"].values() for m in by_arm.get("teleport", [])]
    ratios = np.concatenate(
        [np.asarray(m["grad_norm_after"]) / np.asarray(m["grad_norm_before"]) for m in tele]
    )
    claims.append(
        claim(
            "teleport_raises_grad_norm",
            f"Every teleport ({len(tele)} x {config.num_seeds} seeds, {config.teleport_steps} "
            f"ascent steps of <= {config.max_log_step:g} in log scale) raises the gradient norm",
            "Zhao et al. 2022",
            float(np.min(ratios)),
            bool(np.min(ratios) > 1.0),
            "min ratio > 1",
            f"gradient norm ratio after/before: min {np.min(ratios):.3g}, median "
            f"{np.median(ratios):.3g}, max {np.max(ratios):.3g}",
        )
    )
    # the charges: gradient flow conserves them, a teleport changes them
    drift_ratio = {}
    for opt, by_arm in results["charges"].items():
        drift = np.asarray([r["drift"] for r in by_arm["teleport"]])
        jump = np.asarray([r["jump"] for r in by_arm["teleport"]])
        drift_ratio[opt] = float(np.max(drift / jump))
    if "sgd" in drift_ratio:
        others = "; ".join(f"{o}: {v:.3g}" for o, v in drift_ratio.items() if o != "sgd")
        claims.append(
            claim(
                "sgd_keeps_teleported_charges",
                "Between teleports SGD nearly conserves the rescaling charges (gradient flow "
                "conserves them exactly), so each teleport's change of the charges persists: "
                "drift over a segment < the teleport's jump (every segment and seed)",
                "Noether charge, Kunin et al. 2020",
                drift_ratio["sgd"],
                drift_ratio["sgd"] < 1.0,
                "max drift / jump < 1",
                f"|Q(segment end) - Q(after teleport)| / |Q(after) - Q(before)|, max over "
                f"segments and seeds; not expected of other optimisers ({others or 'none run'})",
            )
        )
    for opt, row in results["summary"].items():
        cost = results["cost"][opt]["teleport"]
        reach_seeds = [float(r) for r in row["reach_seeds"]]  # "inf" in JSON: never reached
        reach_mean = float(row["reach_mean"])
        seeds = ", ".join(_steps(r) for r in reach_seeds)
        acc = ", ".join(
            f"{arm} {row[arm]['test_accuracy']:.4f}" for arm in config.arms if arm in row
        )
        balance = (
            f"; balance control reaches it at {_steps(float(row['balance']['reach']))}"
            if "balance" in row
            else ""
        )
        reached = reach_mean < n
        every = all(r < n for r in reach_seeds)
        claims.append(
            claim(
                f"fewer_steps_{opt}",
                f"{opt.upper()} with teleportation every {config.teleport_every} steps reaches "
                f"plain {opt.upper()}'s final training loss (step {n}) in fewer optimiser steps "
                f"(seed mean and each of {config.num_seeds} seeds)",
                "Zhao et al. 2022",
                reach_mean,
                reached and every,
                f"< {n} steps (seed mean and every seed)",
                f"plain final loss {row['plain_final_loss']:.4g}; reached at step "
                f"{_steps(reach_mean)} (seed mean), per seed {seeds}{balance}; test "
                f"accuracy: {acc}; extra cost: {cost['teleport_objective_evaluations']} "
                f"objective evaluations (gradient + backward through it) on "
                f"{config.teleport_batch_size} examples = "
                f"{cost['teleport_to_train_examples']:.2f}x the training examples",
                aim=True,  # the aim, not a claim of the paper
            )
        )
        ratio = row["teleport"]["final_loss"] / row["plain"]["final_loss"]
        claims.append(
            claim(
                f"final_loss_{opt}",
                f"{opt.upper()} with teleportation ends at a training loss no higher than plain "
                f"{opt.upper()} after the same {n} steps (seed mean)",
                "Zhao et al. 2022",
                ratio,
                ratio <= 1.0,
                "<= 1",
                f"teleport {row['teleport']['final_loss']:.4g} vs plain "
                f"{row['plain']['final_loss']:.4g}",
                aim=True,
            )
        )
    return claims


def _steps(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f}"


# ---------------------------------------------------------------------------- figure

_COLORS = {"plain": "tab:blue", "teleport": "tab:red", "balance": "tab:green"}


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    plt = pyplot()
    opts = list(results["curves"])
    fig, axes = plt.subplots(len(opts), 4, figsize=(20, 4.2 * len(opts)), squeeze=False)
    steps = np.arange(config.num_steps + 1)
    for row, opt in zip(axes, opts, strict=True):
        summary = results["summary"][opt]
        ax = row[0]
        for arm, curve in results["curves"][opt].items():
            curve = np.asarray(curve, dtype=float)
            for seed_curve in curve:
                ax.semilogy(steps, seed_curve, color=_COLORS[arm], alpha=0.25, lw=0.8)
            ax.semilogy(steps, np.mean(curve, 0), color=_COLORS[arm], lw=2, label=arm)
        ax.axhline(summary["plain_final_loss"], color="k", ls="--", lw=0.8,
                   label="plain final loss")  # fmt: skip
        reach = float(summary["reach_mean"])  # "inf" in JSON: never reached
        if reach <= config.num_steps:
            ax.axvline(reach, color="tab:red", ls=":", lw=1,
                       label=f"teleport reaches it: step {reach:.0f}")  # fmt: skip
        for k in range(config.num_segments):
            ax.axvline(k * config.teleport_every, color="0.7", lw=0.5, zorder=0)
        ax.set_xlabel("optimiser step (grey: moves)")
        ax.set_ylabel("full training loss")
        ax.set_title(f"{opt.upper()}: training loss (thin: seeds, thick: mean)")
        ax.legend(fontsize=8)

        ax = row[1]
        for arm, table in results["charges"][opt].items():
            xs, ys = [], []
            for r in table:
                start, end = r["step"], r["step"] + config.teleport_every
                xs += [start, start, end]
                ys += [np.mean(r["norm_before"]), np.mean(r["norm_after"]), np.mean(r["norm_end"])]
            ax.semilogy(xs, ys, "o-", color=_COLORS[arm], ms=3, label=arm)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("|Q| over all hidden units (seed mean)")
        ax.set_title(f"{opt.upper()}: charges before/after moves, at segment ends")
        ax.legend(fontsize=8)

        ax = row[2]
        for arm, moves in results["moves"][opt].items():
            ks = [m["step"] for m in moves]
            before = [np.mean(m["grad_norm_before"]) for m in moves]
            after = [np.mean(m["grad_norm_after"]) for m in moves]
            ax.semilogy(ks, before, "o", mfc="none", color=_COLORS[arm], label=f"{arm}: before")
            ax.semilogy(ks, after, "^", color=_COLORS[arm], label=f"{arm}: after")
        ax.set_xlabel("step of the move")
        ax.set_ylabel("|grad loss| on the teleport batch (seed mean)")
        ax.set_title(f"{opt.upper()}: gradient norm at each move")
        ax.legend(fontsize=8)

        ax = row[3]
        names = [a for a in ("plain", "teleport", "balance") if a in summary]
        for j, arm in enumerate(names):
            accs = summary[arm]["test_accuracy_seeds"]
            ax.bar(j, np.mean(accs), color=_COLORS[arm], alpha=0.6)
            ax.plot([j] * len(accs), accs, "k.", ms=6)
            ax.text(j + 0.42, np.mean(accs), f"{np.mean(accs):.3f}", ha="right", va="bottom",
                    fontsize=9)  # fmt: skip
        lo = min(min(summary[a]["test_accuracy_seeds"]) for a in names)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("test accuracy (dots: seeds)")
        ax.set_title(f"{opt.upper()}: test accuracy after {config.num_steps} steps")
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = [io.save_figure(fig, Path(fig_dir) / "teleportation.png")]
    plt.close(fig)
    return out
