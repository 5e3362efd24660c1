"""Searching a gauge orbit for cheap representatives, and gauge fixing by optimisation.

A gauge transformation keeps a neural ODE's function but not the work an adaptive solver does
to compute it. Three pieces:

- `cheapest_lane`: the sample of a `sweep` with the fewest field evaluations, its element
  rebuilt exactly (`lane_element`: sample i of a sweep is `gauge.sample(fold_in(key, i))`).
- `element_cost`: the adaptive cost (steps, field evaluations) of the model transformed by one
  element, and its output deviation from the model, solved the way a sweep lane solves it.
- `optimise_gauge`: gauge fixing by optimisation. The element's unconstrained parameters (an
  `AbstractElementChart` maps them onto valid elements: `LipschitzChart` squashes a base
  element's Lipschitz bound below the family's `rho`, as `sample` normalises it) are trained
  with optax through `gj.train` (checkpoints, exact resume) to lower an objective of the
  transformed model (e.g. `TrajectoryObjective`, the kinetic or uniform-motion functional); the
  model itself is fixed.
"""

import abc
import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._analysis.sweep import SweepResult
from .._core._checks import check_value
from .._core.solve import SolveStatus, result_name
from .._infra.train import TrainResult, read_checkpoint, train
from ..gauges.base import AbstractGauge
from ..gauges.composed import ComposedElement, ComposedGauge
from ..gauges.diffeo import SpatialDiffeoGauge
from ..gauges.maps import Compose, Inverse
from ..gauges.reparam import TimeReparamGauge
from ..models import AbstractNeuralODE
from .gauge_fixing import TRAJECTORY_TERMS, gauge_fixing_penalty


def _typed_key(key, name: str = "key") -> PRNGKeyArray:
    """A typed key from a typed key or a raw uint32[2] key (as `sweep` accepts)."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    arr = np.asarray(key) if not isinstance(key, jax.Array) else key
    if arr.dtype == np.uint32 and arr.shape == (2,):
        return jax.random.wrap_key_data(jnp.asarray(arr))
    raise ValueError(
        f"`{name}` must be a jax.random.key (or a raw uint32[2] key); received "
        f"{getattr(arr, 'dtype', type(key).__name__)}{getattr(arr, 'shape', '')}."
    )


def _index(name: str, value, size: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0; received {value!r}.")
    if size is not None and value >= size:
        raise ValueError(f"`{name}` must be below {size}; received {value!r}.")
    return int(value)


def lane_element(gauge: AbstractGauge, key: PRNGKeyArray, index: int) -> PyTree:
    """The element that `sweep(model, gauge, inputs, key=key, ...)` drew for sample `index`.

    **Arguments:** `gauge` (the sweep's family), `key` (the sweep's base key, typed or raw
    uint32[2]), `index` (the sample, an int >= 0).

    **Returns:** `gauge.sample(fold_in(key, index))`, bit for bit the sweep's element.

    **Raises:** `TypeError` for a `gauge` that is not an `AbstractGauge`; `ValueError` for a
    key that is not a key or a negative index.
    """
    if not isinstance(gauge, AbstractGauge):
        raise TypeError(f"`gauge` must be an AbstractGauge; received {type(gauge).__name__}.")
    key = _typed_key(key)
    index = _index("index", index)
    return gauge.sample(jax.random.fold_in(key, np.uint32(index)))


@dataclasses.dataclass(frozen=True)
class CheapestLane:
    """The cheapest solved lane of a sweep (`cheapest_lane`).

    **Fields:** `index` (the sample), `element` (rebuilt: `lane_element(gauge, key, index)`),
    `num_evaluations` (field evaluations summed over the inputs), `num_steps` (the largest
    step count over the inputs), `max_abs`, `max_rel` (the lane's output deviation, as the
    sweep reports it), `num_ok` (the solved lanes it was chosen from).
    """

    index: int
    element: PyTree
    num_evaluations: int
    num_steps: int
    max_abs: float
    max_rel: float
    num_ok: int


BY = ("num_evaluations", "num_steps")


def cheapest_lane(
    result: SweepResult,
    gauge: AbstractGauge,
    key: PRNGKeyArray,
    *,
    by: str = "num_evaluations",
) -> CheapestLane:
    """The solved lane of `result` with the fewest field evaluations (or steps), its element
    rebuilt.

    **Arguments:**

    - `result`: a finite-mode `SweepResult`; `gauge`, `key`: the family and base key it was
      swept with (sample i is `gauge.sample(fold_in(key, i))`).
    - `by`: `"num_evaluations"` (default) or `"num_steps"`; ties go to the lane with the
      smaller deviation, then to the lower index.

    **Returns:** a `CheapestLane`.

    **Raises:** `TypeError` for a `result` that is not a `SweepResult` or a `gauge` that is not
    an `AbstractGauge`; `ValueError` for an unknown `by`, a first-order sweep, evaluations that
    were not counted (the solver's are not a fixed multiple of its steps), or no solved lane.
    """
    if not isinstance(result, SweepResult):
        raise TypeError(f"`result` must be a SweepResult; received {type(result).__name__}.")
    if by not in BY:
        raise ValueError(f"`by` must be one of {list(BY)}; received {by!r}.")
    if result.mode != "finite":
        raise ValueError(
            f"`result` must be a finite-mode sweep (its lanes solve transformed models); "
            f"received mode {result.mode!r}."
        )
    cost = np.asarray(getattr(result, by))
    if np.any(cost < 0):
        raise ValueError(
            f"`result.{by}` was not counted for this solver (-1): the cheapest lane cannot be "
            "chosen by it (use a solver whose evaluations are counted, e.g. diffrax.Tsit5)."
        )
    ok = np.flatnonzero(result.ok)
    if ok.size == 0:
        raise ValueError(
            f"`result` has no solved lane ({result.num_samples} samples; failures "
            f"{result.failures()}): there is no cheapest one."
        )
    # lexicographic: cost, then deviation, then index
    order = np.lexsort((ok, result.max_rel[ok], cost[ok]))
    i = int(ok[order[0]])
    return CheapestLane(
        index=i,
        element=lane_element(gauge, key, i),
        num_evaluations=int(result.num_evaluations[i]),
        num_steps=int(result.num_steps[i]),
        max_abs=float(result.max_abs[i]),
        max_rel=float(result.max_rel[i]),
        num_ok=int(ok.size),
    )


@dataclasses.dataclass(frozen=True)
class ElementCost:
    """The adaptive cost of a transformed model on a batch, and its output deviation
    (`element_cost`).

    **Fields:** `num_steps` (the largest attempted step count over the inputs),
    `num_evaluations` (field evaluations summed over the inputs, -1 if not counted),
    `reference_steps`, `reference_evaluations` (the same of the untransformed model),
    `max_abs` (`max |out - ref|`), `max_rel` (`max_abs / max |ref|`), `status` (the
    `SolveStatus` name of the transformed model's first failed input, `"nonfinite_output"`,
    `"reference_failed"` when only the model's own solve failed, `"successful"` when every
    solve succeeded: the deviations are NaN otherwise), `outputs`, `reference` (host arrays).
    """

    num_steps: int
    num_evaluations: int
    reference_steps: int
    reference_evaluations: int
    max_abs: float
    max_rel: float
    status: str
    outputs: np.ndarray
    reference: np.ndarray

    @property
    def ok(self) -> bool:
        return self.status == "successful"


@eqx.filter_jit
def _costs(model, gauge, g, inputs):
    moved = gauge.act(g, model)
    out, stats = jax.vmap(moved.solve)(inputs)
    ref, ref_stats = jax.vmap(model.solve)(inputs)
    failed = jax.vmap(lambda r: r != SolveStatus.successful)(stats.result)
    first = jnp.argmax(failed)
    status = jax.tree.map(lambda c: c[first], stats.result)
    ref_failed = jnp.any(jax.vmap(lambda r: r != SolveStatus.successful)(ref_stats.result))
    return out, stats, ref, ref_stats, status, ref_failed


def _counted_sum(evaluations) -> int:
    evaluations = np.asarray(evaluations)
    return int(evaluations.sum()) if np.all(evaluations >= 0) else -1


def element_cost(
    model: AbstractNeuralODE,
    gauge: AbstractGauge,
    g: PyTree,
    inputs: Float[Array, "n ..."],
) -> ElementCost:
    """Adaptive steps and field evaluations of `gauge.act(g, model)` on `inputs`, and its
    output deviation from `model` (both solved with the model's own solver and controller).

    The numbers are those of a `sweep` lane for the same element (steps: the largest over the
    inputs; evaluations: their sum; deviation: `max |out - ref|`, relative to `max |ref|`).
    Solver failures are reported in `status`, never raised. One compiled program per model,
    family and element structure (elements and arrays are traced).

    **Arguments:** `model` (a neural ODE), `gauge` (a family acting on it), `g` (one of its
    elements, e.g. `gauge.identity()`, a `cheapest_lane` element or `optimise_gauge`'s result),
    `inputs` (a batch of initial states, leading axis).

    **Returns:** an `ElementCost`.

    **Raises:** `TypeError` for a `gauge` that is not an `AbstractGauge` or a model it does
    not act on (`gauge.check_model`); `ValueError` for an empty batch.
    """
    if not isinstance(gauge, AbstractGauge):
        raise TypeError(f"`gauge` must be an AbstractGauge; received {type(gauge).__name__}.")
    gauge.check_model(model)
    if not isinstance(model, AbstractNeuralODE):
        raise TypeError(f"`model` must be a neural ODE; received {type(model).__name__}.")
    if jnp.ndim(inputs) < 1 or jnp.shape(inputs)[0] == 0:
        raise ValueError(
            f"`inputs` must have a non-empty leading batch axis; received shape "
            f"{jnp.shape(inputs)}."
        )
    model = model.with_options(throw=False)
    out, stats, ref, ref_stats, status, ref_failed = jax.device_get(_costs(model, gauge, g, inputs))
    name = result_name(int(np.asarray(jax.tree.leaves(status)[0])))
    out, ref = np.asarray(out), np.asarray(ref)
    if name == "successful" and not np.all(np.isfinite(out)):
        name = "nonfinite_output"
    if bool(ref_failed):
        name = "reference_failed" if name == "successful" else name
    ok = name == "successful"
    dev = float(np.max(np.abs(out - ref))) if ok else math.nan
    scale = max(float(np.max(np.abs(ref))), float(np.finfo(ref.dtype).tiny))
    return ElementCost(
        num_steps=int(np.max(stats.num_steps)),
        num_evaluations=_counted_sum(stats.num_evaluations),
        reference_steps=int(np.max(ref_stats.num_steps)),
        reference_evaluations=_counted_sum(ref_stats.num_evaluations),
        max_abs=dev,
        max_rel=dev / scale if ok else math.nan,
        status=name,
        outputs=out,
        reference=ref,
    )


class AbstractElementChart(eqx.Module):
    """Unconstrained parameters -> valid elements of a gauge family: every point of the
    parameter space maps to an element that meets the family's constraints, so an optimiser
    may move the parameters freely (`optimise_gauge`)."""

    @abc.abstractmethod
    def element(self, raw: PyTree) -> PyTree:
        """The valid element of the unconstrained parameters `raw`."""

    @abc.abstractmethod
    def to_raw(self, element: PyTree) -> PyTree:
        """Parameters that `element` maps back to this element (its inverse on the image).

        **Raises:** `ValueError` (eagerly; `eqx.error_if` under `jit`) for an element outside
        the chart's image."""


NORMS = ("spectral", "weighted_l1")


def _bound(raw: Array, norm: str, scale: Array) -> Array:
    if norm == "spectral":
        return jnp.linalg.norm(raw, ord=2) * scale
    return jnp.sum(jnp.abs(raw) * scale)


class LipschitzChart(AbstractElementChart):
    """`raw -> raw * rho tanh(L(raw) / rho) / L(raw)` for a family whose base elements are
    valid when a 1-homogeneous Lipschitz bound `L` is at most `rho` (< 1).

    `L(raw)` is `|raw|_2 * scale` (`norm="spectral"`: `SpatialDiffeoGauge`, scale `|U|_2` of its
    features) or `sum_k |raw_k| scale_k` (`"weighted_l1"`: `TimeReparamGauge`, scale its
    frequencies): the bounds its `sample` normalises with. The element's bound is
    `rho tanh(L(raw) / rho) <= rho` (below it, reaching it only where tanh rounds to 1); near
    the identity the chart is the identity to second order (`tanh(x)/x = 1 - x^2/3 + ...`),
    and its value and gradient at `raw = 0` are finite.

    **Arguments:** `rho` in (0, 1) (the family's), `scale` (see above), `norm`.
    """

    rho: float
    scale: Array
    norm: str = eqx.field(static=True)

    def __init__(self, rho: float, scale: Array | float, norm: str):
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {list(NORMS)}; received {norm!r}.")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < 1:
            raise ValueError(f"`rho` must be a number in (0, 1); received {rho!r}.")
        self.rho = float(rho)
        self.scale = jnp.asarray(scale)
        self.norm = norm

    def element(self, raw: Array) -> Array:
        nonzero = jnp.any(raw != 0)
        # the double where: neither the value nor the gradient at raw = 0 divides by zero
        safe = jnp.where(nonzero, raw, jnp.ones_like(raw))
        size = _bound(safe, self.norm, self.scale)
        factor = self.rho * jnp.tanh(size / self.rho) / size
        return raw * jnp.where(nonzero, factor, jnp.ones_like(factor))

    def to_raw(self, element: Array) -> Array:
        element = jnp.asarray(element)
        size = _bound(element, self.norm, self.scale)
        message = (
            f"`element` is outside the chart's image: its Lipschitz bound ({self.norm}) must be "
            f"below rho = {self.rho}"
        )
        size = check_value(
            size,
            lambda: ~(size < self.rho),
            message + ".",
            received=lambda: f"Received {float(size)!r}.",
        )
        nonzero = size > 0
        safe = jnp.where(nonzero, size, jnp.ones_like(size))
        factor = self.rho * jnp.arctanh(safe / self.rho) / safe
        return element * jnp.where(nonzero, factor, jnp.ones_like(factor))


class ComposedChart(AbstractElementChart):
    """The chart of a `ComposedGauge`: one chart per family, on `ComposedElement`s."""

    first: AbstractElementChart
    then: AbstractElementChart

    def element(self, raw: ComposedElement) -> ComposedElement:
        return ComposedElement(self.first.element(raw.first), self.then.element(raw.then))

    def to_raw(self, element: ComposedElement) -> ComposedElement:
        if not isinstance(element, ComposedElement):
            raise TypeError(
                "`element` must be a base element of the composed family (a ComposedElement); "
                f"received {type(element).__name__}."
            )
        return ComposedElement(self.first.to_raw(element.first), self.then.to_raw(element.then))


def element_chart(gauge: AbstractGauge) -> AbstractElementChart:
    """The `LipschitzChart` (or `ComposedChart`) of a family's base elements.

    **Arguments:** `gauge`: a `SpatialDiffeoGauge`, `TimeReparamGauge`, or a `ComposedGauge` of
    them (also their `control()`s: the chart does not depend on the boundary condition).

    **Returns:** an `AbstractElementChart` whose elements satisfy the family's Lipschitz bound.

    **Raises:** `TypeError` for another family (write an `AbstractElementChart` for it and pass
    it to `optimise_gauge` as `chart`).
    """
    if isinstance(gauge, SpatialDiffeoGauge):
        return LipschitzChart(gauge.rho, gauge.features.lipschitz, "spectral")
    if isinstance(gauge, TimeReparamGauge):
        return LipschitzChart(gauge.rho, gauge.omega, "weighted_l1")
    if isinstance(gauge, ComposedGauge):
        return ComposedChart(element_chart(gauge.first), element_chart(gauge.then))
    raise TypeError(
        f"element_chart knows SpatialDiffeoGauge, TimeReparamGauge and ComposedGauge of them; "
        f"received {type(gauge).__name__}. Write an AbstractElementChart for its elements and "
        "pass it as `chart`."
    )


class TrajectoryObjective(eqx.Module):
    """`model -> gauge_fixing_penalty(name, model, inputs)`: the mean over `inputs` of a
    trajectory functional integrated in the model's own solve (`integrate_regularizers`):
    `"kinetic"` (`int |F|^2 dt`), `"uniform_motion"` (`int |d/dt F(t, x(t))|^2 dt`) or `"r3"`
    (`int |d^3 x / dt^3|^2 dt`).

    **Arguments:** `name`, `inputs` (a batch of initial states, leading axis).

    **Raises:** `ValueError` for another name or an empty batch.
    """

    name: str = eqx.field(static=True)
    inputs: Float[Array, "n ..."]

    def __init__(self, name: str, inputs: Float[Array, "n ..."]):
        # jacobian and steer are random draws (a key), not deterministic functionals
        names = tuple(t for t in TRAJECTORY_TERMS if t not in ("jacobian", "steer"))
        if name not in names:
            raise ValueError(
                f"`name` must be one of {list(names)} (deterministic trajectory functionals); "
                f"received {name!r}."
            )
        if jnp.ndim(inputs) < 1 or jnp.shape(inputs)[0] == 0:
            raise ValueError(
                f"`inputs` must have a non-empty leading batch axis; received shape "
                f"{jnp.shape(inputs)}."
            )
        self.name = name
        self.inputs = inputs

    def __call__(self, model: AbstractNeuralODE) -> Float[Array, ""]:
        return gauge_fixing_penalty(self.name, model, self.inputs)


def estimated_steps(model: AbstractNeuralODE, x0: Float[Array, " d"], num_grid: int = 64):
    """A smooth estimate of the steps the model's adaptive solver takes from `x0`.

    The solver steps once over each of `num_grid` equal intervals of `[t0, t1]` (diffrax's own
    `solver.step`, no step-size control) and records the scaled error of its embedded estimate,
    `r_n = norm(err_n / (atol + rtol max(|y_n|, |y_n+1|)))`, as the model's `PIDController`
    scales it (its `rtol`, `atol`, `norm`). With `err ~ C(t) h^k` (`k` the error order), a
    controller that keeps every step at the tolerance takes steps `h(t) = h0 r(t)^(-1/k)`,
    i.e. about `sum_n r_n^(1/k)` of them: differentiable in the field's parameters, unlike the
    step count itself (an integer). It leaves out rejected steps, the controller's safety
    factor and the initial step selection.

    **Arguments:** `model` (a neural ODE solved with an explicit adaptive solver and a
    `diffrax.PIDController`), `x0` (one initial state), `num_grid` (intervals of the grid).

    **Returns:** the estimate (a scalar).

    **Raises:** `TypeError` for a controller that is not a `PIDController` or a solver without
    an error estimate; `ValueError` for a `num_grid` that is not a positive int.
    """
    controller = model.stepsize_controller
    if not isinstance(controller, diffrax.PIDController):
        raise TypeError(
            "estimated_steps needs a model solved with a diffrax.PIDController (the estimate "
            f"uses its rtol, atol and norm); received {type(controller).__name__}."
        )
    if isinstance(num_grid, bool) or not isinstance(num_grid, int) or num_grid < 1:
        raise ValueError(f"`num_grid` must be a positive int; received {num_grid!r}.")
    term = diffrax.ODETerm(model.field)
    solver = model.solver
    order = controller.error_order
    order = solver.error_order(term) if order is None else order
    if order is None:
        raise TypeError(
            f"estimated_steps needs a solver with an error estimate; {type(solver).__name__} "
            "has no error order."
        )
    dtype = x0.dtype
    ts = jnp.linspace(jnp.asarray(model.t0, dtype), jnp.asarray(model.t1, dtype), num_grid + 1)
    state = solver.init(term, ts[0], ts[1], x0, model.args)
    rtol = jnp.asarray(controller.rtol, dtype)
    atol = jnp.asarray(controller.atol, dtype)

    def one(carry, times):
        y, state = carry
        y1, err, _, state, _ = solver.step(
            term, times[0], times[1], y, model.args, state, made_jump=False
        )
        scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y1))
        return (y1, state), controller.norm(err / scale)

    _, r = jax.lax.scan(one, (x0, state), jnp.stack([ts[:-1], ts[1:]], axis=1))
    # r > 0 in practice; the floor keeps the gradient of r^(1/k) finite at an exact zero
    tiny = jnp.asarray(jnp.finfo(dtype).eps ** 2, dtype)
    return jnp.sum((r + tiny) ** (1.0 / order))


class AdaptiveCostObjective(eqx.Module):
    """`model -> mean over inputs of estimated_steps(model, x, num_grid)`: a smooth proxy of
    the adaptive solver's cost at the model's own tolerance (see `estimated_steps`).

    **Arguments:** `inputs` (a batch of initial states, leading axis), `num_grid`.

    **Raises:** `ValueError` for an empty batch or a `num_grid` that is not a positive int.
    """

    inputs: Float[Array, "n d"]
    num_grid: int = eqx.field(static=True)

    def __init__(self, inputs: Float[Array, "n d"], num_grid: int = 64):
        if jnp.shape(inputs)[0] == 0:
            raise ValueError(
                f"`inputs` must have a non-empty leading batch axis; received shape "
                f"{jnp.shape(inputs)}."
            )
        if isinstance(num_grid, bool) or not isinstance(num_grid, int) or num_grid < 1:
            raise ValueError(f"`num_grid` must be a positive int; received {num_grid!r}.")
        self.inputs = inputs
        self.num_grid = num_grid

    def __call__(self, model: AbstractNeuralODE) -> Float[Array, ""]:
        return jnp.mean(jax.vmap(lambda x: estimated_steps(model, x, self.num_grid))(self.inputs))


class _GaugeLoss(eqx.Module):
    """`(raw, batch) -> objective(gauge.act(chart.element(raw), model))`: the loss of
    `gj.train` with the gauge parameters as the trained PyTree (a Module, not a closure:
    runs of one structure share the compiled chunk)."""

    model: Any
    gauge: AbstractGauge
    chart: AbstractElementChart
    objective: Callable

    def __call__(self, raw, batch):
        del batch
        return self.objective(self.gauge.act(self.chart.element(raw), self.model))


class _NoBatch(eqx.Module):
    """The batch function of a data-free objective (the inputs live in the objective)."""

    def __call__(self, key):
        del key
        return None


@eqx.filter_jit
def _evaluate(loss: _GaugeLoss, raw):
    return loss(raw, None)


@dataclasses.dataclass(frozen=True)
class GaugeSearchResult:
    """The outcome of `optimise_gauge`.

    **Fields:** `element` (the optimised element), `raw` (its unconstrained parameters),
    `initial_objective`, `final_objective` (the objective at the initial and the final
    element), `path` (`(step, element)` at step 0 and at every checkpoint, in step order: the
    elements the optimiser passed through; the final one only without `run_dir`), `train`
    (the `gaugejax.TrainResult` of the run).
    """

    element: PyTree
    raw: PyTree
    initial_objective: float
    final_objective: float
    path: tuple[tuple[int, PyTree], ...]
    train: TrainResult


def optimise_gauge(
    model: AbstractNeuralODE,
    gauge: AbstractGauge,
    objective: Callable[[AbstractNeuralODE], Float[Array, ""]],
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    init: PyTree | None = None,
    chart: AbstractElementChart | None = None,
    key: PRNGKeyArray | None = None,
    steps_per_chunk: int = 25,
    checkpoint_every: int | None = None,
    run_dir: str | Path | None = None,
    config: Mapping | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
    progress: bool = False,
) -> GaugeSearchResult:
    """Gauge fixing by optimisation: minimise `objective(gauge.act(g, model))` over the
    elements `g = chart.element(raw)` of a family, the model fixed.

    Every `raw` maps to a valid element (the chart keeps the boundary conditions and the
    Lipschitz bound), so the transformed model computes the same function throughout; only
    what the objective measures (e.g. the kinetic energy of the transformed trajectories, a
    smooth proxy of adaptive cost) changes. The loop is `gj.train` with `raw` as the
    trained PyTree: optax updates, metrics in `run_dir/metrics.jsonl`, checkpoints and exact
    resume from `run_dir`.

    **Arguments:**

    - `model`: a neural ODE; `gauge`: a family acting on it.
    - `objective`: `transformed model -> scalar`, differentiable (e.g. `TrajectoryObjective`;
      a Module, so runs of one structure share the compiled program).
    - `optimizer`: an optax `GradientTransformation` (e.g. `optax.adam(1e-2)`).
    - `num_steps`: optimiser steps; `steps_per_chunk`, `checkpoint_every`, `run_dir`,
      `config`, `on_chunk`, `progress`: as in `gj.train` (`config` is recorded in the
      checkpoints and compared on resume).
    - `init`: the starting element (default `gauge.identity()`: the model as it is).
    - `chart`: default `element_chart(gauge)`.
    - `key`: the run's key for `gj.train` (default `jax.random.key(0)`; the objective is
      deterministic, so it only enters the checkpoints' run record).

    **Returns:** a `GaugeSearchResult`.

    **Raises:** before anything compiles: `TypeError` for a `gauge` that is not an
    `AbstractGauge`, a model it does not act on, an `objective` that is not callable, an
    `optimizer` that is not an optax `GradientTransformation` or a family without a default
    chart; `ValueError` for an `init` outside the chart's image; and what `gj.train`
    raises (non-positive sizes, a refused resume, `TrainingDiverged`).
    """
    if not isinstance(gauge, AbstractGauge):
        raise TypeError(f"`gauge` must be an AbstractGauge; received {type(gauge).__name__}.")
    gauge.check_model(model)
    if not callable(objective):
        raise TypeError(f"`objective` must be callable; received {type(objective).__name__}.")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "`optimizer` must be an optax GradientTransformation (e.g. optax.adam(1e-2)); "
            f"received {type(optimizer).__name__}."
        )
    chart = element_chart(gauge) if chart is None else chart
    if not isinstance(chart, AbstractElementChart):
        raise TypeError(
            f"`chart` must be an AbstractElementChart; received {type(chart).__name__}."
        )
    init = gauge.identity() if init is None else init
    if isinstance(init, (Compose, Inverse)):
        raise TypeError(
            "`init` must be a base element of the family (a word of Compose/Inverse has no "
            f"parameters to optimise); received {type(init).__name__}."
        )
    raw0 = chart.to_raw(init)
    key = jax.random.key(0) if key is None else _typed_key(key)
    loss = _GaugeLoss(model, gauge, chart, objective)
    res = train(
        loss,
        raw0,
        optimizer,
        _NoBatch(),
        key=key,
        num_steps=num_steps,
        steps_per_chunk=steps_per_chunk,
        checkpoint_every=checkpoint_every,
        run_dir=run_dir,
        config=config,
        on_chunk=on_chunk,
        progress=progress,
    )
    element = chart.element(res.model)
    path = [(0, chart.element(raw0))]
    if run_dir is not None:
        params, static = eqx.partition(raw0, eqx.is_inexact_array)
        like = (params, optimizer.init(params))
        for ckpt in sorted((Path(run_dir) / "checkpoints").glob("step_*.eqx")):
            step, (p, _) = read_checkpoint(ckpt, like)
            path.append((step, chart.element(eqx.combine(p, static))))
    else:
        path.append((num_steps, element))
    initial, final = float(_evaluate(loss, raw0)), float(_evaluate(loss, res.model))
    return GaugeSearchResult(
        element=element,
        raw=res.model,
        initial_objective=initial,
        final_objective=final,
        path=tuple(path),
        train=res,
    )
