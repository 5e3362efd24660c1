"""Gauge fixing for linear neural ODEs (paper Sec. 5): the Eq. 45 regulariser and the closed-form
canonical gauge (uniform motion) it selects."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .models import AbstractNeuralODE, LinearNODE


def _time_derivative(f: Callable, t):
    return jax.jvp(f, (t,), (jnp.ones_like(t),))


def linear_gauge_fixing_penalty(
    w: Callable, b: Callable, t1: float, *, strength: float = 1.0, num_nodes: int = 32
) -> Float[Array, ""]:
    """Eq. 45: `lambda int_0^T |dw/dt + w^2|_F^2 + |(d/dt + w) b|^2 dt`.

    dw/dt and db/dt by jvp in t; the integral by `num_nodes`-point Gauss-Legendre quadrature
    (exact for polynomial integrands of degree <= 2 num_nodes - 1; spectrally accurate for the
    smooth bases of `LinearNODE`). Zero exactly on uniform motion (`d/dt (w x + b) = 0` for
    every x).

    **Raises:** `ValueError` for `strength < 0`, `t1 <= 0` or `num_nodes < 1`.
    """
    if not strength >= 0:
        raise ValueError(f"`strength` (lambda) must be >= 0; received {strength!r}.")
    if not t1 > 0:
        raise ValueError(f"`t1` must be > 0; received {t1!r}.")
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"`num_nodes` must be a positive int; received {num_nodes!r}.")
    nodes, weights = np.polynomial.legendre.leggauss(num_nodes)
    ts = jnp.asarray(0.5 * t1 * (nodes + 1.0))

    def integrand(t):
        wt, dw = _time_derivative(w, t)
        bt, db = _time_derivative(b, t)
        return jnp.sum((dw + wt @ wt) ** 2) + jnp.sum((db + wt @ bt) ** 2)

    return strength * jnp.dot(jnp.asarray(0.5 * t1 * weights), jax.vmap(integrand)(ts))


class CanonicalWeight(eqx.Module):
    """`w(t) = (M - 1) P(t)^-1 / T`, `P(t) = 1 + (t/T)(M - 1)`."""

    M: Float[Array, "d d"]
    t1: float

    def __call__(self, t):
        eye = jnp.eye(self.M.shape[0], dtype=self.M.dtype)
        P = eye + (t / self.t1) * (self.M - eye)
        return jnp.linalg.solve(P.T, (self.M - eye).T).T / self.t1


class CanonicalBias(eqx.Module):
    """`b(t) = (1 - t w(t)) m / T`."""

    weight: CanonicalWeight
    m: Float[Array, " d"]

    def __call__(self, t):
        eye = jnp.eye(self.m.shape[0], dtype=self.m.dtype)
        return (eye - t * self.weight(t)) @ self.m / self.weight.t1


def canonical_gauge(
    M: Float[Array, "d d"], m: Float[Array, " d"], t1: float
) -> tuple[CanonicalWeight, CanonicalBias]:
    """The uniform-motion representative `(w, b)` of the orbit of linear neural ODEs with I/O map
    `x -> M x + m` on [0, T]: trajectories `x(t) = x0 + (t/T)(M x0 + m - x0)` are straight lines,
    so Eq. 45 vanishes; it is the unique zero of Eq. 45 on the orbit.

    **Raises:** `ValueError` when M has an eigenvalue on (-inf, 0]: then `P(t) = 1 + (t/T)(M - 1)`
    is singular for some t in (0, T] and no uniform-motion representative exists.
    """
    M, m = jnp.asarray(M), jnp.asarray(m)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or m.shape != M.shape[:1]:
        raise ValueError(f"`M` must be (d, d) and `m` (d,); received {M.shape} and {m.shape}.")
    if not t1 > 0:
        raise ValueError(f"`t1` must be > 0; received {t1!r}.")
    eig = np.linalg.eigvals(np.asarray(M))
    bad = eig[(np.abs(eig.imag) < 1e-12 * max(1.0, np.abs(eig).max())) & (eig.real <= 0)]
    if bad.size:
        raise ValueError(
            f"`M` has the eigenvalue {bad[0].real:.3g} on (-inf, 0]: P(t) = 1 + (t/T)(M - 1) "
            "becomes singular, so no uniform-motion (canonical) gauge exists for this I/O map."
        )
    weight = CanonicalWeight(M, float(t1))
    return weight, CanonicalBias(weight, m)


TRAJECTORY_TERMS = ("kinetic", "jacobian", "uniform_motion")


class _AugmentedField(eqx.Module):
    """`(x, q) -> (F, integrands)`: the regulariser integrands ride along in the same solve."""

    field: Callable
    terms: tuple[str, ...] = eqx.field(static=True)
    probe: Float[Array, " d"] | None

    def __call__(self, t, state, args):
        x, _ = state
        f = self.field(t, x, args)
        rates = {}
        if "kinetic" in self.terms:
            rates["kinetic"] = jnp.sum(f**2)
        if "jacobian" in self.terms:
            _, pullback = jax.vjp(lambda y: self.field(t, y, args), x)
            rates["jacobian"] = jnp.sum(pullback(self.probe)[0] ** 2)
        if "uniform_motion" in self.terms:
            t_arr = jnp.asarray(t, dtype=x.dtype)
            _, dfdt = jax.jvp(
                lambda tt, y: self.field(tt, y, args), (t_arr, x), (jnp.ones_like(t_arr), f)
            )
            rates["uniform_motion"] = jnp.sum(dfdt**2)
        return f, rates


def integrate_regularizers(
    model,
    x0: Float[Array, " d"],
    terms: tuple[str, ...] = TRAJECTORY_TERMS,
    *,
    key=None,
    probe: Float[Array, " d"] | None = None,
) -> tuple[Float[Array, " d"], dict[str, Float[Array, ""]]]:
    """`x(t1)` and trajectory regularisers of a neural ODE, all in one `diffeqsolve`:

    - `kinetic`: `int |F|^2 dt` (RNODE kinetic energy, Finlay et al. 2020);
    - `jacobian`: `int |eps^T D_x F|^2 dt`, Hutchinson's estimator of `int |D_x F|_F^2 dt` with one
      Gaussian probe `eps` (from `key`) fixed within the solve, or an explicit `probe`;
    - `uniform_motion`: `int |d/dt F(t, x(t))|^2 dt = int |d_t F + (D_x F) F|^2 dt` (Eq. 43 for any
      field: zero exactly when the trajectory is a straight line at constant speed).

    **Raises:** `ValueError` for an unknown term (listing the valid ones) or `jacobian` without a
    `key` or `probe`.
    """
    terms = tuple(terms)
    unknown = [t for t in terms if t not in TRAJECTORY_TERMS]
    if unknown:
        raise ValueError(f"unknown regulariser(s) {unknown}; valid: {list(TRAJECTORY_TERMS)}.")
    if "jacobian" in terms and probe is None:
        if key is None:
            raise ValueError("the `jacobian` term needs a `key` (Hutchinson probe) or a `probe`.")
        probe = jax.random.normal(key, jnp.shape(x0), dtype=x0.dtype)
    field = _AugmentedField(model.field, terms, probe)
    zeros = {t: jnp.zeros((), dtype=x0.dtype) for t in terms}
    (x1, integrals), _ = model.with_field(field).solve((x0, zeros))
    return x1, integrals


PENALTIES = ("eq45", *TRAJECTORY_TERMS)


def gauge_fixing_penalty(
    name: str, model, inputs: Float[Array, "n d"], *, key=None
) -> Float[Array, ""]:
    """The regulariser `name` of `model` at lambda = 1, as a training loss term:

    - `"eq45"`: Eq. 45 of a `LinearNODE` (`linear_gauge_fixing_penalty` of its `w`, `b` on
      [t0, t1]); it does not depend on `inputs`.
    - `"kinetic"`, `"jacobian"`, `"uniform_motion"`: the mean over `inputs` of
      `integrate_regularizers` (any neural ODE; `jacobian` draws one probe per input from `key`).

    **Raises:** `ValueError` for an unknown name (listing the valid ones); `TypeError` for
    `"eq45"` on a model whose field is not linear (Eq. 45 is `|d/dt (w x + b)|^2` for linear
    fields only; `"uniform_motion"` is its generalisation to any field) or for a model that is
    not a neural ODE.
    """
    if name not in PENALTIES:
        raise ValueError(f"unknown regulariser {name!r}; valid: {list(PENALTIES)}.")
    if name == "eq45":
        if not isinstance(model, LinearNODE):
            field = getattr(model, "field", None)
            raise TypeError(
                "regulariser 'eq45' (Eq. 45) needs a LinearNODE (dx/dt = w(t) x + b(t)); received "
                f"a {type(model).__name__} with field {type(field).__name__}. For a nonlinear "
                "field use 'uniform_motion' (Eq. 43), its generalisation."
            )
        t0 = model.t0
        return linear_gauge_fixing_penalty(
            lambda s: model.weight(t0 + s), lambda s: model.bias(t0 + s), model.t1 - t0
        )
    if not isinstance(model, AbstractNeuralODE):
        raise TypeError(
            f"regulariser {name!r} integrates along trajectories of a neural ODE; received a "
            f"{type(model).__name__}."
        )
    if name == "jacobian" and key is None:
        raise ValueError("the 'jacobian' regulariser needs a `key` (Hutchinson probes).")
    keys = None if key is None else jax.random.split(key, inputs.shape[0])  # None: no leaves

    def one(x, k):
        return integrate_regularizers(model, x, (name,), key=k)[1][name]

    return jnp.mean(jax.vmap(one)(inputs, keys))
