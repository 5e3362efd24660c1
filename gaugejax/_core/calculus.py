"""Spacetime calculus of neural-ODE vector fields (paper Sec. 2.1-2.2).

Conventions (all derivatives by `jax.jvp`, never finite differences, never a full Jacobian
except inside the one linear solve of a finite diffeomorphism):

- A field on R^n is `u(z) -> dz`; `lie_bracket(u, v)(z) = Dv(z) u(z) - Du(z) v(z) = (L_u v)(z)`.
- A neural-ODE field is `F(t, y, args)` (diffrax's signature). Its spacetime lift is
  `F_hat(t, y) = (1, F(t, y))`.
- A spacetime generator is `eps(t, y) -> (eps0, eps_y)`. The paper's deformation (Eq. 9) maps
  `F_hat -> F_hat + s L_eps F_hat`; restoring `t(s) = s` (Sec. 2.2) gives the new field
  `F' = F + s [(L_eps F_hat)^y - F (L_eps F_hat)^t]`.
- A finite spacetime diffeomorphism is a chart `Psi(s, y) -> (t, x)`: old coordinates in terms of
  new ones. The pulled-back field solves `(D_y x - F (D_y t)) y' = F d_s t - d_s x`.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import ArrayLike, Float, PyTree

from ._checks import check_like, is_traced
from ._types import Args, ScalarLike, SpacetimeGenerator, State, VectorField


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x - y, a, b)


def _value_and_bracket(u: Callable, v: Callable, z: PyTree) -> tuple[PyTree, PyTree]:
    """`(v(z), [u, v](z))` with two jvps and one evaluation each of u and v."""
    uz = u(z)
    check_like("`u(z)`", uz, z)
    vz, dv_u = jax.jvp(v, (z,), (uz,))
    check_like("`v(z)`", vz, z)
    _, du_v = jax.jvp(u, (z,), (vz,))
    return vz, tree_sub(dv_u, du_v)


def lie_bracket(u: Callable[[PyTree], PyTree], v: Callable[[PyTree], PyTree]) -> Callable:
    """The Lie bracket `[u, v] = L_u v` of two vector fields on R^n (arrays or PyTrees).

    **Arguments:**

    - `u`, `v`: fields `z -> dz` returning the structure of `z`.

    **Returns:** a callable `z -> Dv(z) u(z) - Du(z) v(z)`; jit/vmap/grad-compatible.

    **Raises:** (when called) `ValueError` if `u` or `v` does not return the structure of `z`.
    """

    def bracket(z: PyTree) -> PyTree:
        return _value_and_bracket(u, v, z)[1]

    return bracket


def time_array(t: ScalarLike | int) -> Float[ArrayLike, ""]:
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(float)


class AbstractTimeFunction(eqx.Module):
    """A function of time that may know its time derivative in closed form (e.g. a gauge's
    `G(t) = expm(s(t) A)`, whose `dG/dt = s'(t) A G(t)` costs one product where a jvp through
    the exponential doubles its work). `time_derivative` asks it; subclasses without a closed
    form inherit the jvp."""

    @abc.abstractmethod
    def __call__(self, t: ScalarLike) -> PyTree:
        """The value at t."""

    def value_and_derivative(self, t: Float[ArrayLike, ""]) -> tuple[PyTree, PyTree]:
        """`(f(t), df/dt(t))`; by default one forward-mode jvp in t."""
        return jax.jvp(self, (t,), (jnp.ones_like(t),))


def time_derivative(f: Callable, t: ScalarLike | int) -> tuple[PyTree, PyTree]:
    """`(f(t), df/dt(t))`: the closed form of an `AbstractTimeFunction`, else one forward-mode
    jvp in t (never a finite difference).

    **Arguments:**

    - `f`: `t -> ` an array or PyTree of arrays (a time-dependent weight, bias or gauge map).
    - `t`: a scalar time; an integer time is cast to JAX's default float dtype.

    **Returns:** the value and its time derivative, both with the structure of `f(t)`.
    """
    t = time_array(t)
    if isinstance(f, AbstractTimeFunction):
        return f.value_and_derivative(t)
    return jax.jvp(f, (t,), (jnp.ones_like(t),))


def generator_value(
    eps: SpacetimeGenerator, t: Float[ArrayLike, ""], y: State
) -> tuple[Float[ArrayLike, ""], State]:
    """`eps(t, y)` with `eps0` as an array of `t`'s dtype (the time tangent it becomes).

    **Arguments:** `eps`: a spacetime generator `(t, y) -> (eps0, eps_y)`; `t`: a scalar time
    array; `y`: a state.

    **Returns:** `(eps0, eps_y)`.

    **Raises:** `ValueError` for an `eps0` that is not a scalar.
    """
    e0, ey = eps(t, y)
    e0 = jnp.asarray(e0, dtype=t.dtype)
    if jnp.shape(e0) != ():
        raise ValueError(
            "`eps(t, y)` must return (eps0, eps_y) with a scalar eps0; received eps0 of "
            f"shape {jnp.shape(e0)}."
        )
    return e0, ey


class DeformedField(eqx.Module):
    """`F + scale * [(L_eps F_hat)^y - F (L_eps F_hat)^t]`; built by `deform`."""

    field: VectorField
    eps: SpacetimeGenerator
    scale: ScalarLike

    def __call__(self, t: ScalarLike, y: State, args: Args) -> State:
        t = time_array(t)

        def field_hat(z):
            tz, yz = z
            return jnp.ones_like(tz), self.field(tz, yz, args)

        def eps_hat(z):
            return generator_value(self.eps, *z)

        (_, f), (lie_t, lie_y) = _value_and_bracket(eps_hat, field_hat, (t, y))
        return jax.tree.map(lambda f_, ly: f_ + self.scale * (ly - f_ * lie_t), f, lie_y)


def deform(field: VectorField, eps: SpacetimeGenerator, scale: ScalarLike) -> DeformedField:
    """Infinitesimal spacetime-diffeomorphism deformation of a neural-ODE field (Eq. 9, Sec. 2.2).

    Solutions `y(t)` of the returned field are, to first order in `scale`, the solutions `x` of
    `field` seen in the coordinates `x^mu = y^mu + scale * eps^mu(y)`, with time rescaled so that
    `t(s) = s` again:

    `F' = F + scale * [(L_eps F_hat)^y - F (L_eps F_hat)^t]`, `F_hat = (1, F)`.

    Special cases: `eps = (0, eps_y)` gives Eq. 16, `F + scale (DF eps - D eps F - d_t eps)`;
    `eps = (eps0(t), 0)` gives `F + scale d/dt(eps0 F) = F + scale (eps0' F + eps0 d_t F)`, which
    is *not* the printed Eq. 20 (see the README).

    **Arguments:**

    - `field`: `(t, y, args) -> dy/dt`.
    - `eps`: spacetime generator `(t, y) -> (eps0, eps_y)`, `eps0` a scalar, `eps_y` shaped as y.
    - `scale`: the deformation parameter s (a float or a scalar array; differentiable).

    **Returns:** a `DeformedField`, itself a field `(t, y, args) -> dy/dt` and a PyTree.
    """
    if not callable(field):
        raise TypeError(f"`field` must be callable (t, y, args) -> dy/dt; received {type(field)}.")
    if not callable(eps):
        raise TypeError(f"`eps` must be callable (t, y) -> (eps0, eps_y); received {type(eps)}.")
    return DeformedField(field, eps, scale)


class SpacetimePulledBackField(eqx.Module):
    """The exact field in new coordinates `(s, y)` with `(t, x) = chart(s, y)`."""

    field: VectorField
    chart: Callable[[ScalarLike, State], tuple[ScalarLike, State]]

    def __call__(self, s: ScalarLike, y: State, args: Args) -> State:
        s = time_array(s)
        (t, x), (dt_ds, dx_ds) = time_derivative(lambda s_: self.chart(s_, y), s)
        check_like("the space part `x` of `chart(s, y)`", x, y)
        f = self.field(t, x, args)
        _, chart_y = jax.linearize(lambda y_: self.chart(s, y_), y)

        def operator(v):
            dt, dx = chart_y(v)
            return jax.tree.map(lambda dx_, f_: dx_ - f_ * dt, dx, f)

        rhs = jax.tree.map(lambda f_, dx_: f_ * dt_ds - dx_, f, dx_ds)
        flat_rhs, unravel = ravel_pytree(rhs)
        basis = jnp.eye(flat_rhs.shape[0], dtype=flat_rhs.dtype)
        matrix = jax.vmap(lambda e: ravel_pytree(operator(unravel(e)))[0], out_axes=1)(basis)
        # Dense LU of the jvp-built d x d operator. (lineax's LU rejects vectors whose avals carry
        # shard_map's varying axes, so it cannot run inside the sharded sweep.) A singular chart
        # gives non-finite values, which diffrax reports as a failed solve in that lane.
        return unravel(jnp.linalg.solve(matrix, flat_rhs))


def spacetime_pullback(
    field: VectorField, chart: Callable[[ScalarLike, State], tuple[ScalarLike, State]]
) -> SpacetimePulledBackField:
    """Exact field after a finite spacetime diffeomorphism `(t, x) = chart(s, y)`.

    A curve `y(s)` solves the returned field iff `chart(s, y(s))` traces a solution of `field`.
    With `M = D_y x - F (D_y t)^T` and the s-derivatives by jvp,
    `dy/ds = M^-1 [F(t, x) d_s t - d_s x]` (one dense LU solve of the jvp-built operator).

    **Arguments:**

    - `field`: `(t, y, args) -> dy/dt`.
    - `chart`: `(s, y) -> (t, x)`, `t` scalar, `x` shaped as `y`; must be a diffeomorphism with
      `d_s t > 0` along trajectories.

    **Returns:** a field `(s, y, args) -> dy/ds` (a PyTree).
    """
    if not callable(chart):
        raise TypeError(f"`chart` must be callable (s, y) -> (t, x); received {type(chart)}.")
    return SpacetimePulledBackField(field, chart)


class _SpatialChart(eqx.Module):
    psi: Callable[[ScalarLike, State], State]

    def __call__(self, s, y):
        return s, self.psi(s, y)


def pullback(
    field: VectorField, psi: Callable[[ScalarLike, State], State]
) -> SpacetimePulledBackField:
    """Exact field after a finite spatial diffeomorphism `x = psi(t, y)` (finite Eq. 13-16).

    `dy/dt = (D_y psi)^-1 [F(t, psi(t, y)) - d_t psi(t, y)]`. With `psi_0 = psi_T = id` the
    input-output map on `[0, T]` is unchanged; with `psi = G(t) y + c(t)` this is Eq. 25.

    **Arguments:**

    - `field`: `(t, y, args) -> dy/dt`.
    - `psi`: `(t, y) -> x`, invertible in `y` for each `t`.

    **Returns:** a field `(t, y, args) -> dy/dt` (a PyTree).
    """
    if not callable(psi):
        raise TypeError(f"`psi` must be callable (t, y) -> x; received {type(psi)}.")
    return spacetime_pullback(field, _SpatialChart(psi))


class ReparametrizedField(eqx.Module):
    """`dy/ds = tau'(s) F(tau(s), y)`; built by `reparametrize`."""

    field: VectorField
    tau: Callable[[ScalarLike], ScalarLike]

    def __call__(self, s: ScalarLike, y: State, args: Args) -> State:
        t, dtau = time_derivative(self.tau, s)
        return jax.tree.map(lambda f: dtau * f, self.field(t, y, args))


def reparametrize(
    field: VectorField,
    tau: Callable[[ScalarLike], ScalarLike],
    *,
    grid: Float[ArrayLike, " n"] | None = None,
) -> ReparametrizedField:
    """Exact field in a new time `s`, with `t = tau(s)` (finite Eq. 17-20).

    `dy/ds = tau'(s) F(tau(s), y)`. With `tau(0) = 0`, `tau(T) = T` the output at `T` is unchanged.

    **Arguments:**

    - `field`: `(t, y, args) -> dy/dt`.
    - `tau`: `s -> t`, strictly increasing.
    - `grid`: optional points `s` at which `tau' > 0` is checked eagerly.

    **Returns:** a field `(s, y, args) -> dy/ds` (a PyTree).

    **Raises:** `ValueError` if `tau' <= 0` somewhere on `grid`.
    """
    if not callable(tau):
        raise TypeError(f"`tau` must be callable s -> t; received {type(tau)}.")
    if grid is not None:
        grid = jnp.asarray(grid)
        slopes = jax.vmap(lambda s: time_derivative(tau, s)[1])(grid)
        if is_traced(slopes):  # refused, never skipped
            raise ValueError(
                "`grid` checks tau' > 0 eagerly and needs concrete values (tau and grid not "
                "traced); under jit pass grid=None and check tau outside."
            )
        bad = jnp.flatnonzero(~(slopes > 0))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                "`tau` must be strictly increasing: tau'(s) > 0 on `grid`; received "
                f"tau'({float(grid[i])}) = {float(slopes[i])} "
                f"({bad.size} of {grid.size} points)."
            )
    return ReparametrizedField(field, tau)
