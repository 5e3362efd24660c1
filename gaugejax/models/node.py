"""Neural ODEs: a vector field integrated by the one `solve` wrapper, with one `SolveOptions`."""

import abc
import math
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from .._core._types import Args, ScalarLike, SpacetimeGenerator, State, VectorField
from .._core.calculus import time_array, tree_sub
from .._core.options import SolveOptions, state_dtype
from .._core.solve import DeformationSensitivityField, MovedField, SensitivityField, SolveStats
from .solved import AbstractSolvedModel


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


def _param_dtype(tree: PyTree):
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.result_type(*leaves) if leaves else None


# what `with_options` may change besides the `SolveOptions`: the interval, the field's args and
# the observable's times
MODEL_OPTIONS = ("t1", "t0", "args", "observation_times")


def check_observation_times(
    times: Any, t0: float | int, t1: float | int
) -> tuple[float, ...] | None:
    """The observation times `t_1 < ... < t_n` of a trajectory observable, as a tuple of Python
    floats (static: they are where the solve saves, part of the compiled program), or None.

    **Arguments:** `times`: a sequence of numbers (list, tuple, NumPy array) or None; `t0`,
    `t1`: the interval the times must lie in, `(t0, t1]` (x(t0) is the input, not observed).

    **Returns:** the times as a tuple of floats, or None for None.

    **Raises:** `TypeError` for a value that is not a sequence of concrete numbers (a traced
    array cannot say where to save); `ValueError` for an empty sequence, times that are not
    strictly increasing (naming the first pair out of order), or a time outside `(t0, t1]`.
    """
    if times is None:
        return None
    try:
        if isinstance(times, str):  # iterable, but of characters
            raise TypeError("a string")
        values = tuple(float(t) for t in times)
    except Exception as e:  # noqa: BLE001 - any failure: not a sequence of concrete numbers
        raise TypeError(
            "`observation_times` must be a sequence of Python numbers t_1 < ... < t_n in "
            f"(t0, t1] = ({t0}, {t1}] (static: the times the solve saves at); received "
            f"{times!r} ({type(e).__name__})."
        ) from None
    if not values:
        raise ValueError(
            "`observation_times` must hold at least one time in (t0, t1] = "
            f"({t0}, {t1}] (None observes x(t1) only); received an empty sequence."
        )
    for a, b in zip(values[:-1], values[1:], strict=True):
        if not b > a:
            raise ValueError(
                "`observation_times` must be strictly increasing (sorted, no repeats), as "
                f"diffrax.SaveAt(ts=...) saves them; received {values} ({b} after {a})."
            )
    outside = [t for t in values if not (t0 < t <= t1) or not math.isfinite(t)]
    if outside:
        raise ValueError(
            f"`observation_times` must lie in (t0, t1] = ({t0}, {t1}]; received {values} "
            f"({outside[0]} is outside)."
        )
    return values


class AbstractNeuralODE(AbstractSolvedModel):
    """A neural ODE `dx/dt = field(t, x, args)` on `[t0, t1]`; the model output is `x(t1)`, or
    the saved trajectory `x(t_1), ..., x(t_n)` for `observation_times` `(t_1, ..., t_n)`.

    The abstract base of `NeuralODE` and `LinearNODE`: it declares the fields (as
    `AbstractVar`s: the field, the interval, the field's `args` and one `SolveOptions`) and
    implements the solves and the sweep's questions once; concrete subclasses are final and
    say how the model changes when its field does (`with_field`). The solve options read
    through as attributes (`model.solver`, `model.stepsize_controller`, `model.dt0`, ...).

    `__call__(x0)` returns the observable for one input (`x(t1)`, or the states at the
    observation times with a leading time axis); `vmap` it for batches. `solve(x0)` returns
    `(observable, SolveStats)`; `solve_tangent` the forward sensitivity system at the same
    times. The observable decides which gauge group a model has: x(t1) is kept by maps that
    are the identity at t0 and t1, the trajectory only by maps that are the identity at t0 and
    at every observation time.
    """

    field: eqx.AbstractVar[VectorField]
    t1: eqx.AbstractVar[float]
    t0: eqx.AbstractVar[float]
    solve_options: eqx.AbstractVar[SolveOptions]
    args: eqx.AbstractVar[Args]
    observation_times: eqx.AbstractVar[tuple[float, ...] | None]

    @abc.abstractmethod
    def with_field(self, field: VectorField) -> "AbstractNeuralODE":
        """The same neural ODE (solver, interval, options) with another field."""

    @property
    def solver(self) -> diffrax.AbstractSolver:
        return self.solve_options.solver

    @property
    def stepsize_controller(self) -> diffrax.AbstractStepSizeController:
        # a default (None) controller as it solves the model: for its parameters' dtype
        return self._options().stepsize_controller

    def _options(self) -> SolveOptions:
        """The `SolveOptions` for the parameters' dtype (`SolveOptions.for_dtype`)."""
        return self.solve_options.for_dtype(state_dtype(self))

    @property
    def dt0(self) -> float | Float[ArrayLike, "*batch"] | None:
        # an array inside a sweep (traced), batched in a vmapped stack of models
        return self.solve_options.dt0

    @property
    def max_steps(self) -> int:
        return self.solve_options.max_steps

    @property
    def adjoint(self) -> diffrax.AbstractAdjoint:
        return self.solve_options.adjoint

    @property
    def throw(self) -> bool:
        return self.solve_options.throw

    def observation_saveat(self) -> diffrax.SaveAt | None:
        """`diffrax.SaveAt(ts=observation_times)`, or None (x(t1) only) without them."""
        if self.observation_times is None:
            return None
        return diffrax.SaveAt(ts=jnp.asarray(self.observation_times, dtype=float))

    def solve(self, x0: State, saveat: diffrax.SaveAt | None = None) -> tuple[State, SolveStats]:
        """`(observable, SolveStats)` for one input `x0`.

        **Arguments:**

        - `x0`: the input state.
        - `saveat`: a `diffrax.SaveAt` to return the states at other times of the same
          solve, e.g. `diffrax.SaveAt(ts=ts)` for `x(ts)` with a leading time axis (dense
          interpolation between the solver's own steps: the steps, and so `SolveStats`, are
          those of the plain solve). Default: the model's observable, `x(t1)` without a time
          axis, or the states at `observation_times` with a leading time axis.

        **Returns:** `(states, SolveStats)`.

        **Raises:** `TypeError` for a `saveat` that is not a `diffrax.SaveAt`.
        """
        if saveat is not None and not isinstance(saveat, diffrax.SaveAt):
            raise TypeError(
                f"`saveat` must be a diffrax.SaveAt (e.g. diffrax.SaveAt(ts=ts)); received "
                f"{type(saveat).__name__}."
            )
        if saveat is None:
            saveat = self.observation_saveat()
        return self.solve_options.solve(
            self.field, x0, t0=self.t0, t1=self.t1, args=self.args, saveat=saveat
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
        *,
        generator: SpacetimeGenerator | None = None,
    ) -> tuple[tuple[State, State], SolveStats]:
        """`((x(t1), dx(t1)), stats)` of the forward sensitivity system, under error control;
        with `observation_times`, `x` and `dx` at those times (leading time axis).

        Without `fn`: the flow's jvp, `dx(t1) = DPhi(x0) dx0`. With `fn(p, t, y, args)` (the
        field as a function of parameters `p`, equal to `self.field` at `p`): the first-order
        change of the output along `(dp, dx0)`. See `gj.SensitivityField`. With `generator`
        eps instead: the first-order change along `dx0` and the deformation
        `deform(self.field, eps, s)` (Eq. 9), two jvps per evaluation
        (`gj.DeformationSensitivityField`).

        **Raises:** `ValueError` for both `fn` and `generator`.
        """
        if generator is not None:
            if fn is not None:
                raise ValueError(
                    "pass `fn` (with `p`, `dp`) or `generator`, not both: each says how the "
                    "field moves."
                )
            sensitivity = DeformationSensitivityField(self.field, generator)
        else:
            if fn is None:
                fn, p, dp = _FixedParameters(self.field), jnp.zeros(()), jnp.zeros(())
            sensitivity = SensitivityField(fn, p, dp)
        system = NeuralODE(
            sensitivity,
            t1=self.t1,
            t0=self.t0,
            args=self.args,
            solve_options=self.solve_options,
            observation_times=self.observation_times,
        )
        return system.solve((x0, dx0))

    def with_options(self, **changes: Any) -> "AbstractNeuralODE":
        """A copy with solve options (`SolveOptions`' names), the interval (`t1`, `t0`), the
        field's `args` or the `observation_times` replaced, e.g.
        `adjoint=diffrax.ForwardMode()`.

        **Raises:** `ValueError` for a name that is not an option (listing the valid ones);
        as `check_observation_times` for `observation_times` (checked against the new
        interval).
        """
        valid = (*MODEL_OPTIONS, *SolveOptions.__dataclass_fields__)
        unknown = sorted(set(changes) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid options are {list(valid)}.")
        if "observation_times" in changes or {"t0", "t1"} & set(changes):
            # tree_at runs no __init__: the times are checked here, against the new interval;
            # without times there is nothing to check, and the interval may be traced (an end
            # time drawn inside a jitted training step, as `integrate_regularizers`' "steer")
            times = changes.get("observation_times", self.observation_times)
            changes["observation_times"] = (
                None
                if times is None
                else check_observation_times(
                    times, float(changes.get("t0", self.t0)), float(changes.get("t1", self.t1))
                )
            )
        own = {k: v for k, v in changes.items() if k in MODEL_OPTIONS}
        solve = {k: v for k, v in changes.items() if k not in MODEL_OPTIONS}
        model = self
        if solve:
            options = self.solve_options.replace(**solve)
            model = eqx.tree_at(lambda m: m.solve_options, model, options)
        if own:
            model = eqx.tree_at(
                lambda m: [getattr(m, k) for k in own],
                model,
                list(own.values()),
                is_leaf=lambda x: x is None,
            )
        return model

    # what a sweep asks (AbstractSolvedModel), answered from the SolveOptions

    def observe(self, inputs: PyTree) -> tuple[PyTree, SolveStats]:
        """`vmap(self.solve)(inputs)`: the observable (x(t1), or the states at
        `observation_times`, axes `(input, time, ...)`) and the per-input `SolveStats`."""
        return jax.vmap(self.solve)(inputs)

    def observe_tangent(
        self,
        moved: Callable[[PyTree], "AbstractNeuralODE"],
        p: PyTree,
        dp: PyTree,
        inputs,
        generator: SpacetimeGenerator | None = None,
    ) -> tuple[PyTree, SolveStats]:
        """The first-order change of the observable along `a -> moved(a)` (at every observation
        time), solved as the forward sensitivity system of the moved field (`solve_tangent`),
        under error control: a jvp through an adaptive solve would choose its steps for the
        primal alone. With `generator` (the path moves the field as `deform(self.field,
        generator, a)` to first order), the system of that deformation: two jvps per
        evaluation instead of a jvp of the moved field (`gj.DeformationSensitivityField`)."""

        def one(x):
            zero = jax.tree.map(jnp.zeros_like, x)
            if generator is not None:
                (_, dx), stats = self.solve_tangent(x, zero, generator=generator)
            else:
                (_, dx), stats = self.solve_tangent(x, zero, MovedField(moved), p, dp)
            return dx, stats

        return jax.vmap(one)(inputs)

    def for_sweep(self, dtype: Any, *, differentiated: bool) -> "AbstractNeuralODE":
        """The default controller resolved for `dtype` (`SolveOptions.for_dtype`), tolerances
        checked against `dtype`, `throw=False`, `diffrax.ForwardMode()` when the
        sweep differentiates through the solve, and the tolerances and `dt0` traced in the
        parameters' dtype (`SolveOptions.traced`)."""
        options = self.solve_options.for_dtype(dtype)  # a default controller for `dtype`
        options.check_tolerances(dtype)
        options = options.replace(throw=False)
        if differentiated:  # a jvp through diffeqsolve needs the forward-mode adjoint
            options = options.replace(adjoint=diffrax.ForwardMode())
        options = options.traced(_param_dtype(self) or jnp.result_type(float))
        return eqx.tree_at(lambda m: m.solve_options, self, options)

    def tightened(self, dtype: Any) -> tuple["AbstractNeuralODE | None", str]:
        """The model with `SolveOptions.tightened` options (tolerances floored at 4 eps of
        `dtype`), observing at the same times."""
        options = self.solve_options.for_dtype(dtype)
        options, how = options.tightened(4 * float(jnp.finfo(dtype).eps))
        if options is None:
            return None, how
        return eqx.tree_at(lambda m: m.solve_options, self, options), how

    def requested_accuracy(self, scale: float) -> float:
        """`SolveOptions.requested_accuracy`."""
        return self._options().requested_accuracy(scale)

    def expected_shrink(self) -> float:
        """`SolveOptions.expected_shrink`."""
        return self.solve_options.expected_shrink()


class _FixedParameters(eqx.Module):
    """`(p, t, y, args) -> field(t, y, args)`: a field with no parameters to move."""

    field: VectorField

    def __call__(self, p, t, y, args):
        return self.field(t, y, args)


def check_interval(model: AbstractNeuralODE) -> None:
    """Eager checks shared by the concrete neural ODEs: a callable field, t1 > t0, and one
    `SolveOptions`."""
    if not callable(model.field):
        raise TypeError(f"`field` must be callable (t, y, args); received {type(model.field)}.")
    if not float(model.t1) > float(model.t0):
        raise ValueError(f"`t1` must be greater than `t0` = {model.t0}; received t1 = {model.t1}.")
    if not isinstance(model.solve_options, SolveOptions):
        raise TypeError(
            "`solve_options` must be a gj.SolveOptions; received "
            f"{type(model.solve_options).__name__}."
        )


def solve_options_from(options: SolveOptions | None, **given: Any) -> SolveOptions:
    """The `SolveOptions` of a neural ODE's constructor: `options`, or one built from the
    options given one by one (None: the `SolveOptions` default).

    **Raises:** `ValueError` when both are given.
    """
    given = {k: v for k, v in given.items() if v is not None}
    if options is None:
        return SolveOptions(**given)
    if given:
        raise ValueError(
            f"pass `solve_options` or the options {sorted(given)} one by one, not both."
        )
    return options


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
    - `stepsize_controller` (default PID at rtol = atol = 1e-8 in float64, 1e-5 in float32:
      `SolveOptions`), `dt0`, `max_steps` (4096),
      `adjoint` (default recursive checkpointing; any diffrax adjoint), `args`: as in
      `diffrax.diffeqsolve`.
    - `throw`: raise on solver failure (default); sweeps set it to False and read the stats.
    - `solve_options`: the six options above as one `gj.SolveOptions`, instead of one by one.
    - `observation_times`: `(t_1, ..., t_n)`, strictly increasing in `(t0, t1]`: the model's
      observable is then the saved trajectory `x(t_1), ..., x(t_n)`
      (`diffrax.SaveAt(ts=...)`; sweeps judge every saved state). Default None: `x(t1)`.

    An option left out (None) takes its `SolveOptions` default.

    **Raises:** `TypeError` for a field that is not callable; `ValueError` for `t1 <= t0`, or
    `solve_options` together with options given one by one; as `check_observation_times`.
    """

    field: VectorField
    t1: float
    t0: float
    solve_options: SolveOptions
    args: Args
    observation_times: tuple[float, ...] | None

    def __init__(
        self,
        field: VectorField | diffrax.ODETerm,
        t1: float,
        t0: float = 0.0,
        solver: diffrax.AbstractSolver | None = None,
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        dt0: ScalarLike | None = None,
        max_steps: int | None = None,
        adjoint: diffrax.AbstractAdjoint | None = None,
        args: Args = None,
        throw: bool | None = None,
        *,
        solve_options: SolveOptions | None = None,
        observation_times: Any = None,  # a sequence of floats, or None
    ):
        self.field = _as_field(field)
        self.t1 = t1
        self.t0 = t0
        self.observation_times = check_observation_times(observation_times, t0, t1)
        self.solve_options = solve_options_from(
            solve_options,
            solver=solver,
            stepsize_controller=stepsize_controller,
            dt0=dt0,
            max_steps=max_steps,
            adjoint=adjoint,
            throw=throw,
        )
        self.args = args

    def __check_init__(self):
        check_interval(self)

    def with_field(self, field: VectorField) -> "NeuralODE":
        return eqx.tree_at(lambda m: m.field, self, field)


def first_order_response(model, eps: SpacetimeGenerator, z: State) -> State:
    """Predicted `d/ds` of the output under `deform(field, eps, s)` at s = 0 (Thm 2.1, necessity).

    For the flow map `Phi` of the model's field from `t0` to `t1` and `v(t, x) = eps_y - F eps0`:
    `d/ds output = DPhi(z) v(t0, z) - v(t1, Phi(z))`. With `observation_times`, the same at
    every observation time t_i (Thm 2.1 generalised: `DPhi_{t_i}(z) v(t0, z) -
    v(t_i, Phi_{t_i}(z))`, stacked on a leading time axis). It vanishes for every `z` when the
    generator vanishes at `t0` and at every observed time: for such a generator it is 0 by
    construction, so it tests the theorem's boundary condition, not the model; compare it with
    the measured response (`gauge_response`) of a generator that does not vanish there.

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
    if model.observation_times is None:
        return tree_sub(dphi_v0, v(model.t1, phi_z))
    times = jnp.asarray(model.observation_times, dtype=float)
    return tree_sub(dphi_v0, jax.vmap(v)(times, phi_z))
