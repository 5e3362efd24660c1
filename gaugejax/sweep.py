"""The one sweep engine for every gauge family: jit(vmap) over gauge samples, chunked, sharded.

Sample i uses the key `fold_in(key, i)`, so results do not depend on chunk or block sizes or
on the number of devices. A block of `chunk_size * chunks_per_block` samples per device is one
compiled call: inside it `lax.map(..., batch_size=chunk_size)` runs fixed-size vmapped chunks
(memory bounded by `chunk_size` lanes for any `num_samples`); over devices the block is split by
`jax.shard_map`, so each device runs its own solver loops (plain auto-sharding of a vmapped
while-loop would all-reduce every step). The host loops over blocks and keeps only per-sample
scalars. Multi-host: after `jax.distributed.initialize`, `jax.devices()` spans every process;
each process calls `sweep` with the same arguments, runs the samples of its own devices, and
receives the whole result (one all-gather of per-sample scalars per block).
"""

import collections
import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import Array, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from .gauges.base import AbstractGauge
from .models import AbstractNeuralODE
from .solve import SolveStats, result_name


MODES = ("auto", "finite", "first_order")


def default_observable(model: Any, inputs: PyTree) -> tuple[PyTree, SolveStats | None]:
    """`(outputs, stats)` of `model` on a batch of inputs (leading axis): `vmap(model.solve)` for a
    `NeuralODE`, `vmap(model)` with no stats otherwise."""
    if isinstance(model, AbstractNeuralODE):
        return jax.vmap(model.solve)(inputs)
    return jax.vmap(model)(inputs), None


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Per-sample deviations and solver statistics of a gauge sweep (host numpy arrays).

    `mode="finite"`: deviation `observable(act(g, model)) - observable(model)`.
    `mode="first_order"`: `d/da observable(act(a g, model))` at a = 0 (infinitesimal families).
    `max_rel` is `max |dev| / max |reference|` (norm-wise relative). `num_steps` is the maximum
    and `num_evaluations` the sum over the inputs of a lane; `result` the worst diffrax code.
    `noise_floor` is the measured deviation of the identity element through the same path.
    """

    mode: str
    max_abs: np.ndarray
    mean_abs: np.ndarray
    max_rel: np.ndarray
    result: np.ndarray
    num_steps: np.ndarray
    num_evaluations: np.ndarray
    reference_scale: float
    noise_floor: float
    dtype: str
    precision: str
    chunk_size: int
    num_devices: int
    compile_time_s: float
    run_time_s: float

    @property
    def num_samples(self) -> int:
        return int(self.max_abs.shape[0])

    @property
    def ok(self) -> np.ndarray:
        """Lanes whose solves succeeded and whose deviation is finite."""
        return (self.result == 0) & np.isfinite(self.max_abs)

    def failures(self) -> dict[str, int]:
        """Failed lanes by reason (diffrax's result names, or `nonfinite_output`)."""
        out: dict[str, int] = {}
        for code in np.unique(self.result[self.result != 0]):
            out[result_name(int(code))] = int(np.sum(self.result == code))
        bad = (self.result == 0) & ~np.isfinite(self.max_abs)
        if bad.any():
            out["nonfinite_output"] = int(bad.sum())
        return out

    @property
    def lane_efficiency(self) -> float:
        """Mean over vmapped chunks of mean(steps)/max(steps): the useful fraction of work."""
        steps = self.num_steps.astype(float)
        n = (len(steps) // self.chunk_size) * self.chunk_size
        chunks = steps[:n].reshape(-1, self.chunk_size) if n else steps[None]
        peak = chunks.max(axis=1)
        return float(np.mean(np.where(peak > 0, chunks.mean(axis=1) / np.maximum(peak, 1), 1.0)))

    def summary(self) -> dict:
        """JSON-ready summary (medians, maxima, failures, timings, provenance)."""
        ok = self.ok
        dev = self.max_abs[ok]
        return {
            "mode": self.mode,
            "num_samples": self.num_samples,
            "num_ok": int(ok.sum()),
            "failures": self.failures(),
            "max_abs_max": float(dev.max()) if dev.size else float("nan"),
            "max_abs_median": float(np.median(dev)) if dev.size else float("nan"),
            "max_rel_max": float(self.max_rel[ok].max()) if dev.size else float("nan"),
            "reference_scale": self.reference_scale,
            "noise_floor": self.noise_floor,
            "num_steps_median": float(np.median(self.num_steps)),
            "num_steps_max": int(self.num_steps.max()),
            "num_evaluations_median": float(np.median(self.num_evaluations)),
            "lane_efficiency": self.lane_efficiency,
            "dtype": self.dtype,
            "precision": self.precision,
            "chunk_size": self.chunk_size,
            "num_devices": self.num_devices,
            "compile_time_s": self.compile_time_s,
            "run_time_s": self.run_time_s,
            "samples_per_s": self.num_samples / self.run_time_s if self.run_time_s else None,
        }


def _flat(tree: PyTree) -> Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _lane_metrics(dev: PyTree, scale: Array, stats: SolveStats | None) -> dict[str, Array]:
    a = jnp.abs(_flat(dev))
    if stats is None:
        zero = jnp.zeros((), dtype=jnp.int32)
        steps, nfe, code = zero, zero, zero
    else:
        steps = jnp.max(stats.num_steps)
        nfe = jnp.sum(stats.num_evaluations)
        code = jnp.max(stats.result)
    return {
        "max_abs": jnp.max(a),
        "mean_abs": jnp.mean(a),
        # floored: a reference that is exactly zero gives max_rel = max_abs / tiny, not NaN
        "max_rel": jnp.max(a) / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny),
        "result": code.astype(jnp.int32),
        "num_steps": steps.astype(jnp.int32),
        "num_evaluations": nfe.astype(jnp.int32),
    }


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int; received {value!r}.")
    return int(value)


def _as_typed_key(key) -> PRNGKeyArray:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(
        f"`key` must be a jax.random.key (or a raw uint32[2] key); received {key.dtype}{key.shape}."
    )


def _replicate(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """`tree` replicated with `sharding`. Through host numpy: for a mesh that spans processes
    (`jax.distributed`) `device_put` accepts host values only, the same on every process."""

    def one(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = one(jax.random.key_data(a))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return jax.device_put(np.asarray(a), sharding)

    return jax.tree.map(one, tree)


def _gather(out: PyTree) -> PyTree:
    """Host numpy copies of a block's outputs; from every process when the mesh spans several
    (each process then holds the whole result)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(out)):
        return jax.device_get(out)
    return multihost_utils.process_allgather(out, tiled=True)


class _Plan(NamedTuple):
    """Everything static about a sweep program (hashable: the jit and executable cache key)."""

    static: Any
    mode: str
    sensitivity: bool
    observable: Callable
    chunk_size: int
    mesh: Any
    precision: str


def _lane(plan: _Plan, sample_key, params, inputs, reference, scale) -> dict[str, Array]:
    model, gauge = eqx.combine(params, plan.static)
    g = gauge.sample(sample_key)
    if plan.mode == "first_order" and plan.sensitivity:
        # the response solved as a forward sensitivity system, under error control
        def fn(a, t, y, args):
            return gauge.act(a, model).field(t, y, args)

        def one(x):
            zero = jax.tree.map(jnp.zeros_like, x)
            (_, dx), stats = model.solve_tangent(x, zero, fn, gauge.identity(), g)
            return dx, stats

        dout, stats = jax.vmap(one)(inputs)
        return _lane_metrics(dout, scale, stats)
    if plan.mode == "first_order":
        # the observable returns (outputs, stats): has_aux differentiates the outputs only
        _, dout, stats = jax.jvp(
            lambda a: plan.observable(gauge.act(a, model), inputs),
            (gauge.identity(),),
            (g,),
            has_aux=True,
        )
        return _lane_metrics(dout, scale, stats)
    out, stats = plan.observable(gauge.act(g, model), inputs)
    return _lane_metrics(jax.tree.map(jnp.subtract, out, reference), scale, stats)


@functools.partial(jax.jit, static_argnums=0)
def _observe(plan: _Plan, params, inputs):
    """The reference outputs, and the deviation of the identity element (the noise floor)."""
    model, gauge = eqx.combine(params, plan.static)
    reference = plan.observable(model, inputs)[0]
    identity = plan.observable(gauge.act(gauge.identity(), model), inputs)[0]
    return reference, jnp.max(jnp.abs(_flat(identity) - _flat(reference)))


def _block(plan: _Plan, indices, key, params, inputs, reference, scale):
    def body(indices, key, params, inputs, reference, scale):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
        return jax.lax.map(
            lambda k: _lane(plan, k, params, inputs, reference, scale),
            keys,
            batch_size=plan.chunk_size,
        )

    if plan.mesh is None:
        return body(indices, key, params, inputs, reference, scale)
    return jax.shard_map(
        body,
        mesh=plan.mesh,
        in_specs=(P("samples"), P(), P(), P(), P(), P()),
        out_specs=P("samples"),
        check_vma=False,
    )(indices, key, params, inputs, reference, scale)


_block_jit = jax.jit(_block, static_argnums=0)
_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 32
_EXECUTABLES_LOCK = threading.Lock()  # sweeps may run from several threads


def _compiled_block(plan: _Plan, *args) -> tuple[Callable, float]:
    """The compiled block program for `plan` and these argument shapes, and the seconds spent
    compiling it now (0.0 when an earlier sweep in this process already compiled it)."""
    leaves, treedef = jax.tree.flatten(args)
    signature = (plan, treedef, tuple((x.shape, str(x.dtype)) for x in leaves))
    with _EXECUTABLES_LOCK:
        if signature in _EXECUTABLES:
            _EXECUTABLES.move_to_end(signature)
            return _EXECUTABLES[signature], 0.0
    start = time.perf_counter()
    compiled = _block_jit.lower(plan, *args).compile()
    with _EXECUTABLES_LOCK:
        _EXECUTABLES[signature] = compiled
        while len(_EXECUTABLES) > _MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    return compiled, time.perf_counter() - start


def _prepare(model, gauge, inputs, mode, observable, chunk_size, mesh, precision):
    """Validate, resolve `mode`, and split `(model, gauge)` into arrays and the static plan."""
    if not isinstance(gauge, AbstractGauge):
        raise TypeError(f"`gauge` must be an AbstractGauge; received {type(gauge).__name__}.")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}; received {mode!r}.")
    if not jax.tree.leaves(inputs):
        raise ValueError("`inputs` must hold at least one array; received an empty PyTree.")
    if mode == "auto":
        mode = "first_order" if gauge.infinitesimal else "finite"
    # A NeuralODE with the default observable gets its first-order response from the forward
    # sensitivity system (error-controlled); anything else by a jvp through the observable.
    sensitivity = isinstance(model, AbstractNeuralODE) and observable is default_observable
    if isinstance(model, AbstractNeuralODE):
        model = model.with_options(throw=False)
        if mode == "first_order" and not sensitivity:
            model = model.with_options(adjoint=diffrax.ForwardMode())
    # Arrays travel as jit arguments; everything else is the static, hashable plan.
    params, static = eqx.partition((model, gauge), eqx.is_array)
    plan = _Plan(static, mode, sensitivity, observable, chunk_size, mesh, precision)
    return plan, params


class SweepLane(eqx.Module):
    """The per-sample function that `sweep` vmaps: `lane(key)` draws the gauge sample of `key`
    and returns its metrics (`max_abs`, `mean_abs`, `max_rel`, `result`, `num_steps`,
    `num_evaluations`). Arrays are fields, so `eqx.filter_jit(lane)` traces them as arguments.
    Build it with `sweep_lane`; benchmarks loop, vmap or jit exactly this function."""

    plan: _Plan = eqx.field(static=True)
    params: PyTree
    inputs: PyTree
    reference: PyTree
    scale: Array

    def __call__(self, key: PRNGKeyArray) -> dict[str, Array]:
        # the context applies at trace time, so the sweep's precision holds under any jit
        with jax.default_matmul_precision(self.plan.precision):
            return _lane(self.plan, key, self.params, self.inputs, self.reference, self.scale)


def sweep_lane(
    model: Any,
    gauge: AbstractGauge,
    inputs: PyTree,
    *,
    mode: str = "auto",
    observable: Callable[[Any, PyTree], tuple[PyTree, SolveStats | None]] = default_observable,
    precision: str = "highest",
) -> SweepLane:
    """The lane function of `sweep(model, gauge, inputs, mode=..., observable=...)` as a
    `SweepLane` Module: `lane(key)` gives the metrics of one gauge sample, the same numbers a
    sweep reports for the sample drawn from `key` (a sweep uses `fold_in(key, i)` for sample i).
    The reference outputs are computed once here, at `precision`.
    """
    plan, params = _prepare(model, gauge, inputs, mode, observable, 1, None, precision)
    with jax.default_matmul_precision(precision):
        reference, _ = _observe(plan, params, inputs)
    return SweepLane(plan, params, inputs, reference, jnp.max(jnp.abs(_flat(reference))))


def sweep(
    model: Any,
    gauge: AbstractGauge,
    inputs: PyTree,
    *,
    key: PRNGKeyArray,
    num_samples: int,
    chunk_size: int = 64,
    chunks_per_block: int = 4,
    mode: str = "auto",
    observable: Callable[[Any, PyTree], tuple[PyTree, SolveStats | None]] = default_observable,
    precision: str = "highest",
    devices: list | None = None,
    progress: bool = False,
) -> SweepResult:
    """Check a gauge family on many random samples: jit + vmap, chunked, sharded over devices.

    **Arguments:**

    - `model`: the model (e.g. a `NeuralODE`); `gauge`: an `AbstractGauge` acting on it.
    - `inputs`: a batch of inputs with a leading axis, fixed for all samples.
    - `key`: base key; sample i uses `fold_in(key, i)`.
    - `num_samples`: number of gauge samples (any size; memory is bounded by `chunk_size`).
    - `chunk_size`: lanes vmapped together; `chunks_per_block`: chunks per compiled call and
      device (one host round trip per block).
    - `mode`: `"finite"` (deviation of the transformed model), `"first_order"` (derivative of
      the observable at the identity along the sample), or `"auto"` (first order for
      infinitesimal families). For a `NeuralODE` with the default observable the derivative is
      the forward sensitivity system solved under error control (`NeuralODE.solve_tangent`);
      otherwise a jvp through the observable (`diffrax.ForwardMode` for a `NeuralODE`).
    - `observable`: `(model, inputs) -> (outputs, SolveStats | None)`.
    - `precision`: matmul precision for every traced computation (default `"highest"`: float32
      matmuls otherwise run as TF32 on recent GPUs).
    - `devices`: devices to shard the sample axis over (default: all of `jax.devices()`, which
      spans every process after `jax.distributed.initialize`; then every process must call
      `sweep` with the same arguments, and each gets the whole result).
    - `progress`: show a tqdm bar over blocks.

    **Returns:** a `SweepResult`. Solver failures are reported per lane, never raised.
    Compiled programs are kept per (static configuration, shapes): a second sweep of the same
    shapes in this process reports `compile_time_s == 0.0`.

    **Raises:** `ValueError` for non-positive sizes, an unknown mode, or a non-gauge `gauge`.
    """
    num_samples = _positive_int("num_samples", num_samples)
    chunk_size = _positive_int("chunk_size", chunk_size)
    chunks_per_block = _positive_int("chunks_per_block", chunks_per_block)
    devices = list(jax.devices()) if devices is None else list(devices)
    mesh = (
        jax.make_mesh((len(devices),), ("samples",), devices=devices) if len(devices) > 1 else None
    )
    plan, params = _prepare(model, gauge, inputs, mode, observable, chunk_size, mesh, precision)
    mode = plan.mode
    key = _as_typed_key(key)
    # no more chunks per block than the samples need (padding lanes are wasted work)
    chunks_needed = -(-num_samples // (chunk_size * len(devices)))
    block = chunk_size * min(chunks_per_block, chunks_needed) * len(devices)

    with jax.default_matmul_precision(precision):
        reference, noise_floor = _observe(plan, params, inputs)
        scale = jnp.max(jnp.abs(_flat(reference)))
        noise_floor, reference_scale = float(noise_floor), float(scale)
        if mesh is not None:
            split = NamedSharding(mesh, P("samples"))
            key, params, inputs, reference, scale = _replicate(
                (key, params, inputs, reference, scale), NamedSharding(mesh, P())
            )
        else:
            split = devices[0]
        args = (key, params, inputs, reference, scale)
        first = jax.device_put(np.arange(block, dtype=np.uint32), split)
        compiled, compile_time = _compiled_block(plan, first, *args)

    num_blocks = -(-num_samples // block)
    pieces = []
    run_time = 0.0
    for b in tqdm(range(num_blocks), desc="sweep", unit="block", disable=not progress):
        indices = jax.device_put(np.arange(b * block, (b + 1) * block, dtype=np.uint32), split)
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(indices, *args))
        run_time += time.perf_counter() - start
        pieces.append(_gather(out))
    merged = {k: np.concatenate([p[k] for p in pieces])[:num_samples] for k in pieces[0]}
    dtype = str(jax.tree.leaves(reference)[0].dtype)
    return SweepResult(
        mode=mode,
        reference_scale=reference_scale,
        noise_floor=noise_floor,
        dtype=dtype,
        precision=precision,
        chunk_size=chunk_size,
        num_devices=len(devices),
        compile_time_s=compile_time,
        run_time_s=run_time,
        **merged,
    )
