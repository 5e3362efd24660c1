"""Alignment of independently trained networks: git re-basin as a gauge transformation.

One pair of ReLU MLPs on digits per width, trained from two seeds on the same minibatches (one
stacked model per width: Adam trains each seed as if alone). The second of each pair is aligned
to the first along the permutations of its hidden units (`gj.align`: weight matching, Ainsworth
et al., ICLR 2023), which keeps its function (checked on the test split). Measured along the
straight line between the two (`path_points` points, ends included), before and after the
alignment, and between the two canonical forms (`gj.canonicalize`: balanced, units sorted by
norm; no matching): the training and test loss and the test accuracy; the loss barrier (the
largest loss on the path minus the mean of its ends); the time to align. Git re-basin reports
near-zero barriers for wide MLPs: the aim is a barrier cut of at least `min_cut`x at the
largest width.
"""

import dataclasses
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj
from gaugejax import claim, optimizer, pyplot

from ._training import TrainingRun


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `alignment` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    widths: tuple[int, ...] = (16, 64, 256)
    depth: int = 2  # hidden layers
    learning_rate: float = 1e-3
    batch_size: int = 64
    num_steps: int = 500
    steps_per_chunk: int = 250
    path_points: int = 11
    min_cut: float = 5.0  # aim: the barrier cut at the largest width
    # claim: the aligned model's logits equal the model's to this (a permutation of the hidden
    # units changes only the order of the sums: ~1e-14 measured)
    function_atol: float = 1e-12

    def __post_init__(self):
        if not self.widths or sorted(set(self.widths)) != list(self.widths):
            raise ValueError(f"`widths` must be increasing and non-empty; received {self.widths}.")
        if self.steps_per_chunk < 1 or self.num_steps % self.steps_per_chunk:
            raise ValueError(
                f"`num_steps` must be a multiple of `steps_per_chunk` ({self.steps_per_chunk}): "
                f"checkpoints fall on chunk ends; received {self.num_steps}."
            )
        if self.path_points < 3:
            raise ValueError(f"`path_points` must be >= 3; received {self.path_points}.")


def _interpolate(a, b, t):
    return jax.tree.map(lambda u, v: u + t * (v - u) if eqx.is_inexact_array(u) else u, a, b)


@eqx.filter_jit
def _path(a, b, ts, splits):
    """Loss and accuracy of `(1 - t) a + t b` on each split, for every t: (len(ts),) each."""

    def at(t):
        model = _interpolate(a, b, t)
        out = {}
        for name, (x, y) in splits.items():
            logits = jax.vmap(model)(x)
            out[f"{name}_loss"], out[f"{name}_accuracy"] = (
                gj.cross_entropy(logits, y), gj.accuracy(logits, y))  # fmt: skip
        return out

    return jax.vmap(at)(ts)


def _barrier(loss: np.ndarray) -> float:
    return float(np.max(loss) - 0.5 * (loss[0] + loss[-1]))


def _pair(config: Config, tr: TrainingRun, data, width: int, key, run_dir: Path):
    """The two seeds of one width, trained together (resumable), unstacked."""
    k_init, k_train = jax.random.split(key)

    def make(k):
        return eqx.nn.MLP(64, 10, width, config.depth, activation=jax.nn.relu, key=k)

    with tr.stage(f"width {width}", config.num_steps) as on_chunk:
        adam = optimizer("adam", config.learning_rate)
        trained = gj.train(gj.StackedLoss(gj.classification_loss),
                           gj.stack_models(make, jax.random.split(k_init, 2)),
                           adam, data.batch_fn(config.batch_size),
                           key=k_train, num_steps=config.num_steps,
                           steps_per_chunk=config.steps_per_chunk,
                           checkpoint_every=config.steps_per_chunk, run_dir=run_dir,
                           config={**dataclasses.asdict(config), "width": width},
                           on_chunk=on_chunk)  # fmt: skip
    return gj.unstack_model(trained.model, 0), gj.unstack_model(trained.model, 1)


def run(config: Config, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    with TrainingRun("alignment", config, run_dir, len(config.widths) * config.num_steps) as tr:
        data = gj.load_dataset("digits", seed=config.seed)
        splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
        ts = jnp.linspace(0.0, 1.0, config.path_points)
        widths = {}
        for i, width in enumerate(config.widths):
            key = jax.random.fold_in(jax.random.key(config.seed), i)
            a, b = _pair(config, tr, data, width, key, run_dir / f"width_{width}")
            start = time.perf_counter()
            aligned = gj.align(a, b)
            align_s = time.perf_counter() - start
            before, after = (jax.device_get(_path(a, m, ts, splits)) for m in (b, aligned.model))
            # both in canonical form instead (balanced, units sorted by norm): no matching
            canonical = jax.device_get(_path(gj.canonicalize(a), gj.canonicalize(b), ts, splits))
            logits = [np.asarray(jax.vmap(m)(data.x_test)) for m in (b, aligned.model)]
            widths[str(width)] = {
                "before": {k: np.asarray(v) for k, v in before.items()},
                "after": {k: np.asarray(v) for k, v in after.items()},
                "canonical": {k: np.asarray(v) for k, v in canonical.items()},
                "barrier_canonical": _barrier(np.asarray(canonical["train_loss"])),
                "barrier_before": _barrier(np.asarray(before["train_loss"])),
                "barrier_after": _barrier(np.asarray(after["train_loss"])),
                "test_barrier_before": _barrier(np.asarray(before["test_loss"])),
                "test_barrier_after": _barrier(np.asarray(after["test_loss"])),
                "distance": list(aligned.history),
                "rounds": len(aligned.history) - 1,
                "align_s": align_s,
                "function_max_abs": float(np.max(np.abs(logits[1] - logits[0]))),
            }
        results = {"ts": ts, "widths": widths}
        records = [
            {
                "width": int(w),
                **{k: v for k, v in r.items() if k not in ("before", "after", "canonical")},
            }
            for w, r in widths.items()
        ]
        seeds = {"seed": config.seed, "data_seed": config.seed}  # width i: fold_in(key(seed), i)
        claims = _claims(config, widths)
        return tr.finish(results, plot, records, claims, config=dataclasses.asdict(config),
                         seeds=seeds)  # fmt: skip


def _claims(config: Config, widths: dict) -> list:
    largest = widths[max(widths, key=int)]
    kept = max(r["function_max_abs"] for r in widths.values())
    table = "; ".join(
        f"width {w}: {r['barrier_before']:.3g} -> {r['barrier_after']:.3g} "
        f"({r['barrier_before'] / max(r['barrier_after'], 1e-300):.1f}x; test loss "
        f"{r['test_barrier_before']:.3g} -> {r['test_barrier_after']:.3g}; both canonicalised "
        f"instead: {r['barrier_canonical']:.3g}), {r['rounds']} rounds "
        f"in {r['align_s']:.2f} s"
        for w, r in widths.items()
    )
    cut = largest["barrier_before"] / max(largest["barrier_after"], 1e-300)
    return [
        claim("alignment_keeps_function", "Aligning an MLP to another along the permutations "
              "of its hidden units keeps its function (logits on the test split)", "Sec. 3 "
              "(permutation symmetry)", kept, kept < config.function_atol,
              f"< {config.function_atol:g} (max abs, float64)",
              f"{len(widths)} widths"),
        claim("alignment_barrier_cut", "Weight matching (gj.align) cuts the training-loss "
              "barrier on the straight line between two seeds at the largest width",
              "Ainsworth et al. 2023 (git re-basin)", cut, cut >= config.min_cut,
              f">= {config.min_cut:g}x", table, aim=True),
    ]  # fmt: skip


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    plt = pyplot()
    ts, widths = np.asarray(results["ts"], float), results["widths"]
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 3.6), squeeze=False)
    for ax, (w, r) in zip(axes[0], widths.items(), strict=True):
        for when, style in (("before", "--"), ("canonical", ":"), ("after", "-")):
            for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
                ax.plot(ts, np.asarray(r[when][f"{split}_loss"], float), style, color=color,
                        label=f"{split} loss, {when}" + (" form" if when == "canonical"
                                                         else " alignment"))  # fmt: skip
        ax.set(title=f"width {w}: barrier {r['barrier_before']:.3g} -> {r['barrier_after']:.3g}",
               xlabel="t on the line (1 - t) A + t B", ylabel="cross-entropy")  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Two seeds of a ReLU MLP on digits, before and after aligning B to A", fontsize=10)
    fig.tight_layout()
    return [gj.io.save_figure(fig, Path(fig_dir) / "alignment_paths.png", close=True)]
