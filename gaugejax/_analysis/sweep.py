"""The one sweep engine for every gauge family: jit(vmap) over gauge samples, chunked, sharded.

Sample i uses the key `fold_in(key, i)`, so results do not depend on chunk or block sizes or
on the number of devices. The engine is four private modules: this one validates the
arguments, asks the model for its sweep copy and tightened copy (`gaugejax.models.solved`)
and splits them into the static `Plan` and arrays; `lane` is the function of one sample;
`blocks` compiles, caches and runs blocks of lanes over devices (`jax.shard_map`); `floors`
measures the floors and runs the re-checks and the control; `sweep_result` holds the result.
Multi-host: after `jax.distributed.initialize`, `jax.devices()` spans every process; each
process calls `sweep` with the same arguments, runs the samples of its own devices, and
receives the whole result (one all-gather of per-sample scalars per block).
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree

from .._core.solve import SolveStats
from .._infra.compiles import compiles
from .._infra.devices import default_chunk_size, supports_float64
from ..gauges.base import AbstractGauge
from ..models.solved import for_sweep, tightened
from .blocks import Runner
from .floors import Tight, control_deviations, measure_floors, recheck
from .lane import (
    Plan,
    Static,
    default_observable as default_observable,
    in_dtype,
    lane,
    observe_reference,
)
from .sweep_result import SweepResult as SweepResult, good, status_name as status_name
from .verdict import control_clears, judge, rounding_floor, verdict_floor


MODES = ("auto", "finite", "first_order")
PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
# float32 matmuls at these precisions round their inputs on GPUs and TPUs (relative error of
# about 1e-3 for TF32, the GPU default, and 1e-2 for bfloat16): far above the float32 floor
# a verdict is judged against, so a symmetry that holds would read as broken
REDUCED_PRECISIONS = {"default": 1e-3, "tensorfloat32": 1e-3, "bfloat16": 1e-2}


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


def _check_devices_and_precision(input_dtype, devices: list, precision: str) -> None:
    """Refuse float64 inputs on devices without float64; warn for float32 inputs at a matmul
    precision whose rounding the verdict's float floor does not include."""
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
            stacklevel=3,  # the caller of sweep
        )


class _Prepared(NamedTuple):
    plan: Plan
    params: PyTree
    tight: Tight | None
    how: str


def _prepare(
    model, gauge, inputs, mode, observable, chunk_size, mesh, precision, axis="samples",
    trace_reference=True,
):  # fmt: skip
    """Validate (before anything is traced), resolve `mode`, ask the model for its sweep copy
    and its tightened copy, and split `(model, gauge)` into arrays and the static plan; with
    `trace_reference`, trace the reference program once (the trace its run reuses) so that a
    shape error names the inputs."""
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
    # With the default observable the model gives its own first-order response (a neural
    # ODE's forward sensitivity system); a custom one is differentiated by a jvp through it.
    differentiated = mode == "first_order" and observable is not default_observable
    model = for_sweep(model, dtype, differentiated=differentiated)
    gauge = in_dtype(gauge, dtype)  # the gauge's own arrays in the sweep's dtype
    tight, how = tightened(model, dtype)
    if observable is not default_observable and tight is not None:
        # a re-solve of the model says nothing about what a custom observable computes
        tight, how = None, "custom observable"
    # Arrays travel as jit arguments; everything else is the static, hashable plan.
    params, static = eqx.partition((model, gauge), eqx.is_array)
    plan = Plan(Static(static), mode, observable, chunk_size, mesh, axis, precision)
    if tight is not None:
        tight_params, tight_static = eqx.partition((tight, gauge), eqx.is_array)
        if Static(tight_static) != plan.static:  # a structure we could not keep: no recheck
            tight, how = None, "no tighter solve with the same structure"
        else:
            tight = Tight(tight, tight_params, how)
    if not trace_reference:
        return _Prepared(plan, params, tight, how)
    try:  # trace once (no compilation) so shape errors name the inputs
        reference = functools.partial(observe_reference, plan.without_blocks())
        # at the sweep's precision, as the reference runs: the same trace, reused
        with jax.default_matmul_precision(precision):
            jax.eval_shape(reference, params, inputs)
    except (TypeError, ValueError) as e:
        shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), inputs)
        raise ValueError(
            f"the model (or the gauge's transformed model) could not be evaluated on `inputs` "
            f"of shape {shapes}: {type(e).__name__}: {e}"
        ) from e
    return _Prepared(plan, params, tight, how)


class SweepLane(eqx.Module):
    """The per-sample function that `sweep` vmaps: `lane(key)` draws the gauge sample of `key`
    and returns its metrics (`max_abs`, `mean_abs`, `max_rel`, `result`, `num_steps`,
    `num_evaluations`, `parameter_growth`). Arrays are fields, so `eqx.filter_jit(lane)`
    traces them as arguments. Build it with `sweep_lane`; benchmarks loop, vmap or jit exactly
    this function."""

    plan: Plan = eqx.field(static=True)
    params: PyTree
    inputs: PyTree
    reference: PyTree
    scale: Array

    def __call__(self, key: PRNGKeyArray) -> dict[str, Array]:
        # the context applies at trace time, so the sweep's precision holds under any jit
        with jax.default_matmul_precision(self.plan.precision):
            return lane(self.plan, key, self.params, self.inputs, self.reference, self.scale)


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
        reference, scale, _, _ = observe_reference(plan.without_blocks(), params, inputs)
    return SweepLane(plan, params, inputs, reference, scale)


def sweep(
    model: Any,
    gauge: AbstractGauge,
    inputs: PyTree,
    *,
    key: PRNGKeyArray,
    num_samples: int,
    chunk_size: int | None = None,
    chunks_per_block: int = 4,
    mode: str = "auto",
    observable: Callable[[Any, PyTree], tuple[PyTree, SolveStats | None]] = default_observable,
    precision: str = "highest",
    devices: list | None = None,
    shard: bool | None = None,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "samples",
    control_samples: int = 8,
    recheck_samples: int = 8,
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
    - `chunk_size`: lanes vmapped together (default: `gj.default_chunk_size(devices)`, the
      fastest measured on the platform: 32 on CPU), capped at the samples per device rounded
      up to a power of two (padding lanes are wasted work; nearby sample counts share a
      program);
      `chunks_per_block`: chunks per compiled call and device (one host round trip per
      block).
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
    - `control_samples`: samples of the family's symmetry-breaking `control()` (0: none).
    - `recheck_samples`: lanes re-solved at a tighter tolerance whenever the model has one
      (half the largest deviations, half random; whatever `control_samples` is). 0 skips the
      re-check (timing runs): a deviation above the floor is then "inconclusive", never
      judged without it.
    - `progress`: show a tqdm bar over blocks.

    **Returns:** a `SweepResult` with the verdict. Solver failures are reported per lane (NaN
    deviations and a `SolveStatus` code), never raised. The first call compiles a few programs
    (the reference, the block, and, for a sweep of several blocks, a block of the re-check's
    and control's own size, which a sweep of one block runs them in: `num_programs`, and
    `compile_time_s` the seconds spent on them); programs are kept per (static configuration,
    shapes): a second sweep of the same shapes compiles nothing (`num_programs == 0`,
    `compile_time_s == 0.0`), a new `chunk_size` only the block.

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
    if chunk_size is not None:
        chunk_size = _positive_int("chunk_size", chunk_size)
    chunks_per_block = _positive_int("chunks_per_block", chunks_per_block)
    for name, value in (("control_samples", control_samples), ("recheck_samples", recheck_samples)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0; received {value!r}.")
    if shard is not None and not isinstance(shard, bool):
        raise ValueError(f"`shard` must be None, True or False; received {shard!r}.")
    devices, mesh, shards = _layout(devices, shard, mesh, mesh_axis)
    key = _as_typed_key(key)
    # chunks no larger than the samples per device need (padding lanes are wasted work),
    # rounded up to a power of two so that nearby sample counts share one program
    per_device = -(-num_samples // shards)
    if chunk_size is None:
        chunk_size = default_chunk_size(devices)
    chunk = min(chunk_size, 1 << (per_device - 1).bit_length())
    with compiles() as compiled:
        result = _sweep(
            model, gauge, inputs, key, num_samples, chunk, chunks_per_block, mode,
            observable, precision, devices, mesh, shards, mesh_axis, control_samples,
            recheck_samples, progress,
        )  # fmt: skip
    return dataclasses.replace(
        result, compile_time_s=compiled.seconds, num_programs=compiled.programs
    )


def _sweep(
    model, gauge, inputs, key, num_samples, chunk_size, chunks_per_block, mode, observable,
    precision, devices, mesh, shards, mesh_axis, control_samples, recheck_samples, progress,
) -> SweepResult:  # fmt: skip
    prepared = _prepare(
        model, gauge, inputs, mode, observable, chunk_size, mesh, precision, mesh_axis
    )
    plan = prepared.plan
    _check_devices_and_precision(jax.tree.leaves(inputs)[0].dtype, devices, precision)
    control = gauge.control() if control_samples else None
    if control is not None:
        # the control's lanes compare with the sweep's reference: its own reference program
        # never runs, and tracing it (for the shape check) cost a second reference's trace
        controlled = _prepare(
            model, control, inputs, plan.mode, observable, chunk_size, mesh, precision, mesh_axis,
            trace_reference=False,
        )  # fmt: skip
    # no more chunks per block than the samples need (padding lanes are wasted work)
    chunks_needed = -(-num_samples // (chunk_size * shards))
    block = chunk_size * min(chunks_per_block, chunks_needed) * shards
    runner = Runner(devices, mesh, block, progress)

    floors = measure_floors(runner, plan, prepared.params, inputs, prepared.tight, prepared.how)
    merged, _, run_time = runner.run(
        plan, prepared.params, inputs, floors.reference, key, num_samples, "sweep"
    )
    blocks = -(-num_samples // block)  # the sweep's own blocks
    ok = good(merged)
    deviation = float(merged["max_rel"][ok].max()) if ok.any() else float("nan")
    growth = float(merged["parameter_growth"][ok].max()) if ok.any() else 1.0
    floor = verdict_floor(floors.floor, growth, floors.eps)
    # the re-check runs whenever the model has a tighter solve, whatever `control_samples`,
    # in a block of its own size when that pays (`Runner.side`)
    again, missing = None, floors.missing
    if recheck_samples:
        again = recheck(runner, plan, floors, inputs, merged, key, recheck_samples, blocks)
    elif floors.tight is not None:
        missing = "the re-check was not run (recheck_samples=0)"
    n = int(min(control_samples, num_samples))  # samples of the control
    control_rel = np.zeros((0,))
    if control is not None:
        control_rel = control_deviations(
            runner,
            controlled.plan,
            controlled.params,
            inputs,
            floors.reference,
            key,
            n,
            blocks,
        )
    finite_control = control_rel[np.isfinite(control_rel)]
    median = float(np.median(finite_control)) if finite_control.size else None
    if (
        median is not None
        and again is not None
        and controlled.tight is not None
        and np.isfinite(again.tight).all()
        and again.within().all()
        and not control_clears(median, deviation, floor)
    ):
        # the verdict will be read at the tight tolerance: the control is re-solved there too
        control_tight = control_deviations(
            runner,
            controlled.plan,
            controlled.tight.params,
            inputs,
            floors.tight_reference,
            key,
            n,
            blocks,
        )
        again = dataclasses.replace(again, control_tight=control_tight)
    # the re-check's evidence (without one, SweepResult's empty defaults)
    rechecked = {}
    if again is not None:
        rechecked = dict(
            recheck_lanes=again.lanes,
            recheck_loose_max_rel=again.loose,
            recheck_max_rel=again.tight,
            recheck_floor=again.tight_floor,
            control_recheck_max_rel=again.control_tight,
        )
    result = SweepResult(
        mode=plan.mode,
        reference_scale=floors.scale,
        noise_floor=floors.noise,
        solver_floor=floors.solver_floor,
        float_floor=floors.float_floor,
        rounding_floor=rounding_floor(growth, floors.eps) if ok.any() else float("nan"),
        floor=floor,
        control_max_rel=control_rel,
        recheck_how=missing or floors.note if again is None else again.how,
        **rechecked,
        verdict="",
        verdict_reason="",
        dtype=str(jax.tree.leaves(floors.reference)[0].dtype),
        precision=precision,
        chunk_size=chunk_size,
        num_devices=len(devices),
        compile_time_s=0.0,  # the whole call's, set by `sweep`
        run_time_s=run_time,
        **{k: v for k, v in merged.items() if k != "draw"},  # the re-check's draws
    )
    verdict = judge(
        deviation,
        floors.floor,
        num_ok=int(ok.sum()),
        num_samples=num_samples,
        failures=result.failures(),
        control=median,
        recheck=again,
        floor_note=floors.note,
        missing=missing,
        growth=growth,
        eps=floors.eps,
    )
    return dataclasses.replace(result, verdict=verdict.verdict, verdict_reason=verdict.reason)
