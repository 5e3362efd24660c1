"""The optax training loop: one jitted scan per chunk of steps, pluggable regularisers,
JSONL metrics, atomic checkpoints and exact resume.

- Step `s` draws its batch from `batch_fn(fold_in(key, s))`, inside the jitted step, so a run
  resumed from a checkpoint replays exactly the steps an uninterrupted run would take.
- Steps run in chunks of `steps_per_chunk` with `lax.scan`; the last chunk is padded with
  masked (no-op) steps, so the program is compiled once (`TrainResult.num_compilations`).
  The compiled chunk is keyed on the functions, optimiser and model structure: runs that differ
  only in regulariser weights, data key, step count or initial values reuse it (pass the same
  function and optimiser objects).
- Checkpoints `checkpoints/step_XXXXXXXX.eqx` hold a one-line JSON header (format, step,
  config, run settings, payload size, and a sha256 over the header and the payload) and
  `eqx.tree_serialise_leaves` of (model, optimiser state); each is written atomically and
  `checkpoints/LATEST` names the newest. A restart with the same `run_dir` resumes from it; a
  different config or run (key, step count, optimiser state structure, regulariser weights),
  any damage to a checkpoint or to `LATEST`, or checkpoints without `LATEST` are refused with a
  `ValueError` naming the file and the problem, never ignored.
- Divergence stops the run: a step whose loss (with regularisers) or updated parameters are
  not finite is not applied; the run stops there, keeps `LATEST` on the last checkpoint (all
  finite), logs a `diverged` record and raises `TrainingDiverged` (naming the step and the
  cause; its `result` holds the last good state).
- A `hook` runs on the host every `hook_every` steps with the run's step and state and may
  replace the state (a teleport, an optimiser reset): segmented training is one run, one log
  and one step count, and a resume calls the hook again where the checkpoint stands.
- Seeds train together as one stacked model (`stack_models`, `unstack_model`): with a loss
  that sums the seeds' losses (`StackedLoss`), SGD and Adam (elementwise) train each seed as
  if alone, in one compiled program.
"""

import contextlib
import dataclasses
import functools
import hashlib
import io as _io
import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Key, PRNGKeyArray, PyTree, UInt32
from tqdm.auto import tqdm

from .._core.options import SolveOptions
from . import io


FORMAT = "gaugejax-checkpoint-v2"
_HEADER_TYPES = {"step": int, "config": dict, "run": dict, "payload_bytes": int, "sha256": str}
_NAME = re.compile(r"step_\d{8}\.eqx")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The trained model, its optimiser state, the per-step metrics and run facts.

    **Fields:** `model`, `opt_state`; `history`: one record per step (`step`, `loss`,
    `total`, each regulariser, `seconds`), the whole run's with a `run_dir` (the steps an
    interrupted earlier process logged are read back from `metrics.jsonl`); `resumed_from`:
    the checkpoint's step, or None; `num_compilations` (of the training chunk, this process);
    `seconds`: wall time of this process's steps and hook calls.
    """

    model: Any
    opt_state: PyTree
    history: list[dict]
    resumed_from: int | None
    num_compilations: int
    seconds: float


def _check_regularizers(regularizers):
    for name, (weight, fn) in regularizers.items():
        if fn is not None and not callable(fn):
            raise TypeError(
                f"regulariser {name!r} must be (weight, fn) with fn callable, or (weight, None) "
                f"for the term {name!r} the loss function returns; received fn of type "
                f"{type(fn).__name__}."
            )
        if not float(weight) >= 0:
            raise ValueError(f"regulariser {name!r} must have a weight >= 0; received {weight!r}.")


class TrainingDiverged(RuntimeError):
    """Raised by `train` at the first step whose loss or updated parameters are not finite.

    **Attributes:** `step` (the step that was not applied), `cause` (in words), `result` (a
    `TrainResult` with the last good state, at `step`, and the history before it), `latest`
    (the checkpoint `LATEST` still names, e.g. `"step_00000100.eqx"`, or None).
    """

    def __init__(self, step: int, cause: str, result: "TrainResult", latest: str | None):
        self.step, self.cause, self.result, self.latest = step, cause, result, latest
        kept = f"; LATEST still names {latest}" if latest else ""
        super().__init__(
            f"training diverged at step {step}: {cause}. The step was not applied; the last "
            f"good state (before step {step}) is in `.result`{kept}. Lower the learning rate "
            "or clip the gradients."
        )


def _digest(header: dict, data: bytes) -> str:
    """sha256 over the canonical header (without its own checksum) and the payload."""
    head = json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(head.encode() + b"\n" + data).hexdigest()


def _checkpoint_bytes(step: int, config: Mapping, run: Mapping, state) -> bytes:
    payload = _io.BytesIO()
    eqx.tree_serialise_leaves(payload, state)
    data = payload.getvalue()
    header = {
        "format": FORMAT,
        "step": step,
        "config": dict(config),
        "run": dict(run),
        "payload_bytes": len(data),
    }
    header["sha256"] = _digest(header, data)
    return json.dumps(header, sort_keys=True).encode() + b"\n" + data


def _differences(saved: Mapping, now: Mapping) -> str:
    now = json.loads(json.dumps(dict(now)))
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)


def read_checkpoint(
    path: str | Path, like, config: Mapping | None = None, run: Mapping | None = None
) -> tuple[int, Any]:
    """`(step, state)` from a checkpoint file, with `like` giving the state's structure.

    **Arguments:**

    - `path`: the checkpoint; `like`: a PyTree with the structure of the saved state.
    - `config`, `run`: when given, must equal the config and run settings it was written with.

    **Raises:** `ValueError` naming the file if it cannot be read, is not a gaugejax checkpoint
    of this format, has a malformed header (the field is named), is truncated or damaged
    anywhere (the sha256 covers header and payload, and the header must be byte-for-byte
    canonical), or was written with another config or run (the differing keys are named).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from e
    head, sep, data = raw.partition(b"\n")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a gaugejax checkpoint (no valid header).") from e
    if not sep or not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else None
        raise ValueError(
            f"{path} is not a gaugejax checkpoint of format {FORMAT} (header format {got!r})."
        )
    for name, kind in _HEADER_TYPES.items():
        value = header.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(
                f"{path} has a malformed header: `{name}` must be a {kind.__name__}; received "
                f"{value!r}."
            )
    canonical = json.dumps(header, sort_keys=True).encode()
    if (
        head != canonical
        or len(data) != header["payload_bytes"]
        or _digest(header, data) != (header["sha256"])
    ):
        raise ValueError(
            f"{path} is corrupt or truncated ({len(data)} of {header['payload_bytes']} payload "
            "bytes, or a checksum mismatch over header and payload): refusing to resume from it."
        )
    differ = [
        f"a different {what} ({detail})"
        for what, saved, now in (("config", header["config"], config), ("run", header["run"], run))
        if now is not None and (detail := _differences(saved, now))
    ]
    if differ:
        raise ValueError(
            f"refusing to resume from {path}: it was written with {'; '.join(differ)}."
        )
    try:
        state = eqx.tree_deserialise_leaves(_io.BytesIO(data), like)
    except Exception as e:  # a payload of another structure (checksum intact)
        raise ValueError(f"{path} holds a state of another structure: {e}") from e
    return header["step"], state


def _latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint `LATEST` names, None for a fresh run; refuses any damage."""
    pointer = ckpt_dir / "LATEST"
    if not pointer.exists():
        if ckpt_dir.is_dir() and any(ckpt_dir.glob("step_*.eqx")):
            raise ValueError(
                f"{ckpt_dir} holds checkpoints but no LATEST: refusing to restart from step 0 "
                "over them. Write the newest checkpoint's name (step_XXXXXXXX.eqx) into LATEST "
                "to resume, or use another run_dir."
            )
        return None
    try:
        name = pointer.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{pointer} cannot be read as a checkpoint name: {e}") from e
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{pointer} must hold the name of a checkpoint in {ckpt_dir} (step_XXXXXXXX.eqx); "
            f"it holds {name[:80]!r}."
        )
    path = ckpt_dir / name
    if not path.is_file():
        raise ValueError(f"{pointer} names {name}, which is not a file in {ckpt_dir}.")
    return path


class _Spec(NamedTuple):
    """The static part of a training run (hashable: the compiled chunk's cache key)."""

    loss_fn: Callable
    regularizers: tuple
    optimizer: Any
    batch_fn: Callable
    static: Any
    steps_per_chunk: int


# incremented at trace time, which runs in the calling thread: per-thread counts of compilations
# of `_run_chunk` stay exact when several runs train concurrently
_TRACES = threading.local()


def _split_loss(out) -> tuple[jax.Array, dict]:
    """`(loss, terms)` of a loss function's output: a scalar, or `(scalar, {name: scalar})`."""
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise ValueError(
                "the loss function must return a scalar or (scalar, {name: scalar}); received "
                f"a tuple of {len(out)} with a {type(out[-1]).__name__} last."
            )
        return out
    return out, {}


def _signature(tree) -> tuple:
    """The structure, shapes and dtypes of a PyTree (what a compiled program depends on)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(jnp.shape(a), jnp.result_type(a)) for a in leaves]


@eqx.filter_jit
def _run_chunk(spec: _Spec, p, state, first_step, key, num_steps, weights):
    _TRACES.count = getattr(_TRACES, "count", 0) + 1

    def objective(p, batch):
        m = eqx.combine(p, spec.static)
        loss, shared = _split_loss(spec.loss_fn(m, batch))
        terms = {"loss": loss}
        for name, fn in spec.regularizers:
            if fn is not None:
                terms[name] = fn(m, batch)
            elif name in shared:
                terms[name] = shared[name]
            else:  # raised while tracing: before any step runs
                raise ValueError(
                    f"regulariser {name!r} has no fn, so it is the loss function's term "
                    f"{name!r}; the loss function returned the terms {sorted(shared)}."
                )
        total = terms["loss"] + sum(weights[n] * terms[n] for n, _ in spec.regularizers)
        return total, terms

    def step(carry, i):
        p, state, bad = carry
        s = first_step + i
        batch = spec.batch_fn(jax.random.fold_in(key, s))
        (total, terms), grads = jax.value_and_grad(objective, has_aux=True)(p, batch)
        updates, new_state = spec.optimizer.update(grads, state, p)
        new_p = eqx.apply_updates(p, updates)
        finite = jnp.isfinite(total) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_p)])
        )
        live = (s < num_steps) & (bad < 0)  # padded steps, and steps after a divergence
        bad = jnp.where(live & ~finite, s, bad)  # the first non-finite step, not applied
        active = live & finite
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        p = jax.tree.map(keep, new_p, p)
        state = jax.tree.map(keep, new_state, state)
        return (p, state, bad), {"total": total, **terms}

    init = (p, state, jnp.asarray(-1, dtype=first_step.dtype))
    return jax.lax.scan(step, init, jnp.arange(spec.steps_per_chunk))


_SOLVER_PARTS = (
    SolveOptions,
    diffrax.AbstractSolver,
    diffrax.AbstractStepSizeController,
    diffrax.AbstractAdjoint,
)


def trainable(model: PyTree) -> PyTree[bool]:
    """The filter of what `train` trains: every inexact array of `model` except the solve
    options' (a `SolveOptions`, and any diffrax solver, step-size controller or adjoint the
    model holds itself). Array-valued options (a traced `dt0`, tolerances) are how the model
    is solved, not what it computes: a gradient step on them would make another model
    silently (fewer fixed steps, a negative `dt0`).

    **Arguments:** `model`: any PyTree (an equinox Module).

    **Returns:** a filter spec for `eqx.partition`, a prefix of `model`'s structure: False for
    each solve-options subtree, `eqx.is_inexact_array(leaf)` for every other leaf.
    """
    is_part = lambda x: isinstance(x, _SOLVER_PARTS)  # noqa: E731
    return jax.tree.map(
        lambda x: False if is_part(x) else eqx.is_inexact_array(x), model, is_leaf=is_part
    )


def _optimizer_probe(optimizer, params, opt_state) -> list[str]:
    """What an optax optimiser does, as far as a resume can check it: its first update of an
    all-ones gradient at `params`, summarised by the sum and the sum of squares of the update
    (a learning rate, a schedule's first value, weight decay or momentum settings of another
    kind change them). Six significant digits: the same optimiser on another machine agrees."""
    # per leaf in one compiled program (eagerly, every op at every leaf shape was a program
    # of its own: ~190 in the smoke reproduce), summed on the host as before
    per_leaf = _probe_update(optimizer, params, opt_state)
    sums = [sum(float(x) for x in leaves) for leaves in per_leaf]
    return [f"{v:.6g}" for v in sums]


@eqx.filter_jit
def _init(optimizer, params) -> PyTree:
    return optimizer.init(params)


@eqx.filter_jit
def _probe_update(optimizer, params, opt_state) -> list[list[jax.Array]]:
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 step counts with floats
        ones = jax.tree.map(jnp.ones_like, params)
        update = jax.tree.leaves(optimizer.update(ones, opt_state, params)[0])
        return [[jnp.sum(u**p) for u in update] for p in (1, 2)]


def optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """`optax.<name>(learning_rate)`, one object per arguments: `train` keys its compiled chunk
    on the optimiser object, so the runs of a process that build their optimiser here (arms,
    a resumed run, repeated calls) share their compiled programs, where a fresh
    `optax.adam(...)` per run would compile again.

    **Raises:** `ValueError` when `name` is not an optax optimiser or `learning_rate` is not a
    finite number > 0.
    """
    if not (isinstance(name, str) and callable(getattr(optax, name, None))):
        raise ValueError(f"`name` must be an optax optimiser, e.g. 'adam'; received {name!r}.")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(
            f"`learning_rate` must be a finite number > 0; received {learning_rate!r}."
        )
    return _optimizer(name, learning_rate)


@functools.cache
def _optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    return getattr(optax, name)(learning_rate)


def train(
    loss_fn: Callable[[Any, PyTree], jax.Array],
    model: Any,
    optimizer: optax.GradientTransformation,
    batch_fn: Callable[[PRNGKeyArray], PyTree],
    *,
    key: PRNGKeyArray,
    num_steps: int,
    steps_per_chunk: int = 50,
    checkpoint_every: int | None = None,
    regularizers: Mapping[str, tuple[float, Callable[[Any, PyTree], jax.Array] | None]]
    | None = None,
    run_dir: str | Path | None = None,
    config: Mapping | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
    hook: Callable[[int, Any, PyTree], tuple[Any, PyTree] | None] | None = None,
    hook_every: int | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train `model` to minimise `loss_fn(model, batch) + sum_i w_i r_i(model, batch)`.

    **Arguments:**

    - `loss_fn`: data loss `(model, batch) -> scalar`, or `-> (scalar, {name: scalar})` whose
      terms the regularisers with no `fn` weight (so that terms computed in one pass, e.g.
      regularisers integrated in the same solve as the prediction, are not computed twice);
      `model`: an equinox PyTree (its inexact arrays are trained, its solve options never:
      see `trainable`).
    - `optimizer`: any optax `GradientTransformation`.
    - `batch_fn`: `key -> batch`, called inside the jitted step with `fold_in(key, step)`.
    - `key`, `num_steps`: base key and total steps.
    - `steps_per_chunk`: steps per compiled `lax.scan` between host logging.
    - `checkpoint_every`: steps between checkpoints (a multiple of `steps_per_chunk`; needs
      `run_dir`); the final state is always checkpointed when `run_dir` is given.
    - `regularizers`: `{name: (weight, fn(model, batch))}`, or `{name: (weight, None)}` for the
      term `name` that `loss_fn` returns; each logged separately.
    - `run_dir`: where `metrics.jsonl` and `checkpoints/` go, locked while training (one
      process writes a run directory: a second is refused); an existing `LATEST` there is
      resumed (rows of `metrics.jsonl` from the resumed step on, or all of them when there is
      no checkpoint, are dropped: each step is logged once). `config`: JSON-able dict recorded
      in checkpoints and compared on resume.
    - `on_chunk`: host callback `(step, metrics_of_last_step)` after each chunk.
    - `hook`: host callback `(step, model, opt_state)` at every step `s = 0, k, 2k, ...` up
      to `num_steps` (`k = hook_every`, default `steps_per_chunk`; a multiple of it), after
      the checkpoint of step `s` is written. It returns None, or `(model, opt_state)` of the
      same structure to train on from step `s` (a move of the model, a reset of the
      optimiser). Checkpoints hold the state before the hook, and a run resumed at a step
      `s` calls the hook at `s` again: a hook that is a function of `(step, state)` resumes
      exactly. Its wall time counts in `TrainResult.seconds`.
    - `progress`: tqdm bar with loss and step time.

    **Returns:** a `TrainResult`.

    **Raises:** `ValueError` for non-positive sizes, negative regulariser weights, a
    checkpoint or hook interval that is not a multiple of the chunk (or a `hook_every`
    without a `hook`), a hook that returns a state of another structure, or a refused resume
    (another config, key, step count, regulariser weights, optimiser state structure or
    optimiser: its first update of a probe gradient, e.g. another learning rate; a
    damaged checkpoint or `LATEST`; checkpoints without `LATEST`). `TrainingDiverged` at the
    first step whose loss or updated parameters are not finite (that step is not applied, no
    checkpoint is written after it, and its `result` holds the last good state); also when the
    model raises inside a compiled chunk (`eqx.EquinoxRuntimeError`, e.g. a neural ODE's solver
    at `max_steps` as its field blows up), at the chunk's first step. `RunLocked`
    when another process trains in `run_dir`, naming it.
    """
    for name, value in (("num_steps", num_steps), ("steps_per_chunk", steps_per_chunk)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive int; received {value!r}.")
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int)
        or checkpoint_every <= 0
        or checkpoint_every % steps_per_chunk
    ):
        raise ValueError(
            f"`checkpoint_every` must be a positive multiple of steps_per_chunk={steps_per_chunk}; "
            f"received {checkpoint_every!r}."
        )
    if checkpoint_every is not None and run_dir is None:
        raise ValueError("`checkpoint_every` needs a `run_dir` to write checkpoints to.")
    if hook_every is not None and hook is None:
        raise ValueError("`hook_every` needs a `hook` to call.")
    hook_every = steps_per_chunk if hook_every is None else hook_every
    if not isinstance(hook_every, int) or hook_every <= 0 or hook_every % steps_per_chunk:
        raise ValueError(
            f"`hook_every` must be a positive multiple of steps_per_chunk={steps_per_chunk}; "
            f"received {hook_every!r}."
        )
    regularizers = dict(regularizers or {})
    _check_regularizers(regularizers)
    config = dict(config or {})
    # weights are traced: runs that differ only in them share one compiled chunk
    weights = {name: jnp.asarray(float(w)) for name, (w, _) in regularizers.items()}
    fns = tuple((name, fn) for name, (_, fn) in regularizers.items())
    params, static = eqx.partition(model, trainable(model))
    spec = _Spec(loss_fn, fns, optimizer, batch_fn, static, steps_per_chunk)
    opt_state = _init(optimizer, params)  # one program, not one per leaf op
    # what else fixes the result: a resume must match it (the optimiser through the structure
    # of its state and its first update of a probe gradient: another learning rate is seen)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    run = {
        "num_steps": num_steps,
        "key": jax.device_get(jax.random.key_data(key) if typed else key).tolist(),
        "weights": {name: float(w) for name, w in weights.items()},
        "optimizer_state": str(jax.tree.structure(opt_state)),
        "optimizer_probe": _optimizer_probe(optimizer, params, opt_state),
    }
    # one writer per run directory: a second process training into it is refused (two
    # writers interleave checkpoints and log every step twice)
    with (
        io.run_lock(Path(run_dir) / "train.lock")
        if run_dir is not None
        else contextlib.nullcontext()
    ):
        start_step, resumed_from = 0, None
        ckpt_dir = Path(run_dir) / "checkpoints" if run_dir is not None else None
        latest = _latest(ckpt_dir) if ckpt_dir is not None else None
        if latest is not None:
            start_step, (params, opt_state) = read_checkpoint(
                latest, (params, opt_state), config, run
            )
            resumed_from = start_step
        metrics_path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        history = []
        if metrics_path is not None and metrics_path.exists():
            # drop the records past the state we start from: they are redone (a run killed before
            # its first checkpoint restarts at step 0 and must not log its steps twice)
            kept = [r for r in io.read_jsonl(metrics_path) if r["step"] < start_step]
            io.atomic_write_bytes(
                metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode()
            )
            history = [r for r in kept if "loss" in r]  # the whole run's log, not this process's
        compilations = 0
        start = time.perf_counter()

        def result() -> TrainResult:  # the state reached so far
            return TrainResult(
                model=eqx.combine(params, static),
                opt_state=opt_state,
                history=history,
                resumed_from=resumed_from,
                num_compilations=compilations,
                seconds=time.perf_counter() - start,
            )

        def call_hook(step):
            nonlocal params, opt_state
            if hook is None or step % hook_every:
                return
            out = hook(step, eqx.combine(params, static), opt_state)
            if out is None:
                return
            new_params, new_static = eqx.partition(out[0], trainable(out[0]))
            # the same tree, shapes and dtypes: the compiled chunk and the checkpoints fit it
            if _signature((new_params, out[1])) != _signature((params, opt_state)) or not (
                eqx.tree_equal(new_static, static)
            ):
                raise ValueError(
                    f"the hook at step {step} returned a model or optimiser state of another "
                    "structure; it must return (model, opt_state) shaped like its arguments, "
                    "or None."
                )
            params, opt_state = new_params, out[1]

        bar = tqdm(total=num_steps, initial=start_step, disable=not progress, desc="train")
        step = start_step
        call_hook(step)  # step 0, or where a resumed run starts (the checkpoint is pre-hook)
        while step < num_steps:
            t0 = time.perf_counter()
            # optax mixes int32 step counts with floats (Adam's bias correction): trace the step
            # under standard promotion even where a caller (e.g. a test suite) set "strict"
            try:
                with jax.numpy_dtype_promotion("standard"):
                    traces = getattr(_TRACES, "count", 0)
                    (new_params, new_opt_state, bad), metrics = _run_chunk(
                        spec, params, opt_state, jnp.asarray(step), key, jnp.asarray(num_steps),
                        weights,
                    )  # fmt: skip
                    compilations += getattr(_TRACES, "count", 0) - traces
                metrics, bad = jax.device_get((metrics, bad))
            except eqx.EquinoxRuntimeError as e:
                # a check inside the model failed in this chunk: for a neural ODE, a solver
                # that reached max_steps or a non-finite state as its field blew up. The state
                # of the chunk's start is the last one known good
                bar.close()
                # the message equinox puts after the traceback, e.g. "The maximum number of
                # solver steps was reached."
                tag = "EquinoxRuntimeError: "
                lines = [ln.split(tag, 1)[1] for ln in str(e).splitlines() if tag in ln]
                first = lines[0] if lines else str(e).strip().splitlines()[0]
                cause = (
                    f"the model raised inside the compiled steps {step}..."
                    f"{min(step + steps_per_chunk, num_steps) - 1} ({first.strip()}); for a "
                    "neural ODE, its solver failed as the field grew (raise max_steps only if "
                    "the field is merely stiff)"
                )
                pointer = ckpt_dir / "LATEST" if ckpt_dir is not None else None
                kept = pointer.read_text().strip() if pointer and pointer.exists() else None
                raise TrainingDiverged(step, cause, result(), kept) from e
            params, opt_state = new_params, new_opt_state
            seconds = (time.perf_counter() - t0) / steps_per_chunk
            n = min(steps_per_chunk, num_steps - step)
            if bad >= 0:
                n = int(bad) - step  # the steps before the divergence
            records = [
                {
                    "step": step + i,
                    **{k: float(v[i]) for k, v in metrics.items()},
                    "seconds": seconds,
                }
                for i in range(n)
            ]
            history += records
            if run_dir is not None:
                for r in records:
                    io.append_jsonl(Path(run_dir) / "metrics.jsonl", r)
            step += n
            if bad >= 0:
                bar.close()
                total = float(metrics["total"][n])
                cause = (
                    f"the objective is {total}"
                    if not math.isfinite(total)
                    else f"the objective is finite ({total:.3e}) but the updated parameters are not"
                )
                if run_dir is not None:  # numbers only: a flag, the step, what was finite
                    io.append_jsonl(
                        Path(run_dir) / "metrics.jsonl",
                        {
                            "step": step,
                            "diverged": 1,
                            "objective_finite": int(math.isfinite(total)),
                        },
                    )
                pointer = ckpt_dir / "LATEST" if ckpt_dir is not None else None
                kept = (
                    pointer.read_text().strip()
                    if pointer is not None and pointer.exists()
                    else None
                )
                raise TrainingDiverged(step, cause, result(), kept)
            if ckpt_dir is not None and (
                step == num_steps or (checkpoint_every and step % checkpoint_every == 0)
            ):
                name = f"step_{step:08d}.eqx"
                io.atomic_write_bytes(
                    ckpt_dir / name, _checkpoint_bytes(step, config, run, (params, opt_state))
                )
                io.atomic_write_bytes(ckpt_dir / "LATEST", name.encode())
            bar.update(n)
            bar.set_postfix(loss=f"{records[-1]['loss']:.3e}", step_s=f"{seconds:.1e}")
            if on_chunk is not None:
                on_chunk(step, records[-1])
            call_hook(step)
        bar.close()
        return result()


def stack_models(
    make: Callable[[PRNGKeyArray], Any], keys: Key[Array, " n"] | UInt32[Array, "n 2"]
) -> Any:
    """One model per key, stacked along a leading axis of every array (`eqx.filter_vmap`).

    Train the stack with a loss that sums the members' losses (`eqx.filter_vmap` over the
    stack inside the loss): the gradient of each member is its own loss's, so SGD and Adam
    (elementwise) train every member as if alone, in one compiled program. Static fields
    (activations, sizes) are shared; `unstack_model` takes one member out.

    **Arguments:**

    - `make`: `key -> model`, e.g. `lambda k: eqx.nn.MLP(..., key=k)`.
    - `keys`: a batch of keys, e.g. `jax.random.split(key, num_seeds)`.

    **Returns:** the stacked model.

    **Raises:** `TypeError` for `keys` that are not a one-dimensional batch of keys.
    """
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if (keys.ndim if typed else keys.ndim - 1) != 1:
        raise TypeError(
            "`keys` must be a one-dimensional batch of keys (e.g. jax.random.split(key, n)); "
            f"received an array of shape {keys.shape}."
        )
    return eqx.filter_vmap(make)(keys)


def unstack_model(models: Any, i: int) -> Any:
    """Member `i` of a stacked model (`stack_models`): every array indexed at `i`.

    **Raises:** `IndexError` for an `i` outside the stack.
    """
    n = min(a.shape[0] for a in jax.tree.leaves(models) if eqx.is_array(a) and a.ndim)
    if not -n <= i < n:
        raise IndexError(f"member {i} of a stack of {n} models does not exist.")
    return _member(models, i)


@eqx.filter_jit
def _member(models: Any, i) -> Any:
    # one program per stack structure (`i` traced), not one eager gather per leaf shape
    return jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, models)


class StackedLoss(eqx.Module):
    """`(models, batch) -> sum over the stack of loss_fn(model_i, batch)`: the loss of a stacked
    model (`stack_models`) for `gj.train`. Each member's gradient is its own loss's, so SGD and
    Adam train every member as if alone. A `loss_fn` returning `(loss, {name: term})` gives the
    sums of both (terms for regularisers with no `fn`). A Module: two runs with the same
    `loss_fn` share their compiled program.

    **Fields:** `loss_fn`: `(model, batch) -> scalar` or `-> (scalar, {name: scalar})`.
    """

    loss_fn: Callable

    def __call__(self, models, batch):
        return jax.tree.map(jnp.sum, eqx.filter_vmap(lambda m: self.loss_fn(m, batch))(models))
