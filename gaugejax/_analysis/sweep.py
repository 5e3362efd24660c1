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
import math
import threading
import time
import warnings
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

from .._core.solve import NOT_COUNTED, SolveStats, SolveStatus, result_name, status_code
from .._infra.devices import check_cpu_pool, free_memory_bytes, supports_float64
from ..gauges.base import AbstractGauge, AbstractParameterGauge
from ..models import AbstractNeuralODE, AbstractSolvedModel
from .verdict import FLOAT_FLOOR_ULPS, HOLD_FACTOR, Recheck, judge


MODES = ("auto", "finite", "first_order")
PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
# float32 matmuls at these precisions round their inputs on GPUs and TPUs (relative error of
# about 1e-3 for TF32, the GPU default, and 1e-2 for bfloat16): far above the float32 floor
# a verdict is judged against, so a symmetry that holds would read as broken
REDUCED_PRECISIONS = {"default": 1e-3, "tensorfloat32": 1e-3, "bfloat16": 1e-2}


def default_observable(model: Any, inputs: PyTree) -> tuple[PyTree, SolveStats | None]:
    """`(outputs, stats)` of `model` on a batch of inputs (leading axis): `vmap(model.solve)` for a
    neural ODE, `vmap(model)` with no stats otherwise; a tuple of arrays is passed as positional
    arguments (e.g. `(query, key, value)` of `eqx.nn.MultiheadAttention`)."""
    if isinstance(model, AbstractNeuralODE):
        return jax.vmap(model.solve)(inputs)
    if isinstance(inputs, tuple):
        return jax.vmap(model)(*inputs), None
    return jax.vmap(model)(inputs), None


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Per-sample deviations and solver statistics of a gauge sweep (host numpy arrays), and the
    verdict.

    `mode="finite"`: deviation `observable(act(g, model)) - observable(model)`.
    `mode="first_order"`: `d/da observable(act(a g, model))` at a = 0 (infinitesimal families).
    `max_rel` is `max |dev| / max |reference|` (norm-wise relative). `num_steps` is the maximum
    and `num_evaluations` the sum over the inputs of a lane (-1: not counted for this solver);
    `result` the lane's `SolveStatus` code (`status_name` names it). Lanes that failed hold NaN
    deviations.

    Noise and verdict (see `gj.judge`): `noise_floor` is the identity element's absolute
    deviation through the same path; `solver_floor` the reference's own solver error (relative;
    NaN when it could not be measured, 0 for models without a solver); `floor` the relative
    floor judged against; `control_max_rel` the per-sample deviations of the family's
    symmetry-breaking control (empty without one); `verdict` and `verdict_reason`.
    `parameter_growth` is, per lane, the largest |parameter| of the transformed model over the
    model's (1 for first-order sweeps and field families): outputs of such parameters carry
    that much more rounding, which the verdict's floor includes (`gj.judge`).
    """

    mode: str
    max_abs: np.ndarray
    mean_abs: np.ndarray
    max_rel: np.ndarray
    result: np.ndarray
    num_steps: np.ndarray
    num_evaluations: np.ndarray
    parameter_growth: np.ndarray
    reference_scale: float
    noise_floor: float
    solver_floor: float
    floor: float
    control_max_rel: np.ndarray
    verdict: str
    verdict_reason: str
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
        return (self.result == _SUCCESS) & np.isfinite(self.max_abs)

    def failures(self) -> dict[str, int]:
        """Failed lanes by reason (`SolveStatus` names: diffrax's kinds, `nonfinite_output`,
        `singular_gauge`)."""
        return {
            status_name(int(code)): int(np.sum(self.result == code))
            for code in np.unique(self.result[self.result != _SUCCESS])
        }

    @property
    def lane_efficiency(self) -> float:
        """Mean over vmapped chunks of mean(steps)/max(steps): the useful fraction of work."""
        steps = self.num_steps.astype(float)
        n = (len(steps) // self.chunk_size) * self.chunk_size
        chunks = steps[:n].reshape(-1, self.chunk_size) if n else steps[None]
        peak = chunks.max(axis=1)
        return float(np.mean(np.where(peak > 0, chunks.mean(axis=1) / np.maximum(peak, 1), 1.0)))

    def summary(self) -> dict:
        """JSON-ready summary, verdict first (then medians, maxima, failures, timings)."""
        ok = self.ok
        dev = self.max_abs[ok]
        counted = self.num_evaluations >= 0
        control = self.control_max_rel[np.isfinite(self.control_max_rel)]
        return {
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "mode": self.mode,
            "num_samples": self.num_samples,
            "num_ok": int(ok.sum()),
            "failures": self.failures(),
            "max_abs_max": float(dev.max()) if dev.size else float("nan"),
            "max_abs_median": float(np.median(dev)) if dev.size else float("nan"),
            "max_rel_max": float(self.max_rel[ok].max()) if dev.size else float("nan"),
            "parameter_growth_max": (
                float(self.parameter_growth[ok].max()) if dev.size else float("nan")
            ),
            "floor": self.floor,
            "solver_floor": self.solver_floor,
            "noise_floor": self.noise_floor,
            "control_max_rel_median": float(np.median(control)) if control.size else None,
            "reference_scale": self.reference_scale,
            "num_steps_median": float(np.median(self.num_steps)),
            "num_steps_max": int(self.num_steps.max()),
            "num_evaluations_median": (
                float(np.median(self.num_evaluations)) if counted.all() else "not counted"
            ),
            "lane_efficiency": self.lane_efficiency,
            "dtype": self.dtype,
            "precision": self.precision,
            "chunk_size": self.chunk_size,
            "num_devices": self.num_devices,
            "compile_time_s": self.compile_time_s,
            "run_time_s": self.run_time_s,
            "samples_per_s": self.num_samples / self.run_time_s if self.run_time_s else None,
        }


# host numpy, not a JAX operation: importing gaugejax must not start JAX's backends
# (`configure_cpu_devices` runs after the import)
_SUCCESS = int(np.asarray(jax.tree.leaves(SolveStatus.successful)[0]))


def status_name(code: int) -> str:
    """The `SolveStatus` name of a lane's integer `result` code."""
    return result_name(code)


def _flat(tree: PyTree) -> Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _finite(tree: PyTree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _param_size(tree: PyTree) -> Array:
    """The largest |entry| of the inexact arrays of `tree` (1 when it has none)."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    if not leaves:
        return jnp.ones(())
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves if x.size]))


def _lane_metrics(
    dev: PyTree, scale: Array, stats: SolveStats | None, g: PyTree, growth: Array | None = None
):
    a = jnp.abs(_flat(dev))
    if stats is None:
        zero = jnp.zeros((), dtype=jnp.int32)
        steps, nfe, status = zero, zero, SolveStatus.successful
    else:
        steps = jnp.max(stats.num_steps)
        # -1 marks "not counted" per input: keep it, do not sum it into a count
        nfe = jnp.where(
            jnp.all(stats.num_evaluations >= 0), jnp.sum(stats.num_evaluations), NOT_COUNTED
        )
        # the worst input decides (any failure fails the lane)
        failed = jax.vmap(lambda r: r != SolveStatus.successful)(stats.result)
        first = jnp.argmax(failed)
        status = jax.tree.map(lambda c: c[first], stats.result)
    status = SolveStatus.where(
        (status == SolveStatus.successful) & ~_finite(a), SolveStatus.nonfinite_output, status
    )
    status = SolveStatus.where(_finite(g), status, SolveStatus.singular_gauge)
    ok = status == SolveStatus.successful
    nan = jnp.asarray(jnp.nan, dtype=a.dtype)
    return {
        # a failed lane holds NaN, never a finite number that could pass for a deviation
        "max_abs": jnp.where(ok, jnp.max(a), nan),
        "mean_abs": jnp.where(ok, jnp.mean(a), nan),
        # floored: a reference that is exactly zero gives max_rel = max_abs / tiny, not NaN
        "max_rel": jnp.where(ok, jnp.max(a) / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny), nan),
        "result": status_code(status),
        "num_steps": steps.astype(jnp.int32),
        "num_evaluations": nfe.astype(jnp.int32),
        # how much larger the transformed model's parameters are than the model's: outputs
        # computed from parameters `growth` times larger carry `growth` times the rounding
        "parameter_growth": jnp.where(
            ok, jnp.ones((), a.dtype) if growth is None else growth.astype(a.dtype), nan
        ),
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


class _Static:
    """The non-array part of `(model, gauge, ...)`, hashable by its PyTree structure and leaves
    (a jit cache key): diffrax adjoints such as `BacksolveAdjoint` hold dicts, which Modules
    cannot hash. Unhashable leaves compare by identity."""

    def __init__(self, tree):
        self.tree = tree
        leaves, self._treedef = jax.tree.flatten(tree)
        self._key = tuple(_hashable(x) for x in leaves)

    def __hash__(self):
        return hash((self._treedef, self._key))

    def __eq__(self, other):
        return (
            isinstance(other, _Static)
            and self._treedef == other._treedef
            and self._key == other._key
        )


class _Identity:
    """Wraps an unhashable leaf: equal only to itself."""

    def __init__(self, x):
        self.x = x

    def __hash__(self):
        return id(self.x)

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.x is self.x


def _hashable(x):
    try:
        hash(x)
    except TypeError:
        return _Identity(x)
    return x


class _Plan(NamedTuple):
    """Everything static about a sweep program (hashable: the jit and executable cache key)."""

    static: _Static
    mode: str
    sensitivity: bool
    observable: Callable
    chunk_size: int
    mesh: Any
    axis: str  # the mesh axis the samples are split over
    precision: str


def _lane(plan: _Plan, sample_key, params, inputs, reference, scale) -> dict[str, Array]:
    model, gauge = eqx.combine(params, plan.static.tree)
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
        return _lane_metrics(dout, scale, stats, g)
    if plan.mode == "first_order":
        # the observable returns (outputs, stats): has_aux differentiates the outputs only
        _, dout, stats = jax.jvp(
            lambda a: plan.observable(gauge.act(a, model), inputs),
            (gauge.identity(),),
            (g,),
            has_aux=True,
        )
        return _lane_metrics(dout, scale, stats, g)
    moved = gauge.act(g, model)
    out, stats = plan.observable(moved, inputs)
    growth = None
    if isinstance(gauge, AbstractParameterGauge):
        # field families wrap the field with their own arrays: no parameter is rescaled
        tiny = jnp.finfo(scale.dtype).tiny
        growth = _param_size(moved) / jnp.maximum(_param_size(model), tiny)
    return _lane_metrics(jax.tree.map(jnp.subtract, out, reference), scale, stats, g, growth)


@functools.partial(jax.jit, static_argnums=0)
def _observe(plan: _Plan, params, inputs):
    """The reference outputs, the identity element's deviation (absolute), and whether every
    reference solve succeeded."""
    model, gauge = eqx.combine(params, plan.static.tree)
    reference, stats = plan.observable(model, inputs)
    identity = plan.observable(gauge.act(gauge.identity(), model), inputs)[0]
    noise = jnp.max(jnp.abs(_flat(identity) - _flat(reference)))
    if stats is None:
        return reference, noise, jnp.asarray(True)
    solved = jnp.all(jax.vmap(lambda r: r == SolveStatus.successful)(stats.result))
    return reference, noise, solved


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
        in_specs=(P(plan.axis), P(), P(), P(), P(), P()),
        out_specs=P(plan.axis),
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
    lowered = _block_jit.lower(plan, *args)
    if plan.mesh is not None:
        check_cpu_pool(list(plan.mesh.devices.flat), lowered.as_text())
    compiled = lowered.compile()
    with _EXECUTABLES_LOCK:
        _EXECUTABLES[signature] = compiled
        while len(_EXECUTABLES) > _MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    return compiled, time.perf_counter() - start


def _program_bytes(compiled) -> int:
    """The device bytes a compiled program holds while it runs (per device when sharded)."""
    m = compiled.memory_analysis()
    if m is None:  # a backend without the analysis: nothing to compare
        return 0
    size = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(size - m.alias_size_in_bytes)


def _model_dtype(model: Any):
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return jnp.result_type(*leaves) if leaves else None


def _check_inputs(inputs: PyTree, model: Any) -> None:
    """Eager checks of `inputs`: arrays (not Python lists or numbers) with one non-empty
    leading batch axis, of a floating dtype that matches the model's parameters."""
    if isinstance(inputs, list):
        raise TypeError(
            "`inputs` must be an array with a leading batch axis (or a tuple/PyTree of such "
            "arrays); received a Python list: wrap it with jnp.asarray."
        )
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError("`inputs` must hold at least one array; received an empty PyTree.")
    for x in leaves:
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(
                f"`inputs` must hold arrays with a leading batch axis; received a leaf of type "
                f"{type(x).__name__}."
            )
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"`inputs` must have a non-empty leading batch axis; received shape {x.shape}."
            )
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(
                f"`inputs` must be floating point; received dtype {x.dtype} (cast with "
                "jnp.asarray(inputs, dtype=...))."
            )
    if len({x.shape[0] for x in leaves}) != 1:
        raise ValueError(
            "`inputs` leaves must share one batch size; received leading axes "
            f"{[x.shape[0] for x in leaves]}."
        )
    want = _model_dtype(model)
    if want is not None:
        got = {str(x.dtype) for x in leaves}
        if got != {str(want)}:
            raise TypeError(
                f"`inputs` have dtype {sorted(got)} but the model's parameters are {want}: "
                f"cast the inputs (jnp.asarray(inputs, dtype=jnp.{want})) or the model."
            )


def _check_tolerances(model: AbstractNeuralODE, dtype) -> None:
    controller = model.stepsize_controller
    if not isinstance(controller, diffrax.PIDController):
        return
    eps = float(jnp.finfo(dtype).eps)
    for name in ("rtol", "atol"):
        value = getattr(controller, name)
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"the model's `stepsize_controller.{name}` must be a finite number >= 0; "
                f"received {value!r}."
            )
    rtol = controller.rtol
    if isinstance(rtol, (int, float)) and 0 < rtol < eps:
        raise ValueError(
            f"the model's `stepsize_controller.rtol` = {rtol!r} is below the epsilon of "
            f"{jnp.dtype(dtype).name} ({eps:.2e}): no controller can meet it."
        )


def _with_array_tolerances(model: AbstractNeuralODE) -> AbstractNeuralODE:
    """The model with its PID tolerances and `dt0` as arrays (traced, not static), so the
    tightened model below has the same structure and shares every compiled program."""
    controller = model.stepsize_controller
    dtype = _model_dtype(model) or jnp.result_type(float)
    if isinstance(controller, diffrax.PIDController):
        tol = tuple(jnp.asarray(getattr(controller, k), dtype=dtype) for k in ("rtol", "atol"))
        controller = eqx.tree_at(lambda c: (c.rtol, c.atol), controller, tol)
        model = model.with_options(stepsize_controller=controller)
    if model.dt0 is not None:
        model = model.with_options(dt0=jnp.asarray(model.dt0, dtype=dtype))
    return model


def _tightened(model: Any, observable: Callable, dtype) -> tuple[Any, str]:
    """The model solved much more accurately (same structure), or None; and how."""
    if isinstance(model, AbstractSolvedModel) and observable is default_observable:
        tol = jnp.maximum(model.tolerance / 1000, 4 * float(jnp.finfo(dtype).eps))
        tight = eqx.tree_at(lambda m: m.tolerance, model, tol)
        return tight, f"at tolerance {float(tol):.1e}"
    if not isinstance(model, AbstractNeuralODE) or observable is not default_observable:
        return None, "no solver" if not isinstance(
            model, AbstractNeuralODE
        ) else "custom observable"
    controller = model.stepsize_controller
    eps = 4 * float(jnp.finfo(dtype).eps)
    if isinstance(controller, diffrax.PIDController):
        rtol = jnp.maximum(controller.rtol / 1000, eps)
        atol = jnp.maximum(controller.atol / 1000, eps)
        tight = eqx.tree_at(lambda c: (c.rtol, c.atol), controller, (rtol, atol))
        how = f"at rtol {float(rtol):.1e}, atol {float(atol):.1e}"
        return model.with_options(stepsize_controller=tight), how
    if isinstance(controller, diffrax.ConstantStepSize) and model.dt0 is not None:
        return model.with_options(dt0=model.dt0 / 8), f"with dt0 / 8 = {float(model.dt0) / 8:.3g}"
    return None, f"no tighter solve for {type(controller).__name__}"


def _prepare(model, gauge, inputs, mode, observable, chunk_size, mesh, precision, axis="samples"):
    """Validate (before anything is traced), resolve `mode`, and split `(model, gauge, tight)`
    into arrays and the static plan."""
    if not isinstance(gauge, AbstractGauge):
        raise TypeError(f"`gauge` must be an AbstractGauge; received {type(gauge).__name__}.")
    gauge.check_model(model)
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}; received {mode!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}; received {precision!r}.")
    if not callable(observable):
        raise TypeError(f"`observable` must be callable; received {type(observable).__name__}.")
    _check_inputs(inputs, model)
    dtype = jax.tree.leaves(inputs)[0].dtype
    if mode == "auto":
        mode = "first_order" if gauge.infinitesimal else "finite"
    # A NeuralODE with the default observable gets its first-order response from the forward
    # sensitivity system (error-controlled); anything else by a jvp through the observable.
    sensitivity = isinstance(model, AbstractNeuralODE) and observable is default_observable
    if isinstance(model, AbstractNeuralODE):
        _check_tolerances(model, dtype)
        model = model.with_options(throw=False)
        if mode == "first_order" and not sensitivity:
            model = model.with_options(adjoint=diffrax.ForwardMode())
        model = _with_array_tolerances(model)
    if isinstance(model, AbstractSolvedModel):  # traced, so the tight model shares programs
        model = eqx.tree_at(lambda m: m.tolerance, model, jnp.asarray(model.tolerance, dtype))
    tight, how = _tightened(model, observable, dtype)
    # Arrays travel as jit arguments; everything else is the static, hashable plan.
    params, static = eqx.partition((model, gauge), eqx.is_array)
    plan = _Plan(_Static(static), mode, sensitivity, observable, chunk_size, mesh, axis, precision)
    tight_params = None
    if tight is not None:
        tight_params, tight_static = eqx.partition((tight, gauge), eqx.is_array)
        if _Static(tight_static) != plan.static:  # a structure we could not keep: no recheck
            tight_params, how = None, "no tighter solve with the same structure"
    try:  # trace once (no compilation) so shape errors name the inputs
        jax.eval_shape(functools.partial(_observe, plan), params, inputs)
    except (TypeError, ValueError) as e:
        shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), inputs)
        raise ValueError(
            f"the model (or the gauge's transformed model) could not be evaluated on `inputs` "
            f"of shape {shapes}: {type(e).__name__}: {e}"
        ) from e
    return plan, params, tight_params, how


class SweepLane(eqx.Module):
    """The per-sample function that `sweep` vmaps: `lane(key)` draws the gauge sample of `key`
    and returns its metrics (`max_abs`, `mean_abs`, `max_rel`, `result`, `num_steps`,
    `num_evaluations`, `parameter_growth`). Arrays are fields, so `eqx.filter_jit(lane)`
    traces them as arguments. Build it with `sweep_lane`; benchmarks loop, vmap or jit exactly
    this function."""

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

    **Raises:** as `sweep`.
    """
    plan, params, _, _ = _prepare(model, gauge, inputs, mode, observable, 1, None, precision)
    with jax.default_matmul_precision(precision):
        reference = _observe(plan, params, inputs)[0]
    return SweepLane(plan, params, inputs, reference, jnp.max(jnp.abs(_flat(reference))))


class _Runner(NamedTuple):
    """Runs blocks of one sweep configuration (devices, mesh, block size) for any plan."""

    devices: list
    mesh: Any
    block: int
    progress: bool

    def _check_memory(self, plan: _Plan, compiled, block: int, args, split) -> None:
        """Refuse a block program whose bytes (XLA's memory analysis: arguments, outputs and
        temporaries per device) exceed what each device can still allocate, naming the largest
        `chunk_size` that fits: the bytes are affine in the chunk (the lanes of one chunk run
        at once, the block's outputs scale with it), fitted from a second compile at half the
        chunk."""
        need = _program_bytes(compiled)
        free = free_memory_bytes(self.devices)
        if free is None or need <= free:
            return
        chunk = plan.chunk_size
        per_chunk = block // chunk  # chunks per block (times the devices along the axis)
        fit = "not even chunk_size = 1 fits"
        if chunk >= 2:
            half = plan._replace(chunk_size=chunk // 2)
            first = jax.ShapeDtypeStruct((per_chunk * (chunk // 2),), jnp.uint32, sharding=split)
            with jax.default_matmul_precision(plan.precision):
                smaller = _program_bytes(_compiled_block(half, first, *args)[0])
            slope = max((need - smaller) / (chunk - chunk // 2), 1.0)
            largest = int((free - (need - slope * chunk)) // slope)
            if largest >= 1:
                fit = f"the largest chunk_size that fits is about {min(largest, chunk - 1)}"
        raise ValueError(
            f"`chunk_size` = {chunk} needs about {need / 2**20:.1f} MiB per device (XLA's "
            f"memory analysis of the block program: arguments, outputs, temporaries), more "
            f"than the {free / 2**20:.1f} MiB each device can still allocate; {fit} (fitted "
            f"from the program at chunk_size = {chunk} and {chunk // 2}). Expected a smaller "
            "`chunk_size` or `chunks_per_block`."
        )

    def reference(self, plan: _Plan, params, inputs):
        """`(reference, identity deviation, all reference solves succeeded)` on the host."""
        with jax.default_matmul_precision(plan.precision):
            reference, noise, solved = _observe(plan, params, inputs)
        return reference, float(noise), bool(solved)

    def run(self, plan: _Plan, params, inputs, reference, key, num_samples, desc, block=None):
        """Per-sample metrics of `num_samples` samples (host numpy), compile and run time."""
        block = self.block if block is None else block
        with jax.default_matmul_precision(plan.precision):
            scale = jnp.max(jnp.abs(_flat(reference)))
            if self.mesh is not None:
                split = NamedSharding(self.mesh, P(plan.axis))
                key, params, inputs, reference, scale = _replicate(
                    (key, params, inputs, reference, scale), NamedSharding(self.mesh, P())
                )
            else:
                split = jax.sharding.SingleDeviceSharding(self.devices[0])
            args = (key, params, inputs, reference, scale)
            first = jax.ShapeDtypeStruct((block,), jnp.uint32, sharding=split)
            compiled, compile_time = _compiled_block(plan, first, *args)
            self._check_memory(plan, compiled, block, args, split)
        pieces, run_time = [], 0.0
        blocks = range(-(-num_samples // block))
        for b in tqdm(blocks, desc=desc, unit="block", disable=not self.progress):
            indices = jax.device_put(np.arange(b * block, (b + 1) * block, dtype=np.uint32), split)
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(indices, *args))
            run_time += time.perf_counter() - start
            pieces.append(_gather(out))
        merged = {k: np.concatenate([p[k] for p in pieces])[:num_samples] for k in pieces[0]}
        return merged, compile_time, run_time


def _tolerance(params, scale: float) -> float:
    """The relative accuracy a PID-controlled solve asks for, `max(rtol, atol / scale)` (0 for
    other controllers): what the tight re-solve's own error is measured against."""
    solved = [
        m
        for m in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, AbstractSolvedModel))
        if isinstance(m, AbstractSolvedModel)
    ]
    if solved:
        return float(solved[0].tolerance)
    models = [
        m
        for m in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, AbstractNeuralODE))
        if isinstance(m, AbstractNeuralODE)
    ]
    controller = models[0].stepsize_controller if models else None
    if not isinstance(controller, diffrax.PIDController):
        return 0.0
    return max(float(controller.rtol), float(controller.atol) / scale)


def _good(merged: dict) -> np.ndarray:
    return (merged["result"] == _SUCCESS) & np.isfinite(merged["max_rel"])


def _layout(devices, shard, mesh, axis) -> tuple[list, Any, int]:
    """`(devices, mesh or None, shards along the sample axis)` of a sweep's arguments."""
    if mesh is not None:
        if not isinstance(mesh, jax.sharding.Mesh):
            raise ValueError(f"`mesh` must be a jax.sharding.Mesh; received {type(mesh).__name__}.")
        if devices is not None:
            raise ValueError("pass `devices` or `mesh`, not both (the mesh holds its devices).")
        if shard is False:
            raise ValueError("`shard=False` runs on one device without a mesh; received a `mesh`.")
        if axis not in mesh.axis_names:
            raise ValueError(
                f"`mesh_axis` must name an axis of `mesh`, one of {list(mesh.axis_names)}; "
                f"received {axis!r}."
            )
        return list(mesh.devices.flat), mesh, int(mesh.shape[axis])
    if axis != "samples":
        raise ValueError(
            f"`mesh_axis` names an axis of `mesh`; received mesh_axis={axis!r} without a mesh."
        )
    devices = list(jax.devices()) if devices is None else list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"`devices` must be a non-empty list of jax devices; received {devices}.")
    if shard is False and len(devices) > 1:
        raise ValueError(
            f"`shard=False` runs on one device; received {len(devices)} `devices` (pass one)."
        )
    if not (len(devices) > 1 if shard is None else shard):
        return devices, None, 1
    return devices, jax.make_mesh((len(devices),), ("samples",), devices=devices), len(devices)


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
    shard: bool | None = None,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "samples",
    control_samples: int = 8,
    progress: bool = False,
) -> SweepResult:
    """Check a gauge family on many random samples: jit + vmap, chunked, sharded over devices,
    with a verdict ("holds", "broken", "inconclusive") and its reason (`gj.judge`).

    **Arguments:**

    - `model`: the model (e.g. a `NeuralODE`, an `eqx.nn.MLP`); `gauge`: an `AbstractGauge`
      acting on it (`gauge.check_model(model)` runs first).
    - `inputs`: a batch of inputs with a leading axis (an array, or a tuple of arrays passed
      as positional arguments), fixed for all samples, of the model's floating dtype.
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
      matmuls otherwise run as TF32 on recent GPUs). `"default"`, `"tensorfloat32"` or
      `"bfloat16"` with float32 inputs warn: their rounding is not part of the verdict's floor.
    - `devices`: devices to shard the sample axis over (default: all of `jax.devices()`, which
      spans every process after `jax.distributed.initialize`; then every process must call
      `sweep` with the same arguments, and each gets the whole result).
    - `shard`: run the block under `jax.shard_map` over a mesh of `devices` (default None:
      when there is more than one device; True also over one device, to measure the sharded
      path's overhead; False needs a single device).
    - `mesh`, `mesh_axis`: instead of `devices`, a `jax.sharding.Mesh` of the caller's (e.g. one
      spanning the processes of `jax.distributed`) and the axis of it that the samples are split
      over; the other axes hold replicas. Without `mesh` the sweep builds a one-axis mesh of
      `devices` named `"samples"`.
    - `control_samples`: samples of the family's symmetry-breaking `control()`, and samples
      re-solved at a tighter tolerance when the verdict needs them (0: neither).
    - `progress`: show a tqdm bar over blocks.

    **Returns:** a `SweepResult` with the verdict. Solver failures are reported per lane (NaN
    deviations and a `SolveStatus` code), never raised. Compiled programs are kept per (static
    configuration, shapes): a second sweep of the same shapes reports `compile_time_s == 0.0`;
    the control of a field family and the re-solve at a tighter tolerance reuse the program.

    **Raises:** before anything is traced: `TypeError` for a model the gauge does not act on
    (from `check_model`), for `inputs` that are a list, not floating or not of the model's
    dtype; `ValueError` for non-positive sizes, an empty batch, an unknown mode or precision,
    an empty `devices`, a `shard` that is not a bool or None (or False with several devices),
    `devices` and `mesh` together, a `mesh_axis` that is not an axis of `mesh`, float64 inputs
    on devices without float64 (`gaugejax.supports_float64`), a solver tolerance out of range,
    or inputs the model cannot take; once compiled (before it runs), a block program whose
    bytes exceed the devices' free memory (with the largest `chunk_size` that fits), or one
    with batched LAPACK kernels sharded over as many CPU devices as XLA:CPU's intra-op pool has
    threads (it could hang: `gj.configure_cpu_devices`).
    """
    num_samples = _positive_int("num_samples", num_samples)
    chunk_size = _positive_int("chunk_size", chunk_size)
    chunks_per_block = _positive_int("chunks_per_block", chunks_per_block)
    if isinstance(control_samples, bool) or not isinstance(control_samples, (int, np.integer)):
        raise ValueError(f"`control_samples` must be an int >= 0; received {control_samples!r}.")
    if control_samples < 0:
        raise ValueError(f"`control_samples` must be an int >= 0; received {control_samples!r}.")
    if shard is not None and not isinstance(shard, bool):
        raise ValueError(f"`shard` must be None, True or False; received {shard!r}.")
    devices, mesh, shards = _layout(devices, shard, mesh, mesh_axis)
    key = _as_typed_key(key)
    plan, params, tight_params, how = _prepare(
        model, gauge, inputs, mode, observable, chunk_size, mesh, precision, mesh_axis
    )
    input_dtype = jax.tree.leaves(inputs)[0].dtype
    if input_dtype == jnp.float64 and not all(supports_float64(d) for d in devices):
        lacking = sorted({d.platform for d in devices if not supports_float64(d)})
        raise ValueError(
            f"`inputs` are float64, but the {', '.join(lacking)} devices in `devices` do not "
            "compute in float64; expected float32 inputs and model, or devices with float64."
        )
    if precision in REDUCED_PRECISIONS and input_dtype == jnp.float32:
        warnings.warn(
            f"sweep(precision={precision!r}) with float32 inputs: on GPUs and TPUs such matmuls "
            f"carry relative errors of about {REDUCED_PRECISIONS[precision]:.0e}, which the "
            "verdict's float floor does not include (a symmetry that holds can read as "
            "broken); use precision='highest' for deviation measurements.",
            stacklevel=2,
        )
    control = gauge.control() if control_samples else None
    if control is not None:
        control_plan, control_params, _, _ = _prepare(
            model, control, inputs, plan.mode, observable, chunk_size, mesh, precision, mesh_axis
        )
    # no more chunks per block than the samples need (padding lanes are wasted work)
    chunks_needed = -(-num_samples // (chunk_size * shards))
    block = chunk_size * min(chunks_per_block, chunks_needed) * shards
    runner = _Runner(devices, mesh, block, progress)

    reference, noise, solved = runner.reference(plan, params, inputs)
    dtype = str(jax.tree.leaves(reference)[0].dtype)
    tiny, eps = float(jnp.finfo(dtype).tiny), float(jnp.finfo(dtype).eps)
    scale = max(float(jnp.max(jnp.abs(_flat(reference)))), tiny)
    float_floor = FLOAT_FLOOR_ULPS * eps
    solver_floor, tight_reference = 0.0, None
    if tight_params is not None:
        tight_reference, _, tight_solved = runner.reference(plan, tight_params, inputs)
        gap = float(jnp.max(jnp.abs(_flat(tight_reference) - _flat(reference))))
        if tight_solved:
            solver_floor = gap / scale
            how = f"solver floor and re-check {how}"
        else:  # e.g. max_steps too small for the tighter tolerance: float floor only
            solver_floor, tight_params = float("nan"), None
            how = f"the re-solve {how} failed (max_steps?): no solver floor"
    # NaN when a reference solve failed: the verdict is then inconclusive
    floor = max(float_floor, 0.0 if math.isnan(solver_floor) else solver_floor, noise / scale)
    if not solved:
        floor = float("nan")

    merged, compile_time, run_time = runner.run(
        plan, params, inputs, reference, key, num_samples, "sweep"
    )
    good = _good(merged)
    deviation = float(merged["max_rel"][good].max()) if good.any() else float("nan")
    recheck = None
    needs_recheck = good.any() and math.isfinite(floor) and deviation > HOLD_FACTOR * floor
    if tight_params is not None and control_samples and needs_recheck:
        # the first samples again, at the tight tolerance: solver error shrinks, breaking does not
        n = min(control_samples, num_samples)
        small = chunk_size * shards
        again, _, _ = runner.run(
            plan, tight_params, inputs, tight_reference, key, n, "re-check", block=small
        )
        both = good[:n] & _good(again)
        if both.any():
            recheck = Recheck(
                loose=float(merged["max_rel"][:n][both].max()),
                tight=float(again["max_rel"][both].max()),
                tight_floor=max(float_floor, noise / scale, _tolerance(tight_params, scale)),
                how=how.replace("solver floor and re-check ", ""),
            )
    control_rel = np.zeros((0,))
    if control is not None:
        n = min(control_samples, num_samples)
        out, _, _ = runner.run(
            control_plan,
            control_params,
            inputs,
            reference,
            jax.random.fold_in(key, 2**31 - 1),
            n,
            "control",
        )
        control_rel = np.where(_good(out), out["max_rel"], np.nan)
    finite_control = control_rel[np.isfinite(control_rel)]
    result = SweepResult(
        mode=plan.mode,
        reference_scale=scale,
        noise_floor=noise,
        solver_floor=solver_floor,
        floor=floor,
        control_max_rel=control_rel,
        verdict="",
        verdict_reason="",
        dtype=dtype,
        precision=precision,
        chunk_size=chunk_size,
        num_devices=len(devices),
        compile_time_s=compile_time,
        run_time_s=run_time,
        **merged,
    )
    verdict = judge(
        deviation,
        floor,
        num_ok=int(good.sum()),
        num_samples=num_samples,
        failures=result.failures(),
        control=float(np.median(finite_control)) if finite_control.size else None,
        recheck=recheck,
        floor_note=how,
        growth=float(merged["parameter_growth"][good].max()) if good.any() else 1.0,
        eps=eps,
    )
    return dataclasses.replace(result, verdict=verdict.verdict, verdict_reason=verdict.reason)
