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

Then one pair of small causal decoders per variant (RMSNorm with SwiGLU; LayerNorm with biases
and GELU, aligned through `gj.fuse_layernorm`; RoPE, 2 blocks of 2 heads), trained from two
seeds on a generated language, `a_i = (a_(i-1) + a_(i-2)) mod vocab` after two random tokens
(its `vocab ** 2` sequences; the loss from the third token on), and aligned along
`DecoderGauge(permutations=True)`: residual rotation, gains, attention maps, SwiGLU scales,
heads and hidden units. The same paths on sequences drawn apart; the aim is any cut.
"""

import dataclasses
import functools
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj
from gaugejax import check_choices, claim, optimizer, pyplot

from ._training import TrainingRun


# the decoder variants: both causal with RoPE ("half" pairing), gains on
DECODERS = {
    "rms_swiglu": dict(norm="rms", norm_gain=True, mlp="swiglu"),
    "layernorm_gelu": dict(norm="layer", norm_gain=True, norm_bias=True, mlp="gelu"),
}


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
    decoders: tuple[str, ...] = ("rms_swiglu", "layernorm_gelu")  # DECODERS' keys; () for none
    vocab: int = 7
    sequence_length: int = 12
    decoder_dim: int = 16  # residual width; 2 heads of dim / 2, MLP 2 * dim
    decoder_steps: int = 500  # a multiple of steps_per_chunk
    decoder_learning_rate: float = 3e-3
    test_sequences: int = 256
    decoder_min_cut: float = 1.0  # aim: a measured cut of the decoders' barrier (each variant)

    def __post_init__(self):
        check_choices("decoders", self.decoders, tuple(DECODERS))
        if self.decoder_steps % self.steps_per_chunk:
            raise ValueError(
                f"`decoder_steps` must be a multiple of `steps_per_chunk` "
                f"({self.steps_per_chunk}); received {self.decoder_steps}."
            )
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


def _classify(model, x, y):
    logits = jax.vmap(model)(x)
    return gj.cross_entropy(logits, y), gj.accuracy(logits, y)


def _next_token(model, x, y):
    """From the third token on (the first two are random): every later one is determined."""
    logits = jax.vmap(model)(x)[:, 1:]
    flat, labels = logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1)
    return gj.cross_entropy(flat, labels), gj.accuracy(flat, labels)


def _next_token_loss(model, batch):
    return _next_token(model, *batch)[0]


class _Sequences(eqx.Module):
    """`key -> (x, y)`: `batch` sequences of the language, inputs and next tokens."""

    vocab: int = eqx.field(static=True)
    length: int = eqx.field(static=True)
    batch: int = eqx.field(static=True)

    def __call__(self, key):
        first = jax.random.randint(key, (2, self.batch), 0, self.vocab)

        def step(prev, _):
            new = (prev[0] + prev[1]) % self.vocab
            return (prev[1], new), new

        rest = jax.lax.scan(step, (first[0], first[1]), None, length=self.length - 2)[1]
        tokens = jnp.concatenate([first, rest]).T
        return tokens[:, :-1], tokens[:, 1:]


@eqx.filter_jit
def _path(a, b, ts, splits, score=_classify):
    """`score`'s loss and accuracy of `(1 - t) a + t b` on each split, for every t."""

    def at(t):
        model = _interpolate(a, b, t)
        out = {}
        for name, (x, y) in splits.items():
            out[f"{name}_loss"], out[f"{name}_accuracy"] = score(model, x, y)
        return out

    return jax.vmap(at)(ts)


def _barrier(loss: np.ndarray) -> float:
    return float(np.max(loss) - 0.5 * (loss[0] + loss[-1]))


def _pair(config: Config, tr: TrainingRun, name: str, make, loss, batches, steps: int,
          learning_rate: float, key, run_dir: Path):  # fmt: skip
    """Two seeds of `make(key)`, trained together on the same batches (resumable), unstacked."""
    k_init, k_train = jax.random.split(key)
    with tr.stage(name, steps) as on_chunk:
        trained = gj.train(gj.StackedLoss(loss), gj.stack_models(make, jax.random.split(k_init, 2)),
                           optimizer("adam", learning_rate), batches, key=k_train,
                           num_steps=steps, steps_per_chunk=config.steps_per_chunk,
                           checkpoint_every=config.steps_per_chunk, run_dir=run_dir,
                           config={**dataclasses.asdict(config), "pair": name},
                           on_chunk=on_chunk)  # fmt: skip
    return gj.unstack_model(trained.model, 0), gj.unstack_model(trained.model, 1)


def _decoder_row(a, b, ts, test) -> dict:
    """Paths before (as trained, and fused) and after aligning B to A along the decoder's whole
    family, and between the canonical forms; the distance history, time and function kept."""
    fused = [gj.fuse_layernorm(m) for m in (a, b)]  # an RMSNorm decoder: as it is
    start = time.perf_counter()
    aligned = gj.align(*fused, gj.DecoderGauge.from_model(fused[0], permutations=True))
    align_s = time.perf_counter() - start
    pairs = {"before": (a, b), "before_fused": fused, "after": (fused[0], aligned.model),
             "canonical": (gj.canonicalize(a), gj.canonicalize(b))}  # fmt: skip
    paths = {k: jax.device_get(_path(*m, ts, test, _next_token)) for k, m in pairs.items()}
    row = {k: {q: np.asarray(v) for q, v in path.items()} for k, path in paths.items()}
    row.update({f"barrier_{k}": _barrier(np.asarray(v["test_loss"])) for k, v in paths.items()})
    logits = [np.asarray(jax.vmap(m)(test["test"][0])) for m in (b, aligned.model)]
    kept = float(np.max(np.abs(logits[1] - logits[0])))
    return {**row, "distance": list(aligned.history), "rounds": len(aligned.history) - 1,
            "align_s": align_s, "function_max_abs": kept}  # fmt: skip


def run(config: Config, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    steps = len(config.widths) * config.num_steps + len(config.decoders) * config.decoder_steps
    with TrainingRun("alignment", config, run_dir, steps) as tr:
        data = gj.load_dataset("digits", seed=config.seed)
        splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
        ts = jnp.linspace(0.0, 1.0, config.path_points)
        widths = {}
        for i, width in enumerate(config.widths):
            key = jax.random.fold_in(jax.random.key(config.seed), i)

            def make(k, width=width):
                return eqx.nn.MLP(64, 10, width, config.depth, activation=jax.nn.relu, key=k)

            a, b = _pair(config, tr, f"width {width}", make, gj.classification_loss,
                         data.batch_fn(config.batch_size), config.num_steps,
                         config.learning_rate, key, run_dir / f"width_{width}")  # fmt: skip
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
        decoders, root = {}, jax.random.fold_in(jax.random.key(config.seed), len(config.widths))
        test_key, *keys = jax.random.split(root, 1 + len(config.decoders))
        language = functools.partial(_Sequences, config.vocab, config.sequence_length)
        test = {"test": language(config.test_sequences)(test_key)}
        for variant, key in zip(config.decoders, keys, strict=True):
            d, V = config.decoder_dim, config.vocab

            def make(k, variant=variant, d=d, V=V):
                return gj.Decoder(V, V, d, 2, 2, d // 2, 2 * d, key=k, rope="half",
                                  **DECODERS[variant])  # fmt: skip

            a, b = _pair(config, tr, f"decoder {variant}", make, _next_token_loss,
                         language(config.batch_size), config.decoder_steps,
                         config.decoder_learning_rate, key,
                         run_dir / f"decoder_{variant}")  # fmt: skip
            decoders[variant] = _decoder_row(a, b, ts, test)
        results = {"ts": ts, "widths": widths, "decoders": decoders}
        records = [
            {
                "width": int(w),
                **{k: v for k, v in r.items() if k not in ("before", "after", "canonical")},
            }
            for w, r in widths.items()
        ] + [{"decoder": v, **{k: x for k, x in r.items() if not isinstance(x, dict)}}
             for v, r in decoders.items()]  # fmt: skip
        # width i: fold_in(key(seed), i); the decoders: fold_in(key(seed), len(widths))
        seeds = {"seed": config.seed, "data_seed": config.seed}
        claims = _claims(config, widths) + _decoder_claims(config, decoders)
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


def _decoder_claims(config: Config, decoders: dict) -> list:
    if not decoders:
        return []
    kept = max(r["function_max_abs"] for r in decoders.values())
    cuts = {
        v: r["barrier_before_fused"] / max(r["barrier_after"], 1e-300) for v, r in decoders.items()
    }
    table = "; ".join(
        f"{v}: {r['barrier_before']:.3g} as trained, {r['barrier_before_fused']:.3g} fused -> "
        f"{r['barrier_after']:.3g} aligned ({cuts[v]:.2f}x); canonical forms "
        f"{r['barrier_canonical']:.3g}; distance {r['distance'][0]:.3g} -> {r['distance'][-1]:.3g} "
        f"in {r['rounds']} rounds, {r['align_s']:.1f} s"
        for v, r in decoders.items()
    )
    cut = min(cuts.values())
    return [
        claim("decoder_alignment_keeps_function", "Aligning a decoder to another along its whole "
              "family (residual rotation, gains, attention maps, SwiGLU scales, heads, units) "
              "keeps its function (logits on held-out sequences)", "Sec. 4 (attention)", kept,
              kept < config.function_atol, f"< {config.function_atol:g} (max abs, float64)",
              f"{len(decoders)} variants"),
        claim("decoder_barrier_cut", "Aligning cuts the held-out loss barrier between two "
              "seeds of a small decoder (every variant; fused pair before)", "Generalized LMC "
              "for transformers (NeurIPS 2025)", cut, cut >= config.decoder_min_cut,
              f">= {config.decoder_min_cut:g}x", table, aim=True),
    ]  # fmt: skip


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    plt = pyplot()
    ts, widths = np.asarray(results["ts"], float), results["widths"]
    decoders = results.get("decoders", {})
    panels = [(f"MLP width {w}", r, "before") for w, r in widths.items()]
    panels += [(f"decoder {v}", r, "before_fused") for v, r in decoders.items()]  # as aligned
    rows, cols = 1 + bool(decoders), max(len(widths), len(decoders))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(widths) :]:
        ax.axis("off")
    slots = list(axes[0][: len(widths)]) + (list(axes[1][: len(decoders)]) if decoders else [])
    for ax, (name, r, before) in zip(slots, panels, strict=True):
        ax.axis("on")
        for when, style in ((before, "--"), ("canonical", ":"), ("after", "-")):
            for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
                if f"{split}_loss" in r[when]:
                    label = {"canonical": "canonical form"}.get(when, when.split("_")[0]
                                                                 + " alignment")  # fmt: skip
                    ax.plot(ts, np.asarray(r[when][f"{split}_loss"], float), style, color=color,
                            label=f"{split} loss, {label}")  # fmt: skip
        ax.set(title=f"{name}: barrier {r[f'barrier_{before}']:.3g} -> {r['barrier_after']:.3g}",
               xlabel="t on the line (1 - t) A + t B", ylabel="cross-entropy")  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Two seeds each, before and after aligning B to A: ReLU MLPs on digits"
                 + (" (top), decoders on a generated language (bottom)" if decoders else ""),
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    return [gj.io.save_figure(fig, Path(fig_dir) / "alignment_paths.png", close=True)]
