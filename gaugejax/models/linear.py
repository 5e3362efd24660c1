"""Linear neural ODEs `dx/dt = w(t) x + b(t)` (Eq. 21) and discrete feedforward networks
`x_{n+1} = phi(w_n x_n + b_n)` (Eq. 28/31)."""

import abc
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from .._core._types import Args, ScalarLike
from .._core.calculus import AbstractTimeFunction, time_array, time_derivative
from .._core.options import SolveOptions
from .._core.shared_stage import SharedStageRK
from .._core.solve import SolveStats, count_evaluations
from .node import (
    AbstractNeuralODE,
    NeuralODE,
    check_interval,
    check_observation_times,
    solve_options_from,
)


# ---------------------------------------------------------------------------- time bases


class AbstractTimeBasis(eqx.Module):
    """Scalar functions `phi_k(t)`, k = 0..K-1, on [0, T]; `w(t) = sum_k phi_k(t) W_k`."""

    @abc.abstractmethod
    def __call__(self, t: ScalarLike) -> Float[Array, " K"]:
        """The K basis values at t."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """K."""


class PiecewiseLinearBasis(AbstractTimeBasis):
    """Hat functions on `num_knots` equispaced knots over [0, T] (piecewise-linear w(t))."""

    knots: Float[Array, " K"]

    def __init__(self, t1: float, num_knots: int):
        if not isinstance(num_knots, int) or num_knots < 2:
            raise ValueError(f"`num_knots` must be an int >= 2; received {num_knots!r}.")
        if not t1 > 0:
            raise ValueError(f"`t1` must be > 0; received {t1!r}.")
        self.knots = jnp.linspace(0.0, float(t1), num_knots)

    def __call__(self, t):
        h = self.knots[1] - self.knots[0]
        return jnp.clip(1.0 - jnp.abs(t - self.knots) / h, 0.0, 1.0)

    @property
    def size(self) -> int:
        return self.knots.shape[0]


class FourierBasis(AbstractTimeBasis):
    """`1, cos(k pi t/T), sin(k pi t/T)` for k = 1..num_modes (size 2 num_modes + 1)."""

    omega: Float[Array, " M"]

    def __init__(self, t1: float, num_modes: int):
        if not isinstance(num_modes, int) or num_modes < 0:
            raise ValueError(f"`num_modes` must be an int >= 0; received {num_modes!r}.")
        if not t1 > 0:
            raise ValueError(f"`t1` must be > 0; received {t1!r}.")
        self.omega = jnp.arange(1.0, num_modes + 1.0) * jnp.pi / float(t1)

    def __call__(self, t):
        wt = self.omega * t
        return jnp.concatenate([jnp.ones((1,), dtype=wt.dtype), jnp.cos(wt), jnp.sin(wt)])

    @property
    def size(self) -> int:
        return 2 * self.omega.shape[0] + 1


# ---------------------------------------------------------------------------- linear fields


class AbstractLinearField(eqx.Module):
    """A field `F(t, x) = w(t) x + b(t)`; concrete fields define `weight(t)` and `bias(t)`.

    Its evaluation splits into a part independent of the state, `coefficients(t)` (`(w(t),
    b(t))` at once: a field whose weight and bias share work, such as Eq. 25's gauge frame,
    computes it once), and `apply(coefficients, x)`; `__call__(t, x, args)` is
    `apply(coefficients(t), x)` unless a field fuses it. A solver that evaluates the
    coefficients once per stage time for many inputs (`gj.SharedStageRK`) asks for the split.
    """

    @abc.abstractmethod
    def weight(self, t: ScalarLike) -> Float[Array, "d d"]:
        """w(t)."""

    @abc.abstractmethod
    def bias(self, t: ScalarLike) -> Float[Array, " d"]:
        """b(t)."""

    def coefficients(self, t: ScalarLike) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
        """`(w(t), b(t))`: the field's x-independent part at t, for `apply`."""
        return self.weight(t), self.bias(t)

    def apply(
        self, coefficients: tuple[Float[Array, "d d"], Float[Array, " d"]], x: Float[Array, " d"]
    ) -> Float[Array, " d"]:
        """`w x + b` for `coefficients = (w, b)` (of `coefficients(t)`)."""
        w, b = coefficients
        return w @ x + b

    def __call__(self, t: ScalarLike, x: Float[Array, " d"], args: Args = None):
        """`w(t) x + b(t)`: `apply(coefficients(t), x)` (concrete fields may fuse it)."""
        return self.apply(self.coefficients(t), x)


class BasisLinearField(AbstractLinearField):
    """`w(t) = sum_k phi_k(t) W_k`, `b(t) = sum_k phi_k(t) b_k` in a time basis."""

    basis: AbstractTimeBasis
    weights: Float[Array, "K d d"]
    biases: Float[Array, "K d"]

    def __check_init__(self):
        K = self.basis.size
        if (
            self.weights.ndim != 3
            or self.weights.shape[0] != K
            or (self.weights.shape[1] != self.weights.shape[2])
        ):
            raise ValueError(
                f"`weights` must have shape (K={K}, d, d) for the basis; received "
                f"{self.weights.shape}."
            )
        if self.biases.shape != self.weights.shape[:2]:
            raise ValueError(
                f"`biases` must have shape {self.weights.shape[:2]}; received {self.biases.shape}."
            )

    def weight(self, t):
        return jnp.tensordot(self.basis(t), self.weights, axes=1)

    def bias(self, t):
        return jnp.tensordot(self.basis(t), self.biases, axes=1)


class FunctionLinearField(AbstractLinearField):
    """A linear field from two callables `w(t) -> (d, d)` and `b(t) -> (d,)`."""

    w: object
    b: object

    def weight(self, t):
        return self.w(t)

    def bias(self, t):
        return self.b(t)


class AbstractGaugeMatrix(AbstractTimeFunction):
    """An invertible matrix function of time `G(t)` (a linear gauge's) that may know its
    inverse in closed form: `frame(t)` gives `(G, dG/dt, G^-1)`, the inverse None where it
    has none (then Eq. 25 takes a linear solve with G). E.g. `G = expm(s(t) A)` has
    `G^-1 = expm(-s(t) A)` from the same powers of A, cheaper than an LU factorisation."""

    def frame(
        self, t: Float[ArrayLike, ""]
    ) -> tuple[Float[Array, "d d"], Float[Array, "d d"], Float[Array, "d d"] | None]:
        """`(G(t), dG/dt, G(t)^-1 or None)`; by default the inverse is None."""
        G, dG = self.value_and_derivative(t)
        return G, dG, None


def gauge_frame(G: Callable, t: ScalarLike):
    """`(G, dG/dt, G^-1 or None)` at t: an `AbstractGaugeMatrix`'s `frame`, else
    `time_derivative` with no inverse."""
    if isinstance(G, AbstractGaugeMatrix):
        return G.frame(time_array(t))
    return (*time_derivative(G, t), None)


def _apply_inverse(Gt, Ginv, rhs):
    """`G^-1 rhs`: a product with a known inverse, else one linear solve."""
    return jnp.linalg.solve(Gt, rhs) if Ginv is None else Ginv @ rhs


def gauged_weight_terms(w: Callable, G: Callable, t: ScalarLike):
    """The weight half of Eq. 25: `(G, W, G^-1 or None)` at t with `w' = G^-1 W`,
    `W = w G - dG/dt`."""
    Gt, dG, Ginv = gauge_frame(G, t)
    return Gt, w(t) @ Gt - dG, Ginv


def gauged_linear_terms(w: Callable, b: Callable, G: Callable, c: Callable, t: ScalarLike):
    """Eq. 25, the one home of it: for `x = G(t) y + c(t)` the new field is
    `G^-1 [(w G - dG/dt) y + b + w c - dc/dt]`.

    **Returns:** `(G, W, r, G^-1 or None)` at t with `w' = G^-1 W` and `b' = G^-1 r` (dG/dt,
    dc/dt in closed form where G and c have one, else by jvp); callers apply G^-1 once (a
    product with a known inverse, else a solve with G), for the weight, the bias or a whole
    field evaluation.
    """
    Gt, W, Ginv = gauged_weight_terms(w, G, t)
    ct, dc = time_derivative(c, t)
    return Gt, W, b(t) + w(t) @ ct - dc, Ginv


class GaugedWeight(eqx.Module):
    """`w'(t) = G^-1 (w G - dG/dt)` (Eq. 25 without the shift `c`, which only enters the bias)."""

    w: Callable
    G: Callable

    def __call__(self, t: ScalarLike) -> Float[Array, "d d"]:
        Gt, W, Ginv = gauged_weight_terms(self.w, self.G, t)
        return _apply_inverse(Gt, Ginv, W)


class GaugedLinearField(AbstractLinearField):
    """The field of Eq. 25 in coordinates `y` with `x = G(t) y + c(t)`: `weight`/`bias` give
    `w'`, `b'`, and an evaluation `F(t, y)` is fused into one linear solve with one evaluation
    of G and of c (`gauged_linear_terms`); with a G that knows its inverse
    (`AbstractGaugeMatrix`, e.g. a one-mode `LinearGauge` element) the solve is a product.
    Separate weight and bias solves cost twice, and (two expm loops, each feeding an LU
    factorisation, in one vmapped solver step) hung jaxlib 0.10.2's CPU runtime at about 100
    lanes."""

    w: Callable
    b: Callable
    G: Callable
    c: Callable

    def weight(self, t: ScalarLike) -> Float[Array, "d d"]:
        Gt, W, _, Ginv = gauged_linear_terms(self.w, self.b, self.G, self.c, t)
        return _apply_inverse(Gt, Ginv, W)

    def bias(self, t: ScalarLike) -> Float[Array, " d"]:
        Gt, _, r, Ginv = gauged_linear_terms(self.w, self.b, self.G, self.c, t)
        return _apply_inverse(Gt, Ginv, r)

    def coefficients(self, t: ScalarLike) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
        """`(w'(t), b'(t))` from one evaluation of the frame: `G^-1 W`, `G^-1 r` (one product
        each with a known inverse, else one solve for both)."""
        Gt, W, r, Ginv = gauged_linear_terms(self.w, self.b, self.G, self.c, t)
        if Ginv is None:
            both = jnp.linalg.solve(Gt, jnp.concatenate([W, r[:, None]], axis=1))
            return both[:, :-1], both[:, -1]
        return Ginv @ W, Ginv @ r

    def __call__(self, t: ScalarLike, x: Float[Array, " d"], args=None) -> Float[Array, " d"]:
        # one input: G^-1 (W x + r) costs two matrix-vector products where `coefficients`
        # costs a matrix product; many inputs at one time share `coefficients` instead
        Gt, W, r, Ginv = gauged_linear_terms(self.w, self.b, self.G, self.c, t)
        return _apply_inverse(Gt, Ginv, W @ x + r)


class _InputBatch(eqx.Module):
    """A linear field on a batch of inputs `(M, d)`: one `coefficients(t)` for all of them."""

    field: AbstractLinearField

    def coefficients(self, t):
        return self.field.coefficients(t)

    def apply(self, coefficients, xs: Float[Array, "M d"]) -> Float[Array, "M d"]:
        return jax.vmap(self.field.apply, in_axes=(None, 0))(coefficients, xs)

    def __call__(self, t, xs: Float[Array, "M d"], args: Args = None) -> Float[Array, "M d"]:
        return self.apply(self.coefficients(t), xs)


class LinearNODE(AbstractNeuralODE):
    """A linear neural ODE `dx/dt = w(t) x + b(t)` (Eq. 21): a neural ODE whose field is an
    `AbstractLinearField`. `weight(t)`, `bias(t)` expose the parameters; `__call__(x0)` gives
    x(t1). The arguments, solve options and `observation_times` included, are those of
    `NeuralODE`."""

    field: AbstractLinearField
    t1: float
    t0: float
    solve_options: SolveOptions
    args: Args
    observation_times: tuple[float, ...] | None

    def __init__(
        self,
        field: AbstractLinearField,
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
        self.field = field
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
        if not isinstance(self.field, AbstractLinearField):
            raise TypeError(
                "`field` of a LinearNODE must be an AbstractLinearField (e.g. BasisLinearField); "
                f"received {type(self.field).__name__}."
            )
        check_interval(self)

    def weight(self, t: ScalarLike) -> Float[Array, "d d"]:
        return self.field.weight(t)

    def bias(self, t: ScalarLike) -> Float[Array, " d"]:
        return self.field.bias(t)

    def observe(self, inputs: PyTree) -> tuple[PyTree, SolveStats]:
        """`vmap(self.solve)(inputs)` in value: the observable of every input (axes `(input,
        ...)`) and the per-input `SolveStats`.

        With a constant step size and an explicit Runge-Kutta solver every input takes the
        same steps, so the inputs `(M, d)` are solved as one state by `gj.SharedStageRK`: the
        field's coefficients once per distinct stage time for all M inputs (RK4: 2 per step,
        not 4 per step and input), equal to the per-input solves to rounding. The stats are
        each input's (`gj.count_evaluations` of the model's solver). An adaptive controller
        would choose one step sequence for the whole batch: each input is solved alone.
        """
        shared = (
            isinstance(self.stepsize_controller, diffrax.ConstantStepSize)
            and SharedStageRK.wraps(self.solver)
            and isinstance(inputs, jax.Array | np.ndarray)
            and jnp.ndim(inputs) == 2
        )
        if not shared:
            return super().observe(inputs)
        batch = _InputBatch(self.field)
        options = self.solve_options.replace(solver=SharedStageRK(self.solver, batch))
        ys, stats = options.solve(
            batch, inputs, t0=self.t0, t1=self.t1, args=self.args, saveat=self.observation_saveat()
        )
        if self.observation_times is not None:  # (time, input, d) -> (input, time, d)
            ys = jnp.moveaxis(ys, 0, 1)
        num_evaluations = count_evaluations(
            self.solver, self.stepsize_controller, self.dt0, stats.num_steps
        )
        stats = eqx.tree_at(lambda s: s.num_evaluations, stats, num_evaluations)
        size = jnp.shape(inputs)[0]
        return ys, jax.tree.map(lambda a: jnp.broadcast_to(a, (size, *jnp.shape(a))), stats)

    def with_field(self, field) -> AbstractNeuralODE:
        """A `LinearNODE` for a linear field, else a `NeuralODE` with the same options."""
        if isinstance(field, AbstractLinearField):
            return eqx.tree_at(lambda m: m.field, self, field)
        return NeuralODE(
            field,
            t1=self.t1,
            t0=self.t0,
            args=self.args,
            solve_options=self.solve_options,
            observation_times=self.observation_times,
        )


def random_linear_node(
    dim: int,
    t1: float,
    *,
    key: PRNGKeyArray,
    basis: AbstractTimeBasis | None = None,
    weight_scale: float = 1.0,
    bias_scale: float = 1.0,
    **options,
) -> LinearNODE:
    """A `LinearNODE` with random coefficients `W_k ~ N(0, weight_scale^2 / d)`,
    `b_k ~ N(0, bias_scale^2)` in `basis` (default `FourierBasis(t1, 2)`)."""
    basis = FourierBasis(t1, 2) if basis is None else basis
    kw, kb = jax.random.split(key)
    W = weight_scale * jax.random.normal(kw, (basis.size, dim, dim)) / jnp.sqrt(dim) / basis.size
    b = bias_scale * jax.random.normal(kb, (basis.size, dim)) / basis.size
    return LinearNODE(BasisLinearField(basis, W, b), t1=t1, **options)


# ---------------------------------------------------------------------------- discrete nets

ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
}
# phi(a x) = a phi(x) for every a > 0: the activations with the rescaling symmetry (Eq. 30)
POSITIVELY_HOMOGENEOUS = ("identity", "relu", "leaky_relu")


class FeedforwardNet(eqx.Module):
    """`x_{n+1} = phi(w_n x_n + b_n)`, n = 0..N-1, all layers of width d (Eq. 28; Eq. 31 with
    `activation="identity"`).

    **Arguments:** `weights` (N, d, d), `biases` (N, d), `activation` one of
    `identity, relu, leaky_relu, tanh, gelu`.
    """

    weights: Float[Array, "N d d"]
    biases: Float[Array, "N d"]
    activation: str = eqx.field(static=True, default="identity")

    def __check_init__(self):
        if self.weights.ndim != 3 or self.weights.shape[1] != self.weights.shape[2]:
            raise ValueError(f"`weights` must have shape (N, d, d); received {self.weights.shape}.")
        if self.biases.shape != self.weights.shape[:2]:
            raise ValueError(
                f"`biases` must have shape {self.weights.shape[:2]}; received {self.biases.shape}."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(ACTIVATIONS)}; received {self.activation!r}."
            )

    @property
    def num_layers(self) -> int:
        return self.weights.shape[0]

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " d"]:
        phi = ACTIVATIONS[self.activation]

        def layer(x, wb):
            w, b = wb
            return phi(w @ x + b), None

        return jax.lax.scan(layer, x, (self.weights, self.biases))[0]


def LinearNet(weights: Float[Array, "N d d"], biases: Float[Array, "N d"]) -> FeedforwardNet:
    """The linear network of Eq. 31, `x_{n+1} = w_n x_n + b_n` (a `FeedforwardNet`)."""
    return FeedforwardNet(weights, biases, activation="identity")
