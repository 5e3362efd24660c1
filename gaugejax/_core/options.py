"""How a neural ODE is solved: one Module for the six diffrax options, and what they imply.

`SolveOptions` is the one declaration of the options every gaugejax neural ODE is solved with.
Its methods are what the sweep asks instead of looking at diffrax's controller classes itself:
a tighter copy for the solver-floor re-solve, the accuracy the options ask for, a copy whose
tolerances are traced arrays, and the validation of tolerances. Knowing diffrax's controllers
(a `PIDController` has tolerances, a `ConstantStepSize` a step) is this module's job alone.
"""

import math
from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._checks import array_namespace, is_traced
from ._types import Args, ScalarLike, State, VectorField
from .solve import SolveStats, check_tolerances, default_controller, solve, state_dtype


# the tighter re-solve: tolerances 1000x smaller (floored at 4 eps), or a step 8x smaller
TOLERANCE_FACTOR = 1000
STEP_FACTOR = 8


def tighter(tol: Any, eps: float) -> Any:
    """`max(tol / TOLERANCE_FACTOR, eps)` in `tol`'s own type: a Python float for a float, an
    array of its dtype for an array (computed with numpy when concrete: nothing compiled)."""
    if not hasattr(tol, "dtype"):
        return max(tol / TOLERANCE_FACTOR, eps)
    xp = array_namespace(tol)
    return jnp.asarray(xp.maximum(xp.asarray(tol) / TOLERANCE_FACTOR, eps), dtype=tol.dtype)


class PulledBackNorm(eqx.Module):
    """`v -> norm(A v)`: the error norm under which a solve in coordinates `y = A^-1 x` reads
    its error `A^-1 e` as `norm` reads the error `e` of the solve in `x`
    (`SolveOptions.for_affine_gauge`)."""

    norm: Any
    matrix: Any

    def __call__(self, v):
        return self.norm(self.matrix @ v)


class SolveOptions(eqx.Module):
    """The diffrax options a neural ODE is solved with: everything about a solve that changes
    its accuracy and cost but not the function it approximates. The interval `[t0, t1]` and
    the field's `args` belong to the model (they change the function; gauges read them).

    **Arguments:**

    - `solver`: any diffrax ODE solver (default `diffrax.Tsit5()`).
    - `stepsize_controller`: None (the default) is `default_controller(dtype)` for the dtype
      the model is solved in: `diffrax.PIDController(rtol=1e-8, atol=1e-8)` in float64,
      `rtol = atol = 1e-5` in float32 (`for_dtype`; every solve and sweep resolves it).
    - `dt0`: the initial step (required for a constant step size); an array inside a sweep.
    - `max_steps`: default 4096.
    - `adjoint`: default `diffrax.RecursiveCheckpointAdjoint()`.
    - `throw`: raise on solver failure (default); sweeps set it to False and read the stats.
    """

    solver: diffrax.AbstractSolver = eqx.field(default_factory=diffrax.Tsit5)
    stepsize_controller: diffrax.AbstractStepSizeController | None = None
    dt0: ScalarLike | None = None
    max_steps: int = 4096
    adjoint: diffrax.AbstractAdjoint = eqx.field(default_factory=diffrax.RecursiveCheckpointAdjoint)
    throw: bool = True

    def replace(self, **changes: Any) -> "SolveOptions":
        """A copy with some options replaced, e.g. `replace(throw=False)`.

        **Raises:** `ValueError` for a name that is not an option (listing the valid ones).
        """
        names = tuple(self.__dataclass_fields__)
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid options are {list(names)}.")
        # tree_at (not the constructor): an array option stays the same object, and a None
        # option (dt0) can be replaced
        return eqx.tree_at(
            lambda o: [getattr(o, k) for k in changes],
            self,
            list(changes.values()),
            is_leaf=lambda x: x is None,
        )

    def for_dtype(self, dtype: Any) -> "SolveOptions":
        """These options for a solve in `dtype`: a default (None) `stepsize_controller` becomes
        `default_controller(dtype)`; options with a controller of their own are returned as
        they are.

        **Arguments:** `dtype`: the floating dtype of the solve (a sweep's inputs, a model's
        state).
        """
        if self.stepsize_controller is not None:
            return self
        return self.replace(stepsize_controller=default_controller(dtype))

    def solve(
        self,
        field: VectorField,
        y0: State,
        *,
        t0: ScalarLike,
        t1: ScalarLike,
        args: Args = None,
        saveat: diffrax.SaveAt | None = None,
    ) -> tuple[PyTree, SolveStats]:
        """`(y(t1), SolveStats)` of `dy/dt = field(t, y, args)` from `y(t0) = y0` with these
        options (`gj.solve`; `saveat` as there), a default controller resolved for the dtype
        of `y0` (`for_dtype`)."""
        options = self.for_dtype(state_dtype(y0))
        return solve(
            field,
            y0,
            t0=t0,
            t1=t1,
            args=args,
            solver=self.solver,
            stepsize_controller=options.stepsize_controller,
            dt0=self.dt0,
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            saveat=saveat,
            throw=self.throw,
        )

    def for_affine_gauge(
        self, matrix: Any, time_scale: float, *, pull_back_norm: bool = True
    ) -> "SolveOptions":
        """The options for the same model in the coordinates `x = A y + b`, `s = c t`: `dt0`
        and a `PIDController`'s `dtmin` and `dtmax` scaled by `c`; with `pull_back_norm`, the
        controller's norm read through `A` (`PulledBackNorm`). Resolve a default controller
        first (`for_dtype`).

        **Arguments:** `matrix` (`A`, `(d, d)`), `time_scale` (`c > 0`), `pull_back_norm`.

        **Raises:** `ValueError` for a controller other than a `PIDController` or a
        `ConstantStepSize` (its time options are not known here).
        """
        options = self
        if self.dt0 is not None:
            options = options.replace(dt0=self.dt0 * time_scale)
        controller = self.stepsize_controller
        if isinstance(controller, diffrax.ConstantStepSize):
            return options
        if not isinstance(controller, diffrax.PIDController):
            raise ValueError(
                "an affine gauge scales the time options of a `PIDController` or a "
                f"`ConstantStepSize`; received stepsize_controller={type(controller).__name__}."
            )
        scaled = [
            None if v is None else v * time_scale for v in (controller.dtmin, controller.dtmax)
        ]
        controller = eqx.tree_at(
            lambda p: (p.dtmin, p.dtmax), controller, tuple(scaled), is_leaf=lambda x: x is None
        )
        if pull_back_norm:
            controller = eqx.tree_at(
                lambda p: p.norm, controller, PulledBackNorm(controller.norm, matrix)
            )
        return options.replace(stepsize_controller=controller)

    def check_tolerances(self, dtype: Any) -> None:
        """Refuse tolerances no solve in `dtype` can meet, before anything is traced.

        **Arguments:** `dtype`: the floating dtype the solve runs in.

        **Raises:** `ValueError` for a `PIDController` `rtol` or `atol` that is not a finite
        number >= 0 (Python numbers and concrete arrays alike), or an `rtol` in (0, eps of
        `dtype`). Traced tolerances (checked inside `gj.solve`) and other controllers are not
        checked here.
        """
        controller = self.stepsize_controller
        if not isinstance(controller, diffrax.PIDController):
            return
        eps = float(jnp.finfo(dtype).eps)
        check_tolerances(controller, in_graph=False)  # concrete ones, arrays included
        rtol = controller.rtol
        if not is_traced(rtol) and 0 < float(np.max(np.asarray(rtol))) < eps:
            raise ValueError(
                f"the model's `stepsize_controller.rtol` = {rtol!r} is below the epsilon of "
                f"{jnp.dtype(dtype).name} ({eps:.2e}): no controller can meet it."
            )

    def traced(self, dtype: Any) -> "SolveOptions":
        """A copy whose `PIDController` tolerances and `dt0` are arrays of `dtype`: traced
        values, not static ones, so a copy with other tolerances (`tightened`) has the same
        structure and runs the same compiled program (a sweep lane carries them).

        **Arguments:** `dtype`: the floating dtype of the arrays.
        """
        options = self
        controller = self.stepsize_controller
        if isinstance(controller, diffrax.PIDController):
            tol = tuple(jnp.asarray(getattr(controller, k), dtype=dtype) for k in ("rtol", "atol"))
            controller = eqx.tree_at(lambda c: (c.rtol, c.atol), controller, tol)
            options = options.replace(stepsize_controller=controller)
        if options.dt0 is not None:
            options = options.replace(dt0=jnp.asarray(options.dt0, dtype=dtype))
        return options

    def tightened(self, eps: float) -> tuple["SolveOptions | None", str]:
        """Options that solve much more accurately, with the same structure: what the sweep
        re-solves its reference with to measure the solver's own error (its solver floor).

        **Arguments:** `eps`: the smallest tolerance to ask for (a few epsilons of the dtype).

        **Returns:** `(options, how)`: a `PIDController`'s `rtol` and `atol` divided by
        `TOLERANCE_FACTOR` (at least `eps`), or a `ConstantStepSize`'s `dt0` divided by
        `STEP_FACTOR`; `(None, why not)` for other controllers. `how` says what was done.
        """
        controller = self.stepsize_controller
        if isinstance(controller, diffrax.PIDController):
            # numpy for concrete tolerances (nothing compiled), in their own dtype
            rtol, atol = (tighter(tol, eps) for tol in (controller.rtol, controller.atol))
            tight = eqx.tree_at(lambda c: (c.rtol, c.atol), controller, (rtol, atol))
            how = f"at rtol {float(rtol):.1e}, atol {float(atol):.1e}"
            return self.replace(stepsize_controller=tight), how
        if isinstance(controller, diffrax.ConstantStepSize) and self.dt0 is not None:
            dt0 = self.dt0 / STEP_FACTOR
            how = f"with dt0 / {STEP_FACTOR} = {float(self.dt0) / STEP_FACTOR:.3g}"
            return self.replace(dt0=dt0), how
        return None, f"no tighter solve for {type(controller).__name__}"

    def expected_shrink(self) -> float:
        """How much the `tightened` re-solve is expected to shrink a solve's error: `inf` under
        error control (the tight solve's error is bounded by its tolerances instead), and
        `STEP_FACTOR ** order` for a fixed step (truncation error `~ dt^order`; the solver's
        `order`, or 1 when it does not say). The verdict reads a fixed-step re-check with it.
        """
        if not isinstance(self.stepsize_controller, diffrax.ConstantStepSize):
            return math.inf
        try:
            order = int(self.solver.order(diffrax.ODETerm(lambda t, y, args: y)))
        except (AttributeError, TypeError, NotImplementedError):  # no order declared: the least
            order = 1
        return float(STEP_FACTOR ** max(order, 1))

    def requested_accuracy(self, scale: float) -> float:
        """The relative accuracy these options ask of the solver for outputs of size `scale`:
        `max(rtol, atol / scale)` under a `PIDController`; 0.0 for a fixed step (it asks for
        a step, not an accuracy: its error is what the `tightened` re-solve measures).

        **Arguments:** `scale`: the size of the outputs (`max |reference|`, > 0).
        """
        controller = self.stepsize_controller
        if not isinstance(controller, diffrax.PIDController):
            return 0.0
        return max(float(controller.rtol), float(controller.atol) / scale)
