"""Neural ODEs: a vector field integrated by the one `solve` wrapper."""

import abc
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._core._types import Args, ScalarLike, SpacetimeGenerator, State, VectorField
from .._core.calculus import time_array, tree_sub
from .._core.solve import SensitivityField, SolveStats, solve


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


def _as_field(field):
    # a diffrax.ODETerm (as in diffrax's documentation) is accepted for its vector field
    return field.vector_field if isinstance(field, diffrax.ODETerm) else field


class AbstractSolvedModel(eqx.Module):
    """A model that runs ODE solves of its own (not through a field and diffrax options a
    sweep can see), all at one relative and absolute tolerance `tolerance`.

    `sweep` measures its solver floor by re-solving the reference at `tolerance / 1000` (the
    model with that field replaced: same structure, same compiled program), as it tightens a
    `NeuralODE`'s step-size controller.
    """

    tolerance: eqx.AbstractVar[Float[Array, ""] | float]


class AbstractNeuralODE(eqx.Module):
    """A neural ODE `dx/dt = field(t, x, args)` on `[t0, t1]`; the model output is `x(t1)`.

    The abstract base of `NeuralODE` and `LinearNODE`: it declares the fields (as
    `AbstractVar`s) and implements the solves once; concrete subclasses are final and say how
    the model changes when its field does (`with_field`).

    `__call__(x0)` returns `x(t1)` for one input; `vmap` it for batches. `solve(x0)` returns
    `(x(t1), SolveStats)`; `solve_tangent` the forward sensitivity system.
    """

    field: eqx.AbstractVar[VectorField]
    t1: eqx.AbstractVar[float]
    t0: eqx.AbstractVar[float]
    solver: eqx.AbstractVar[diffrax.AbstractSolver]
    stepsize_controller: eqx.AbstractVar[diffrax.AbstractStepSizeController]
    dt0: eqx.AbstractVar[ScalarLike | None]  # an array inside a sweep (traced, not static)
    max_steps: eqx.AbstractVar[int]
    adjoint: eqx.AbstractVar[diffrax.AbstractAdjoint]
    args: eqx.AbstractVar[Args]
    throw: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def with_field(self, field: VectorField) -> "AbstractNeuralODE":
        """The same neural ODE (solver, interval, options) with another field."""

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
        change of the output along `(dp, dx0)`. See `gj.SensitivityField`.
        """
        if fn is None:
            fn, p, dp = _FixedParameters(self.field), jnp.zeros(()), jnp.zeros(())
        return NeuralODE(SensitivityField(fn, p, dp), **options(self)).solve((x0, dx0))

    def with_options(self, **changes) -> "AbstractNeuralODE":
        """A copy with solver options replaced, e.g. `adjoint=diffrax.ForwardMode()`.

        **Raises:** `ValueError` for a name that is not an option (listing the valid ones).
        """
        unknown = sorted(set(changes) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid options are {list(OPTIONS)}.")
        return eqx.tree_at(
            lambda m: [getattr(m, k) for k in changes],
            self,
            list(changes.values()),
            is_leaf=lambda x: x is None,
        )


# every solve option of a neural ODE (all but the field)
OPTIONS = (
    "t1",
    "t0",
    "solver",
    "stepsize_controller",
    "dt0",
    "max_steps",
    "adjoint",
    "args",
    "throw",
)


def options(model: AbstractNeuralODE) -> dict[str, Any]:
    """The solve options of `model` (everything but its field), as keyword arguments."""
    return {k: getattr(model, k) for k in OPTIONS}


class _FixedParameters(eqx.Module):
    """`(p, t, y, args) -> field(t, y, args)`: a field with no parameters to move."""

    field: VectorField

    def __call__(self, p, t, y, args):
        return self.field(t, y, args)


def check_interval(model: AbstractNeuralODE) -> None:
    """Eager checks shared by the concrete neural ODEs: a callable field and t1 > t0."""
    if not callable(model.field):
        raise TypeError(f"`field` must be callable (t, y, args); received {type(model.field)}.")
    if not float(model.t1) > float(model.t0):
        raise ValueError(f"`t1` must be greater than `t0` = {model.t0}; received t1 = {model.t1}.")


class NeuralODE(AbstractNeuralODE):
    """A neural ODE with any vector field and any diffrax solve options.

    A model written with diffrax is one line away: its vector field `(t, y, args) -> dy/dt`
    (an `eqx.Module`, a closure, or a `diffrax.ODETerm`) and its solve options,
    `gj.NeuralODE(func, t1=1.0, solver=diffrax.Kvaerno5(), stepsize_controller=...,
    adjoint=diffrax.BacksolveAdjoint())`.

    **Arguments:**

    - `field`: `(t, y, args) -> dy/dt`, or a `diffrax.ODETerm` (its vector field is taken).
    - `t1`: final time T (> t0); `t0`: initial time, default 0.
    - `solver`: any diffrax ODE solver (explicit, implicit, reversible; default Tsit5). Field
      evaluations are counted for explicit Runge-Kutta solvers and Euler, and reported as "not
      counted" otherwise.
    - `stepsize_controller` (default PID, rtol = atol = 1e-8), `dt0`, `max_steps` (4096),
      `adjoint` (default recursive checkpointing; any diffrax adjoint), `args`: as in
      `diffrax.diffeqsolve`.
    - `throw`: raise on solver failure (default); sweeps set it to False and read the stats.
    """

    field: VectorField = eqx.field(converter=_as_field)
    t1: float
    t0: float = 0.0
    solver: diffrax.AbstractSolver = eqx.field(default_factory=diffrax.Tsit5)
    stepsize_controller: diffrax.AbstractStepSizeController = eqx.field(
        default_factory=lambda: diffrax.PIDController(rtol=1e-8, atol=1e-8)
    )
    dt0: ScalarLike | None = None
    max_steps: int = 4096
    adjoint: diffrax.AbstractAdjoint = eqx.field(default_factory=diffrax.RecursiveCheckpointAdjoint)
    args: Args = None
    throw: bool = True

    def __check_init__(self):
        check_interval(self)

    def with_field(self, field: VectorField) -> "NeuralODE":
        return eqx.tree_at(lambda m: m.field, self, field)


def first_order_response(model, eps: SpacetimeGenerator, z: State) -> State:
    """Predicted `d/ds` of the output under `deform(field, eps, s)` at s = 0 (Thm 2.1, necessity).

    For the flow map `Phi` of the model's field from `t0` to `t1` and `v(t, x) = eps_y - F eps0`:
    `d/ds output = DPhi(z) v(t0, z) - v(t1, Phi(z))`. It vanishes for every `z` when the
    generator vanishes at `t0` and `t1` (the sufficiency half of Thm 2.1).

    **Arguments:**

    - `model`: a `gaugejax.NeuralODE`; `DPhi(z) v` comes from its error-controlled forward
      sensitivity system (`model.solve_tangent`).
    - `eps`: the generator `(t, y) -> (eps0, eps_y)`.
    - `z`: one input state.

    **Returns:** the predicted first-order response, shaped like `z`.

    **Raises:** `TypeError` if `model` is not a gaugejax neural ODE (saying how to wrap one).
    """
    if not isinstance(model, AbstractNeuralODE):
        raise TypeError(
            "first_order_response needs a gaugejax neural ODE (gaugejax.NeuralODE or "
            f"LinearNODE); received {type(model).__name__}. Wrap your vector field in one line: "
            "gj.NeuralODE(field, t1=..., solver=..., stepsize_controller=...)."
        )

    def v(t, x):
        t = time_array(t)
        e0, ey = eps(t, x)
        f = model.field(t, x, model.args)
        return jax.tree.map(lambda ey_, f_: ey_ - f_ * e0, ey, f)

    (phi_z, dphi_v0), _ = model.solve_tangent(z, v(model.t0, z))
    return tree_sub(dphi_v0, v(model.t1, phi_z))
