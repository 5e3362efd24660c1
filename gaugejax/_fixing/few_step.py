"""Learned gauges for few-step solvers: a better discretisation of the same neural ODE.

A gauge element that keeps x(T) (a time reparametrisation with tau(0) = 0, tau(T) = T, a
spatial diffeomorphism that is the identity at 0 and T, their composition) leaves the exact
solution alone but not what a fixed-step explicit solver computes from it: N steps of equal
size in the new time s are N steps of unequal size in t, and the solver integrates the pulled
back field, whose derivatives (the source of its local error) the element changes.
`few_step_gauge` trains the element's parameters (through `optimise_gauge`, the model fixed)
to minimise the fixed-step solve's error against a tight adaptive reference x(T) on training
inputs, and measures the error before and after on held-out inputs.

A constant time scale or linear map cannot help (Runge-Kutta methods are affine-equivariant,
`affine_gauge`): the learnable part must be nonlinear in t or x, as the families here are.
"""

import dataclasses
import math
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._core.solve import RK4
from ..gauges.base import AbstractGauge
from ..gauges.composed import ComposedGauge
from ..gauges.diffeo import SpatialDiffeoGauge
from ..gauges.reparam import TimeReparamGauge
from ..models import AbstractNeuralODE
from ..models.classifier import adaptive
from .gauge_search import AbstractElementChart, GaugeSearchResult, optimise_gauge


MAX_FIXED_STEPS = 4096


def fixed_step_options(num_steps, t1: float, *, max_steps: int, solver=None) -> dict:
    """Solve options of `num_steps` equal steps of an explicit solver (default the house RK4)
    on `[0, t1]`, with `dt0` an array: every step count up to `max_steps` is one compiled
    program (the loop runs until t1; `max_steps` bounds it and its checkpoints)."""
    dt0 = jnp.asarray(t1, dtype=float) / num_steps
    return {
        "solver": RK4() if solver is None else solver,
        "stepsize_controller": diffrax.ConstantStepSize(),
        "dt0": dt0,
        "max_steps": max_steps,
        "adjoint": diffrax.RecursiveCheckpointAdjoint(checkpoints=max_steps),
    }


class FixedStepErrorObjective(eqx.Module):
    """`model -> sum_i |x_N(T; x_i) - x(T; x_i)|^2 / sum_i |x(T; x_i)|^2`: the relative
    squared global error of the model solved with its own fixed-step options against a
    precomputed reference x(T) (a tight adaptive solve), mean over the inputs.

    The model it receives (the gauged model in `optimise_gauge`) must carry fixed-step options
    (`fixed_step_options`); the error is then differentiable in the gauge parameters.

    **Arguments:** `inputs` (n, d) initial states, `reference` (n, d) their exact x(T).

    **Raises:** `ValueError` for an empty batch or a reference of another shape.
    """

    inputs: Float[Array, "n d"]
    reference: Float[Array, "n d"]

    def __init__(self, inputs: Float[Array, "n d"], reference: Array):
        # `reference` is checked against `inputs` below (a message naming both shapes)
        if jnp.ndim(inputs) != 2 or jnp.shape(inputs)[0] == 0:
            raise ValueError(
                f"`inputs` must be a non-empty batch of states (n, d); received shape "
                f"{jnp.shape(inputs)}."
            )
        if jnp.shape(reference) != jnp.shape(inputs):
            raise ValueError(
                f"`reference` must have the inputs' shape {jnp.shape(inputs)}; received "
                f"{jnp.shape(reference)}."
            )
        self.inputs = jnp.asarray(inputs)
        self.reference = jnp.asarray(reference)

    def __call__(self, model: AbstractNeuralODE) -> Float[Array, ""]:
        out = jax.vmap(lambda x: model.solve(x)[0])(self.inputs)
        return jnp.sum((out - self.reference) ** 2) / jnp.sum(self.reference**2)


def keeps_endpoint(gauge: AbstractGauge) -> bool:
    """Whether every element of `gauge` keeps x(T): the `"vanishing"` boundary of
    `TimeReparamGauge` (omega_k = k pi / T) and `SpatialDiffeoGauge` (envelope sin(pi t / T)),
    and compositions of them; their `control()`s move x(T)."""
    if isinstance(gauge, ComposedGauge):
        return keeps_endpoint(gauge.first) and keeps_endpoint(gauge.then)
    if isinstance(gauge, TimeReparamGauge):
        k = np.arange(1.0, gauge.num_modes + 1.0)
        return bool(np.allclose(np.asarray(gauge.omega), k * np.pi / gauge.t1, rtol=1e-12))
    if isinstance(gauge, SpatialDiffeoGauge):
        return bool(np.isclose(float(gauge.omega), np.pi / gauge.t1, rtol=1e-12))
    return False


@eqx.filter_jit
def _endpoints(model: AbstractNeuralODE, inputs):
    out, stats = jax.vmap(model.solve)(inputs)
    return out, stats.num_evaluations


@eqx.filter_jit
def _objective(objective: FixedStepErrorObjective, gauge: AbstractGauge, g, model):
    return objective(gauge.act(g, model))


@dataclasses.dataclass(frozen=True)
class FewStepGauge:
    """The outcome of `few_step_gauge`.

    **Fields:**

    - `element`: the learned element (of the optimiser's path, the one with the lowest
      training error: the identity, a checkpoint or the last step, `selected_step`);
      `model`: the gauged model with the fixed-step options (`num_steps` steps of `solver`):
      a better discretisation of the same neural ODE.
    - `num_steps`: N; `errors_before`, `errors_after` (n,): `|x_N(T) - x(T)|_2` per held-out
      input, of the plain and the gauged model; `reference` (n, d): x(T) of the held-out
      inputs (the tight adaptive solve of the plain model).
    - `exact_deviation`: `max |x_g(T) - x(T)| / max |x(T)|` over the held-out inputs, both
      solved tightly (at `reference_rtol`): the element's effect on the exact solution.
    - `train_time`: wall seconds of the gauge training (compilation included);
      `train_evaluations`: field evaluations of its forward solves (optimiser steps x training
      inputs x the N-step solve's evaluations; the reverse pass costs about as much again);
      `reference_evaluations`: those of the tight reference on the training inputs.
    - `search`: the `GaugeSearchResult` (objective before and after, path, `TrainResult`).
    """

    element: PyTree
    model: AbstractNeuralODE
    selected_step: int
    num_steps: int
    errors_before: np.ndarray
    errors_after: np.ndarray
    reference: np.ndarray
    exact_deviation: float
    train_time: float
    train_evaluations: int
    reference_evaluations: int
    search: GaugeSearchResult

    @property
    def error_before(self) -> float:
        """Relative RMS global error of the plain N-step solve on the held-out inputs."""
        return _relative_rms(self.errors_before, self.reference)

    @property
    def error_after(self) -> float:
        """Relative RMS global error of the gauged N-step solve on the held-out inputs."""
        return _relative_rms(self.errors_after, self.reference)

    @property
    def reduction(self) -> float:
        """`error_before / error_after` (> 1: the gauge helps)."""
        return self.error_before / self.error_after


def _relative_rms(errors: np.ndarray, reference: np.ndarray) -> float:
    scale = math.sqrt(float(np.mean(np.sum(reference**2, axis=-1))))
    return math.sqrt(float(np.mean(errors**2))) / scale


def _states(name: str, value, dim: int | None) -> Array:
    if not isinstance(value, (jax.Array, np.ndarray)):
        raise TypeError(f"`{name}` must be an array of states (n, d); received {type(value)}.")
    if value.ndim != 2 or value.shape[0] == 0 or (dim is not None and value.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        raise ValueError(
            f"`{name}` must be a non-empty batch of states {want}; received shape {value.shape}."
        )
    if not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(f"`{name}` must be finite; received non-finite entries.")
    return jnp.asarray(value)


def few_step_gauge(
    model: AbstractNeuralODE,
    gauge: AbstractGauge,
    inputs: Float[Array, "n d"],
    *,
    num_steps: int,
    key: PRNGKeyArray,
    held_out: Float[Array, "m _d"],  # its d is checked against `inputs` below (a clear message)
    optimizer: optax.GradientTransformation | None = None,
    optimise_steps: int = 100,
    steps_per_chunk: int = 25,
    solver: diffrax.AbstractSolver | None = None,
    max_steps: int = 16,
    reference_rtol: float = 1e-10,
    reference_atol: float = 1e-12,
    init: PyTree | None = None,
    chart: AbstractElementChart | None = None,
    run_dir=None,
    config=None,
    on_chunk=None,
) -> FewStepGauge:
    """Learn a gauge element that makes `num_steps` fixed steps of an explicit solver
    accurate: minimise the relative squared error of the gauged model's N-step x(T) against
    the exact x(T) on `inputs` over the elements of `gauge` (`optimise_gauge` with a
    `FixedStepErrorObjective`), the model fixed.

    The family must keep x(T) (`keeps_endpoint`), so the exact solution is unchanged and the
    learned element is a better discretisation of the same model; `exact_deviation` checks it
    (tight adaptive solves of the gauged and the plain model on `held_out`).

    **Arguments:**

    - `model`: a neural ODE on `[0, T]` without observation times; `gauge`: a family acting
      on it that keeps x(T) (`TimeReparamGauge`, `SpatialDiffeoGauge` with
      `boundary="vanishing"`, a `ComposedGauge` of them).
    - `inputs` (n, d): training initial states; `held_out` (m, d): the ones the errors are
      reported on.
    - `num_steps`: N, the fixed steps (1 <= N <= `max_steps`; one compiled program serves
      every N up to `max_steps`); `solver`: the explicit solver (default `gj.RK4`).
    - `key`: the run's key (`gj.train`'s record; the objective is deterministic).
    - `optimizer` (default `optax.adam(1e-2)`), `optimise_steps`, `steps_per_chunk`, `init`,
      `chart`, `run_dir`, `config`, `on_chunk`: as in `optimise_gauge`.
    - `reference_rtol`, `reference_atol`: the tight adaptive solve (Tsit5) of the reference.

    **Returns:** a `FewStepGauge`.

    **Raises:** before anything compiles: `TypeError` for a model that is not a neural ODE,
    a `gauge` that is not an `AbstractGauge` or does not act on the model, inputs that are not
    arrays; `ValueError` for a family that moves x(T), a model with observation times, inputs
    of the wrong shape or non-finite, `num_steps` outside `[1, max_steps]`, tolerances
    outside (0, 1); and what `optimise_gauge` raises.
    """
    if not isinstance(model, AbstractNeuralODE):
        raise TypeError(
            f"`model` must be a gaugejax neural ODE (AbstractNeuralODE); received "
            f"{type(model).__name__}."
        )
    if not isinstance(gauge, AbstractGauge):
        raise TypeError(f"`gauge` must be an AbstractGauge; received {type(gauge).__name__}.")
    gauge.check_model(model)
    if not keeps_endpoint(gauge):
        raise ValueError(
            f"`gauge` must keep x(T) (a gauge symmetry of the endpoint: TimeReparamGauge or "
            f"SpatialDiffeoGauge with boundary='vanishing', or a ComposedGauge of them); "
            f"received a {type(gauge).__name__} that moves x(T) (a control family?)."
        )
    if model.observation_times is not None:
        raise ValueError(
            "`model` must observe x(T) only (few_step_gauge compares endpoints); received "
            f"observation_times={model.observation_times}."
        )
    for name, value in (("max_steps", max_steps), ("optimise_steps", optimise_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; received {value!r}.")
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, int)
        or not 1 <= num_steps <= max_steps
    ):
        raise ValueError(
            f"`num_steps` must be an int in [1, max_steps = {max_steps}]; received {num_steps!r}."
        )
    if max_steps > MAX_FIXED_STEPS:
        raise ValueError(f"`max_steps` must be at most {MAX_FIXED_STEPS}; received {max_steps}.")
    for name, value in (("reference_rtol", reference_rtol), ("reference_atol", reference_atol)):
        if not 0 < value < 1:
            raise ValueError(f"`{name}` must be in (0, 1); received {value!r}.")
    inputs = _states("inputs", inputs, None)
    held_out = _states("held_out", held_out, inputs.shape[1])
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer

    tight_options = adaptive(reference_rtol, reference_atol, solver=diffrax.Tsit5())
    tight_options["stepsize_controller"] = diffrax.PIDController(
        rtol=jnp.asarray(reference_rtol), atol=jnp.asarray(reference_atol)
    )  # array tolerances: one program for every tolerance
    tight = model.with_options(**tight_options)
    fixed = model.with_options(
        **fixed_step_options(num_steps, model.t1, max_steps=max_steps, solver=solver)
    )
    start = time.perf_counter()
    ref_train, ref_nfe = _endpoints(tight, inputs)
    objective = FixedStepErrorObjective(inputs, ref_train)
    search = optimise_gauge(
        fixed,
        gauge,
        objective,
        optimizer=optimizer,
        num_steps=optimise_steps,
        init=init,
        chart=chart,
        key=key,
        steps_per_chunk=min(steps_per_chunk, optimise_steps),
        checkpoint_every=steps_per_chunk if run_dir is not None else None,
        run_dir=run_dir,
        config=config,
        on_chunk=on_chunk,
    )
    # the element of the path (identity, checkpoints, final) with the lowest training error:
    # Adam may overshoot on this landscape, and the identity is always a candidate, so the
    # gauged model is never worse than the plain one on the training inputs
    losses = [float(_objective(objective, gauge, g, fixed)) for _, g in search.path]
    best = int(np.argmin(losses))
    element = search.path[best][1]
    train_time = time.perf_counter() - start
    gauged = gauge.act(element, fixed)
    # held-out: the exact x(T) of the plain and the gauged model, and both N-step solves
    reference, _ = _endpoints(tight, held_out)
    exact_gauged, _ = _endpoints(gauge.act(element, tight), held_out)
    plain_out, plain_nfe = _endpoints(fixed, held_out)
    gauged_out, _ = _endpoints(gauged, held_out)
    reference, exact_gauged, plain_out, gauged_out = (
        np.asarray(a) for a in (reference, exact_gauged, plain_out, gauged_out)
    )
    scale = max(float(np.max(np.abs(reference))), float(np.finfo(reference.dtype).tiny))
    return FewStepGauge(
        element=element,
        model=gauged,
        selected_step=int(search.path[best][0]),
        num_steps=num_steps,
        errors_before=np.linalg.norm(plain_out - reference, axis=-1),
        errors_after=np.linalg.norm(gauged_out - reference, axis=-1),
        reference=reference,
        exact_deviation=float(np.max(np.abs(exact_gauged - reference))) / scale,
        train_time=train_time,
        # the fixed-step solve's count per input (N x stages), as the solver reports it
        train_evaluations=optimise_steps * inputs.shape[0] * int(np.max(np.asarray(plain_nfe))),
        reference_evaluations=int(np.sum(np.asarray(ref_nfe))),
        search=search,
    )
