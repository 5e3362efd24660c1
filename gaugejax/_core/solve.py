"""The one thin wrapper over `diffrax.diffeqsolve`, plus an explicit count of field evaluations.

diffrax's `stats["num_steps"]` counts steps (accepted and rejected), not evaluations of the
vector field. `count_evaluations` turns steps into evaluations from the solver's Butcher tableau
(stages per step, minus one for first-same-as-last tableaus), plus the FSAL first stage made once
at the start. `tests/test_solve.py` checks the formula against a field that counts its own
executed calls (a host callback), for adaptive and constant steps, with and without `dt0`:
with diffrax 0.7.2 the initial step-size selection adds no executed call to that count.
"""

import math
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PyTree

from ._checks import array_namespace, check_like, check_value, is_traced
from ._types import Args, ScalarLike, SpacetimeGenerator, State, VectorField
from .calculus import generator_value, time_array


class SolveStats(eqx.Module):
    """Solver statistics of one solve (arrays, so they vmap).

    **Fields:**

    - `num_steps`: steps attempted (accepted + rejected).
    - `num_accepted_steps`, `num_rejected_steps`: as diffrax counts them.
    - `num_evaluations`: vector-field evaluations, counted as described in the module
      docstring; `NOT_COUNTED` (-1) for solvers whose evaluations are not a fixed multiple of
      the steps (implicit, reversible, ...): not a guess, not a refusal.
    - `result`: a `SolveStatus` item (diffrax's outcome, set in-graph); `result_name` names it.
    """

    num_steps: Int[Array, "*batch"]
    num_accepted_steps: Int[Array, "*batch"]
    num_rejected_steps: Int[Array, "*batch"]
    num_evaluations: Int[Array, "*batch"]
    result: "SolveStatus"


NOT_COUNTED = -1


class SolveStatus(eqx.Enumeration):
    """Outcome of a solve, or of one lane of a sweep (set in-graph, so it vmaps).

    diffrax's failure kinds are mapped from its public `diffrax.RESULTS` items; gaugejax adds
    `nonfinite_output` (the solve succeeded but the output has NaN/inf) and `singular_gauge`
    (the gauge element is singular or not finite).
    """

    successful = ""
    max_steps_reached = "the solver reached `max_steps`"
    dt_min_reached = "the step size controller reached its minimum step"
    singular = "a linear solve inside the solver met a singular matrix"
    breakdown = "a linear solve inside the solver broke down"
    divergence = "a nonlinear solve (implicit solver) diverged"
    nonlinear_max_steps_reached = "a nonlinear solve (implicit solver) ran out of steps"
    solver_failed = "another diffrax failure"
    nonfinite_output = "the solve succeeded but the output is not finite"
    singular_gauge = "the gauge element is singular or not finite"


# diffrax's public RESULTS items that have a SolveStatus of the same name
_DIFFRAX_KINDS = (
    "max_steps_reached",
    "dt_min_reached",
    "singular",
    "breakdown",
    "divergence",
    "nonlinear_max_steps_reached",
)


def status_from_diffrax(result) -> SolveStatus:
    """The `SolveStatus` of a diffrax `RESULTS` item (in-graph, public comparisons only)."""
    status = SolveStatus.where(
        result == diffrax.RESULTS.successful, SolveStatus.successful, SolveStatus.solver_failed
    )
    for name in _DIFFRAX_KINDS:
        item = getattr(diffrax.RESULTS, name, None)
        if item is not None:
            status = SolveStatus.where(result == item, getattr(SolveStatus, name), status)
    return status


def status_code(status: SolveStatus) -> Int[Array, "*batch"]:
    """The integer array inside a `SolveStatus` item (its one PyTree leaf)."""
    return jnp.asarray(jax.tree.leaves(status)[0], dtype=jnp.int32)


STATUS_NAMES = (
    "successful",
    *_DIFFRAX_KINDS,
    "solver_failed",
    "nonfinite_output",
    "singular_gauge",
)


class RK4(diffrax.AbstractERK):
    """The classic fourth-order Runge-Kutta method (4 stages, no embedded error estimate: use it
    with `diffrax.ConstantStepSize`). diffrax ships no classic RK4; torchdiffeq's fixed-grid
    `rk4` baselines need one. Built from a `diffrax.ButcherTableau`, so diffrax runs it."""

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        c=np.array([0.5, 0.5, 1.0]),
    )
    interpolation_cls: ClassVar[Callable] = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


def result_name(result) -> str:
    """The name of a `SolveStatus` item or of its integer code, e.g. `max_steps_reached`."""
    code = int(np.asarray(status_code(result))) if isinstance(result, SolveStatus) else result
    for name in STATUS_NAMES:
        if int(np.asarray(status_code(getattr(SolveStatus, name)))) == int(code):
            return name
    return f"unknown_{int(code)}"


class AbstractWrappedSolver(diffrax.AbstractAdaptiveSolver):
    """A solver whose steps are built on another's (`solver`): its interpolation, order and
    error order are the wrapped solver's (`SharedStageRK`, `LocalErrorSolver`)."""

    solver: eqx.AbstractVar[diffrax.AbstractSolver]

    @property
    def interpolation_cls(self) -> Any:  # pyright: ignore
        return self.solver.interpolation_cls

    def order(self, terms):
        return self.solver.order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)


def explicit_tableau(solver: Any) -> diffrax.ButcherTableau | None:
    """The Butcher tableau of an explicit Runge-Kutta solver with one tableau (`Tsit5`,
    `Dopri5`, `Heun`, `gj.RK4`, ...), read from diffrax's public `tableau`; None for any other
    solver (implicit, multi-tableau, Euler, reversible, ...)."""
    tableau = getattr(solver, "tableau", None)
    if not isinstance(solver, diffrax.AbstractERK) or not isinstance(
        tableau, diffrax.ButcherTableau
    ):
        return None
    return None if tableau.implicit else tableau


def evaluations_per_step(solver: diffrax.AbstractSolver) -> tuple[int, int] | None:
    """Vector-field evaluations `(per_step, at_init)` of a solver, or None where they are not a
    fixed multiple of the steps (implicit and reversible solvers, ...): "not counted".

    **Arguments:**

    - `solver`: any diffrax solver. `diffrax.Euler` and explicit Runge-Kutta solvers with one
      Butcher tableau (`Tsit5`, `Dopri5`, `Heun`, `gj.RK4`, ...) are counted exactly.

    **Returns:** evaluations per attempted step and evaluations made once at the start, or None.
    """
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    tableau = explicit_tableau(solver)
    if tableau is None:
        return None
    stages = len(tableau.a_lower) + 1
    if tableau.fsal:
        return stages - 1, 1
    return stages, 0


def count_evaluations(
    solver: diffrax.AbstractSolver,
    controller: diffrax.AbstractStepSizeController,
    dt0: ScalarLike | None,
    num_steps: Int[Array, "*batch"],
) -> Int[Array, "*batch"]:
    """Vector-field evaluations of a solve that took `num_steps` attempted steps, or
    `NOT_COUNTED` (-1) where `evaluations_per_step(solver)` is None."""
    del controller, dt0  # the count does not depend on them (see the module docstring)
    counts = evaluations_per_step(solver)
    if counts is None:
        return jnp.full_like(num_steps, NOT_COUNTED)
    per_step, at_init = counts
    return per_step * num_steps + at_init


# The default step-size controller follows the dtype a model is solved in (issue 22): a PID
# controller at rtol = atol = the decade of 100 eps, never below 1e-8. float64 keeps exactly the
# 1e-8 it always had (every float64 result unchanged); float32 gets 1e-5. Measured (README's
# first example in float32, 256 samples, Tsit5): rtol = atol = 1e-4 holds at 12.3x the floor
# (3.7e-4, near the 30x edge), 1e-5 at 0.31x (9.4e-6, below the 256-ulp floor 3.05e-5; 5.3
# steps), 1e-6 at 0.018x (7.5 steps) but its re-solve, floored at 4 eps = 4.8e-7, would be
# only 2x tighter and not measure the solver's error; at 1e-5 it is 21x tighter.
DEFAULT_TOLERANCE_FLOOR = 1e-8


def default_controller(dtype: Any) -> diffrax.PIDController:
    """The step-size controller of a `SolveOptions` left at its default, for a solve in `dtype`.

    **Arguments:** `dtype`: the floating dtype of the solve.

    **Returns:** `diffrax.PIDController(rtol=tol, atol=tol)`, `tol` the decade of 100 eps of
    `dtype`, at least 1e-8: 1e-8 in float64, 1e-5 in float32, 1e-2 in float16.
    """
    eps = float(jnp.finfo(dtype).eps)
    tol = max(DEFAULT_TOLERANCE_FLOOR, 10.0 ** math.floor(math.log10(100 * eps)))
    return diffrax.PIDController(rtol=tol, atol=tol)


def state_dtype(tree: PyTree) -> Any:
    """The floating dtype a solve of `tree` runs in: the least precise of its inexact leaves
    (the one that bounds the accuracy), or the default float dtype without any."""
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)}
    if not dtypes:
        return jnp.dtype(jnp.result_type(float))
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps))


def _check_field(field: VectorField, t0: ScalarLike, y0: State, args: Args) -> None:
    """Eager (trace-time) check that `field(t0, y0, args)` has the structure of `y0`."""
    try:
        out = jax.eval_shape(field, t0, y0, args)
    except ValueError:
        raise
    except Exception as e:  # the field itself could not be traced on y0
        raise ValueError(
            f"`field` could not be evaluated on the state `y0` of shape "
            f"{jax.tree.map(jnp.shape, y0)}: {type(e).__name__}: {e}"
        ) from e
    check_like("`field(t, y, args)` (the output of the vector field)", out, y0)


def _not_a_tolerance(value) -> Any:
    xp = array_namespace(value)  # numpy for concrete values: nothing compiled
    value = xp.asarray(value)
    return ~(xp.isfinite(value) & (value >= 0))


def _equal(a, b) -> Any:
    xp = array_namespace(a, b)
    return xp.asarray(a) == xp.asarray(b)


def check_tolerances(
    controller: diffrax.AbstractStepSizeController, *, in_graph: bool = True
) -> diffrax.AbstractStepSizeController:
    """A `PIDController`'s `rtol` and `atol` checked to be finite numbers >= 0: at once when
    concrete (Python numbers or arrays), inside the compiled program when traced and
    `in_graph` (`check_value`). Other controllers are returned as they are.

    **Returns:** the controller, with the traced checks attached.

    **Raises:** `ValueError` naming the tolerance and the received value.
    """
    if not isinstance(controller, diffrax.PIDController):
        return controller
    checked = []
    for name in ("rtol", "atol"):
        value = getattr(controller, name)
        if in_graph or not is_traced(value):
            value = check_value(
                value,
                lambda v=value: _not_a_tolerance(v),
                f"the model's `stepsize_controller.{name}` must be a finite number >= 0;",
                received=lambda v=value: f"received {np.asarray(v).tolist()!r}.",
            )
        checked.append(value)
    return eqx.tree_at(lambda c: (c.rtol, c.atol), controller, tuple(checked))


def _as_time(t):
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return jnp.asarray(float(t))
    if isinstance(t, np.number | np.ndarray):
        return jnp.asarray(t)
    return t


def solve(
    field: VectorField,
    y0: State,
    *,
    t0: ScalarLike = 0.0,
    t1: ScalarLike,
    args: Args = None,
    solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: ScalarLike | None = None,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint | None = None,
    saveat: diffrax.SaveAt | None = None,
    throw: bool = True,
) -> tuple[Any, SolveStats]:
    """Solve `dy/dt = field(t, y, args)` from `t0` to `t1` with diffrax.

    **Arguments:**

    - `field`: vector field `(t, y, args) -> dy/dt`, returning the structure of `y`.
    - `y0`: initial state (array or PyTree).
    - `t0`, `t1`: integration interval; `t1 < t0` integrates backwards in time.
    - `solver`: default `diffrax.Tsit5()`.
    - `stepsize_controller`: default `default_controller(dtype of y0)`: a PID at rtol = atol
      = 1e-8 in float64, 1e-5 in float32.
    - `dt0`: initial step (required for a constant step size).
    - `max_steps`, `adjoint`, `throw`: passed to `diffeqsolve`. Use `throw=False` inside sweeps
      and read `SolveStats.result`.
    - `saveat`: default saves `t1` only, in which case the returned `ys` has no time axis.

    **Returns:** `(ys, stats)`: the saved states and a `SolveStats`.

    **Raises:** `ValueError` for `t1 == t0`, a field whose output is not shaped like `y0`, or a
    constant step size without `dt0`.
    """
    solver = diffrax.Tsit5() if solver is None else solver
    if stepsize_controller is None:  # the default for the state's dtype (1e-8 in float64)
        stepsize_controller = default_controller(state_dtype(y0))
    adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
    if dt0 is None and not isinstance(
        stepsize_controller, diffrax.AbstractAdaptiveStepSizeController
    ):
        raise ValueError(
            "`dt0` is required with a non-adaptive `stepsize_controller` "
            f"({type(stepsize_controller).__name__}); received dt0=None."
        )
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"`max_steps` must be a positive int; received {max_steps!r}.")
    _check_field(field, t0, y0, args)
    # invalid tolerances: refused now when concrete; when traced, checked when the program
    # runs, but only where a failure raises anyway (inside a sweep, `throw=False`, they were
    # checked on the host before tracing)
    stepsize_controller = check_tolerances(stepsize_controller, in_graph=throw)
    # Python/NumPy times as arrays: diffeqsolve is jitted and would compile anew for every
    # distinct float value of a static time (weak types keep the promotion of Python floats).
    given = (t0, t1)  # Python floats stay concrete for the check even inside a trace
    t0, t1 = _as_time(t0), _as_time(t1)
    t1 = check_value(
        t1,
        lambda: _equal(*given),
        "`t1` must differ from `t0` (t1 < t0 integrates backwards).",
        received=lambda: f"Received t0 = t1 = {float(given[0])}.",
    )
    dt0 = None if dt0 is None else _as_time(dt0)
    only_t1 = saveat is None
    saveat = diffrax.SaveAt(t1=True) if only_t1 else saveat
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        t0,
        t1,
        dt0,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=throw,
    )
    ys = jax.tree.map(lambda a: a[0], sol.ys) if only_t1 else sol.ys
    num_steps = jnp.asarray(sol.stats["num_steps"])
    stats = SolveStats(
        num_steps=num_steps,
        num_accepted_steps=jnp.asarray(sol.stats["num_accepted_steps"]),
        num_rejected_steps=jnp.asarray(sol.stats["num_rejected_steps"]),
        num_evaluations=count_evaluations(solver, stepsize_controller, dt0, num_steps),
        result=status_from_diffrax(sol.result),
    )
    return ys, stats


class SensitivityField(eqx.Module):
    """Forward sensitivity system of `dy/dt = fn(p, t, y, args)` along a direction `(dp, dy)`.

    The state is `(y, dy)`; the field is `(fn, D_p fn dp + D_y fn dy)`, one jvp per evaluation.
    Solving it as one ODE puts the tangent under the step-size controller's error estimate. A
    jvp *through* an adaptive solve does not: its steps are chosen for the primal alone
    (measured: 1.9e-4 versus 5e-10 for a boundary-vanishing generator at rtol = 1e-8).
    """

    fn: Callable
    p: PyTree
    dp: PyTree

    def __call__(self, t, state, args):
        y, dy = state
        return jax.jvp(lambda p, y_: self.fn(p, t, y_, args), (self.p, y), (self.dp, dy))


class DeformationSensitivityField(eqx.Module):
    """Forward sensitivity system of `dy/dt = field(t, y, args)` along a state direction `dy`
    and the deformation `F_s = deform(field, eps, s)` (`gj.deform`, Eq. 9) at s = 0.

    The state is `(y, dy)`; the field is `(F, DF dy + d/ds F_s)`, D over `(t, y)`. The first-order
    term of Eq. 9, `(L_eps F_hat)^y - F (L_eps F_hat)^t` with `F_hat = (1, F)`, is
    `DF (eps0, eps_y) - D eps_y (1, F) + F (D eps0 (1, F))`, so the tangent is

    `DF (eps0, eps_y + dy) - D eps_y (1, F) + F (D eps0 (1, F))`:

    one jvp of F (its primal is F itself, the state's derivative) and one jvp of eps along
    `(1, F)`, per evaluation: what a hand-written forward sensitivity system evaluates. It is
    the system `SensitivityField(fn, p, dp)` solves for `fn(p, t, y) = deform(field, eps_p,
    1)(t, y)` with `eps_p` linear in p and `eps_dp = eps`, at half the cost: a jvp of the deformed
    field differentiates its Lie bracket's jvps again (a jvp of a jvp: W2's lanes took 2.4x as
    long). Gauge families whose first-order action is a spacetime generator say so
    (`first_order_generator`); a neural ODE's `solve_tangent(generator=eps)` solves this.

    **Arguments:** `field`: `(t, y, args) -> dy/dt`; `eps`: a spacetime generator
    `(t, y) -> (eps0, eps_y)`, `eps0` a scalar, `eps_y` shaped as y.
    """

    field: VectorField
    eps: SpacetimeGenerator

    def __call__(self, t, state, args):
        y, dy = state
        t = time_array(t)
        # eps's primal first (F's jvp needs it), its linearisation kept for the jvp along (1, F)
        (e0, ey), eps_along = jax.linearize(lambda t_, y_: generator_value(self.eps, t_, y_), t, y)
        # eps is computed in the time's dtype (float64 for a float32 state under x64 when the
        # solver's times are float64); its parts that move the state are the state's dtype
        moved = jax.tree.map(lambda e, d: e.astype(d.dtype) + d, ey, dy)
        f, df = jax.jvp(lambda t_, y_: self.field(t_, y_, args), (t, y), (e0, moved))
        de0, dey = eps_along(jnp.ones_like(t), f)

        def tangent(df_, dey_, f_):
            return df_ - dey_.astype(f_.dtype) + f_ * de0.astype(f_.dtype)

        return f, jax.tree.map(tangent, df, dey, f)


class MovedField(eqx.Module):
    """`(a, t, y, args) -> moved(a).field(t, y, args)`: the field of a path of models as a
    function of the path's parameter `a` (e.g. `moved(a) = gauge.act(a, model)`), the `fn` of
    a `SensitivityField`. A Module, so equal structures share one compiled solve."""

    moved: Callable

    def __call__(self, a, t, y, args):
        return self.moved(a).field(t, y, args)
