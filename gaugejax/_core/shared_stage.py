"""`SharedStageRK`: an explicit Runge-Kutta step for a field whose x-independent part (its
coefficients at a time) is costly, evaluated once per distinct stage time and shared by the
stages at that time, by the next step's first stage and by every input of a batched state.

A field `F(t, x) = apply(coefficients(t), x)` (e.g. a gauged linear field: `coefficients(t)`
holds the gauge frame's `w'(t)`, `b'(t)`, `apply` is `w' x + b'`) costs one `coefficients` per
evaluation under a plain Runge-Kutta solver. Classic RK4's stage times are `t, t + h/2,
t + h/2, t + h`, and `t + h` is the next step's `t`: two new coefficient evaluations per step,
not four (measured on the benchmark's W1 lane: 1.9x). The step is diffrax's explicit
Runge-Kutta step written out from the wrapped solver's public `ButcherTableau` (stages,
solution, error estimate, dense output), so it agrees with the wrapped solver to rounding.
"""

from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import PyTree

from .solve import AbstractWrappedSolver, explicit_tableau


def _combine(y: PyTree, weights: np.ndarray, ks: list) -> PyTree:
    """`y + sum_j weights[j] k_j` over the stages with a nonzero weight (static), elementwise:
    XLA fuses it into one loop, where a product with the stage axis is a kernel of its own."""
    terms = [(float(w), k) for w, k in zip(weights, ks, strict=False) if w != 0]

    def one(y_leaf, *k_leaves):
        total = None
        for (w, _), k in zip(terms, k_leaves, strict=True):
            wk = jnp.asarray(w, k.dtype) * k
            total = wk if total is None else total + wk
        return y_leaf if total is None else y_leaf + total

    return jax.tree.map(one, y, *[k for _, k in terms])


class SharedStageRK(AbstractWrappedSolver):
    """An explicit Runge-Kutta solver (`solver`'s tableau, interpolation and error estimate)
    that evaluates `field.coefficients(t)` once per distinct stage time of a step and applies
    it with `field.apply(coefficients, y)` at every stage at that time.

    The coefficients at the step's end time (when the tableau has a stage there, `c = 1`) are
    carried in the solver state to the next step's first stage: RK4 evaluates 2 per step (t +
    h/2 and t + h), Tsit5 and Dopri5 5. A rejected step keeps the old solver state (diffrax's
    rule), so an adaptive controller stays correct; after a jump (`made_jump`) the first stage
    is evaluated anew. Steps, error estimates and dense output are the wrapped solver's
    (`interpolation_cls`, `order`, `error_order`), equal to rounding.

    The term must be a `diffrax.ODETerm` of the same field, `F(t, y) = apply(coefficients(t),
    y)`: the stages use `field`, the term gives the control (dt and the direction of time) and
    `func` (diffrax's initial step-size guess). A state may hold many inputs at once (a field
    whose `apply` maps a batch): one `coefficients` per stage time for all of them. Field
    evaluations are counted from the wrapped solver (`gj.count_evaluations(solver, ...)`):
    `gj.evaluations_per_step` of this wrapper is None.

    **Arguments:**

    - `solver`: an explicit Runge-Kutta solver with one `diffrax.ButcherTableau` (`gj.RK4`,
      `diffrax.Tsit5`, `Dopri5`, `Heun`, ...).
    - `field`: has `coefficients(t) -> PyTree` (independent of the state) and
      `apply(coefficients, y) -> dy/dt` (e.g. a `gj.AbstractLinearField`).

    **Raises:** `TypeError` for a solver that is not an explicit Runge-Kutta solver with one
    tableau, or a field without callable `coefficients` and `apply`.
    """

    solver: diffrax.AbstractSolver
    field: Any

    term_structure = diffrax.ODETerm

    def __check_init__(self):
        if explicit_tableau(self.solver) is None:
            raise TypeError(
                "`solver` of a SharedStageRK must be an explicit Runge-Kutta solver with one "
                "diffrax.ButcherTableau (e.g. gj.RK4(), diffrax.Tsit5()); received "
                f"{type(self.solver).__name__}."
            )
        missing = [
            m for m in ("coefficients", "apply") if not callable(getattr(self.field, m, None))
        ]
        if missing:
            raise TypeError(
                "`field` of a SharedStageRK must have `coefficients(t)` and "
                f"`apply(coefficients, y)` (e.g. a gj.AbstractLinearField); "
                f"{type(self.field).__name__} lacks {missing}."
            )

    @staticmethod
    def wraps(solver: Any) -> bool:
        """Whether `solver` can be wrapped: an explicit Runge-Kutta solver with one tableau."""
        return explicit_tableau(solver) is not None

    def _stage_times(self) -> tuple[np.ndarray, bool]:
        """The stages' `c` (the first stage's included) and whether a stage lies at the step's
        end (then its coefficients are carried to the next step)."""
        tableau = explicit_tableau(self.solver)
        c = np.concatenate([[tableau.c1], tableau.c])
        return c, bool(np.any(c == 1))

    def _coefficients(self, terms, t0, t1, t):
        # diffrax integrates t1 < t0 in negated times (its wrapped term negates them back);
        # the control dt then is negative: the field's own time is -t
        control = terms.contr(t0, t1)
        return self.field.coefficients(jnp.where(control < 0, -t, t))

    def init(self, terms, t0, t1, y0, args):
        del y0, args
        _, carries = self._stage_times()
        return self._coefficients(terms, t0, t1, t0) if carries else None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del args
        tableau = explicit_tableau(self.solver)
        c, carries = self._stage_times()
        control = terms.contr(t0, t1)
        dt = t1 - t0

        def time(ci):
            # the stage time as diffrax computes it (exact at c = 0 and c = 1)
            if ci == 0:
                return t0
            return t1 if ci == 1 else t0 + jnp.asarray(ci, jnp.result_type(dt)) * dt

        # every stage time's coefficients but the carried first: one vmapped evaluation (fewer,
        # larger operations; W1's sweep blocks measured 5-8% faster than with one call per
        # time, about 20% under the benchmark's intra-op pool of 4 threads on one core)
        fresh = sorted({float(ci) for ci in c} - ({0.0} if carries else set()))
        times = jnp.stack([jnp.asarray(time(ci), jnp.result_type(dt)) for ci in fresh])
        stacked = jax.vmap(lambda t: self._coefficients(terms, t0, t1, t))(times)
        coefficients = {
            ci: jax.tree.map(lambda a, j=j: a[j], stacked) for j, ci in enumerate(fresh)
        }
        if carries and made_jump is False:  # static: no jump can happen in this solve
            coefficients[0.0] = solver_state
        elif carries:  # after a jump the carried coefficients belong to the time before it
            coefficients[0.0] = lax.cond(
                made_jump, lambda: self._coefficients(terms, t0, t1, t0), lambda: solver_state
            )
        ks = []
        y_stage = y0
        for i in range(len(c)):
            if i:
                y_stage = _combine(y0, tableau.a_lower[i - 1], ks)
            ks.append(terms.prod(self.field.apply(coefficients[float(c[i])], y_stage), control))
        y1 = y_stage if tableau.ssal else _combine(y0, tableau.b_sol, ks)
        zero = jax.tree.map(jnp.zeros_like, y0)
        y_error = _combine(zero, tableau.b_error, ks)  # zeros for a tableau without one
        ks = jax.tree.map(lambda *k: jnp.stack(k), *ks)
        dense_info = dict(y0=y0, y1=y1, k=ks)
        new_state = coefficients[1.0] if carries else None
        return y1, y_error, dense_info, new_state, diffrax.RESULTS.successful
