"""Neural ODEs: a vector field integrated by the one `solve` wrapper."""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._types import Args, ScalarLike, State, VectorField
from ..solve import SensitivityField, SolveStats, solve


class MLPField(eqx.Module):
    """A time-dependent MLP field `F(t, y) = out_scale * MLP([t, y])` (`eqx.nn.MLP`, tanh).

    **Arguments:**

    - `dim`: state dimension d.
    - `width`, `depth`: of the MLP.
    - `key`: initialisation key.
    - `activation`: default `jnp.tanh` (smooth, as Thm 2.1 assumes).
    - `out_scale`: multiplies the output (keeps the flow moderate for random weights).
    """

    mlp: eqx.nn.MLP
    out_scale: float

    def __init__(
        self,
        dim: int,
        width: int = 32,
        depth: int = 2,
        *,
        key: PRNGKeyArray,
        activation: Callable = jnp.tanh,
        out_scale: float = 1.0,
    ):
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"`dim` must be a positive int; received {dim!r}.")
        self.mlp = eqx.nn.MLP(dim + 1, dim, width, depth, activation=activation, key=key)
        self.out_scale = out_scale

    def __call__(
        self, t: ScalarLike, y: Float[Array, " d"], args: Args = None
    ) -> Float[Array, " d"]:
        t = jnp.asarray(t, dtype=y.dtype)
        return self.out_scale * self.mlp(jnp.concatenate([t[None], y]))


class AbstractNeuralODE(eqx.Module):
    """A neural ODE `dx/dt = field(t, x, args)` on `[t0, t1]`; the model output is `x(t1)`.

    **Arguments:**

    - `field`: `(t, y, args) -> dy/dt`, an `eqx.Module` or any callable.
    - `t1`: final time T (> t0); `t0`: initial time, default 0.
    - `solver`, `stepsize_controller`, `dt0`, `max_steps`, `adjoint`: as in `gaugejax.solve`
      (defaults Tsit5, PID with rtol = atol = 1e-8, 4096 steps, recursive checkpointing).
    - `throw`: raise on solver failure (default); sweeps set it to False and read the stats.

    `__call__(x0)` returns `x(t1)` for one input; `vmap` it for batches. `solve(x0)` returns
    `(x(t1), SolveStats)`.
    """

    field: VectorField
    t1: float
    t0: float = 0.0
    solver: diffrax.AbstractSolver = eqx.field(default_factory=diffrax.Tsit5)
    stepsize_controller: diffrax.AbstractStepSizeController = eqx.field(
        default_factory=lambda: diffrax.PIDController(rtol=1e-8, atol=1e-8)
    )
    dt0: float | None = None
    max_steps: int = 4096
    adjoint: diffrax.AbstractAdjoint = eqx.field(default_factory=diffrax.RecursiveCheckpointAdjoint)
    args: Args = None
    throw: bool = True

    def __check_init__(self):
        if not callable(self.field):
            raise TypeError(f"`field` must be callable (t, y, args); received {type(self.field)}.")
        if float(self.t1) <= float(self.t0):
            raise ValueError(
                f"`t1` must be greater than `t0` = {self.t0}; received t1 = {self.t1}."
            )

    def solve(self, x0: State) -> tuple[State, SolveStats]:
        """`(x(t1), SolveStats)` for one input `x0`."""
        return solve(
            self.field,
            x0,
            t0=self.t0,
            t1=self.t1,
            args=self.args,
            solver=self.solver,
            stepsize_controller=self.stepsize_controller,
            dt0=self.dt0,
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            throw=self.throw,
        )

    def __call__(self, x0: State) -> State:
        return self.solve(x0)[0]

    def solve_tangent(
        self,
        x0: State,
        dx0: State,
        fn: Callable | None = None,
        p: PyTree = None,
        dp: PyTree = None,
    ) -> tuple[tuple[State, State], SolveStats]:
        """`((x(t1), dx(t1)), stats)` of the forward sensitivity system, under error control.

        Without `fn`: the flow's jvp, `dx(t1) = DPhi(x0) dx0`. With `fn(p, t, y, args)` (the
        field as a function of parameters `p`, equal to `self.field` at `p`): the first-order
        change of the output along `(dp, dx0)`. See `gaugejax.solve.SensitivityField`.
        """
        if fn is None:
            field = self.field

            def fn(_, t, y, args):
                return field(t, y, args)

            p = dp = jnp.zeros(())
        return self.with_field(SensitivityField(fn, p, dp)).solve((x0, dx0))

    def with_field(self, field: VectorField) -> "AbstractNeuralODE":
        """The same neural ODE (solver, interval) with another field (a `NeuralODE` when the
        field no longer has the structure this class requires)."""
        return eqx.tree_at(lambda m: m.field, self, field)

    def with_options(self, **options) -> "AbstractNeuralODE":
        """A copy with solver options replaced, e.g. `adjoint=diffrax.ForwardMode()`."""
        names = ("solver", "stepsize_controller", "dt0", "max_steps", "adjoint", "throw", "t1")
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid options are {list(names)}.")
        return eqx.tree_at(
            lambda m: [getattr(m, k) for k in options],
            self,
            list(options.values()),
            is_leaf=lambda x: x is None,
        )


class NeuralODE(AbstractNeuralODE):
    """A neural ODE with any vector field. See `AbstractNeuralODE` for the arguments."""


def _options(model: AbstractNeuralODE) -> dict:
    names = ("t1", "t0", "solver", "stepsize_controller", "dt0", "max_steps", "adjoint")
    return {k: getattr(model, k) for k in names + ("args", "throw")}
