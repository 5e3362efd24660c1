"""Gauge fixing for linear neural ODEs (paper Sec. 5): the Eq. 45 regulariser and the closed-form
canonical gauge (uniform motion) it selects."""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._core.calculus import time_derivative
from .._core.numerics import quadrature
from .._core.solve import AbstractWrappedSolver
from ..models import AbstractNeuralODE
from ..models.linearize import check_affine, describe_field, linear_field, not_affine


def _check_penalty_args(strength, t1, num_nodes) -> None:
    if not strength >= 0:
        raise ValueError(f"`strength` (lambda) must be >= 0; received {strength!r}.")
    if not t1 > 0:
        raise ValueError(f"`t1` must be > 0; received {t1!r}.")
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"`num_nodes` must be a positive int; received {num_nodes!r}.")


def linear_gauge_fixing_penalty(
    w: Callable, b: Callable, t1: float, *, strength: float = 1.0, num_nodes: int = 32
) -> Float[Array, ""]:
    """Eq. 45: `lambda int_0^T |dw/dt + w^2|_F^2 + |(d/dt + w) b|^2 dt`.

    dw/dt and db/dt by jvp in t; the integral by `num_nodes`-point Gauss-Legendre quadrature.
    Zero exactly on uniform motion (`d/dt (w x + b) = 0` for every x).

    **Raises:** `ValueError` for `strength < 0`, `t1 <= 0` or `num_nodes < 1`.
    """
    _check_penalty_args(strength, t1, num_nodes)

    def integrand(t):
        wt, dw = time_derivative(w, t)
        bt, db = time_derivative(b, t)
        return jnp.sum((dw + wt @ wt) ** 2) + jnp.sum((db + wt @ bt) ** 2)

    return strength * quadrature(integrand, 0.0, t1, num_nodes)


def rotation_covariant_penalty(
    w: Callable, b: Callable, t1: float, *, strength: float = 1.0, num_nodes: int = 32
) -> Float[Array, ""]:
    """The rotation-invariant Higgs kinetic term of the paper's footnote 12:
    `lambda int_0^T |(d/dt - w) b|^2 dt`.

    Under Eq. 25 with `c = 0` (`w -> G^-1 w G - G^-1 dG/dt`, `b -> G^-1 b`) the covariant
    derivative is `D = d/dt - w`: `D' b' = d/dt(G^-1 b) - (G^-1 w G - G^-1 G') G^-1 b =
    G^-1 (db/dt - w b) = G^-1 D b`, since `d/dt G^-1 = -G^-1 G' G^-1`. So `|D b|^2` is
    invariant exactly when `G(t)` is orthogonal at every t: under rotations (`SO(d)`), not
    under general `GL(d)` gauges (rescalings change it), and not for a shift `c != 0`. Eq. 45's
    `(d/dt + w) b` is not covariant (it picks up `-2 G^-1 G' G^-1 b`), so it is not invariant
    even under rotations. The sign is the one that makes the derivative covariant for
    `dx/dt = w x + b` with Eq. 25's convention `x = G y + c`.

    Arguments as `linear_gauge_fixing_penalty` (callables `w(t) -> (d, d)`, `b(t) -> (d,)`).

    **Raises:** `ValueError` for `strength < 0`, `t1 <= 0` or `num_nodes < 1`.
    """
    _check_penalty_args(strength, t1, num_nodes)

    def integrand(t):
        bt, db = time_derivative(b, t)
        return jnp.sum((db - w(t) @ bt) ** 2)

    return strength * quadrature(integrand, 0.0, t1, num_nodes)


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
    M: Float[ArrayLike, "d d"], m: Float[ArrayLike, " d"], t1: float
) -> tuple[CanonicalWeight, CanonicalBias]:
    """The uniform-motion representative `(w, b)` of the orbit of linear neural ODEs with I/O map
    `x -> M x + m` on [0, T]: trajectories `x(t) = x0 + (t/T)(M x0 + m - x0)` are straight lines,
    so Eq. 45 vanishes; it is the unique zero of Eq. 45 on the orbit.

    **Raises:** `ValueError` for non-finite `M` or `m`, or when M has an eigenvalue on
    (-inf, 0]: then `P(t) = 1 + (t/T)(M - 1)`
    is singular for some t in (0, T] and no uniform-motion representative exists.
    """
    M, m = jnp.asarray(M), jnp.asarray(m)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or m.shape != M.shape[:1]:
        raise ValueError(f"`M` must be (d, d) and `m` (d,); received {M.shape} and {m.shape}.")
    if not t1 > 0:
        raise ValueError(f"`t1` must be > 0; received {t1!r}.")
    for name, value in (("M", M), ("m", m)):
        if not bool(jnp.all(jnp.isfinite(value))):
            raise ValueError(f"`{name}` must be finite; received {value}.")
    eig = np.linalg.eigvals(np.asarray(M))
    bad = eig[(np.abs(eig.imag) < 1e-12 * max(1.0, np.abs(eig).max())) & (eig.real <= 0)]
    if bad.size:
        raise ValueError(
            f"`M` has the eigenvalue {bad[0].real:.3g} on (-inf, 0]: P(t) = 1 + (t/T)(M - 1) "
            "becomes singular, so no uniform-motion (canonical) gauge exists for this I/O map."
        )
    weight = CanonicalWeight(M, float(t1))
    return weight, CanonicalBias(weight, m)


TRAJECTORY_TERMS = ("kinetic", "jacobian", "uniform_motion", "r3", "local_error", "steer")


class LocalErrorSolver(AbstractWrappedSolver):
    """`solver`'s steps, with its own local error estimate accumulated into the state: on a
    state `(x, integrals)` every step adds `|t1 - t0| * sum |error of x|` to
    `integrals["local_error"]` (the recipe of diffrax issue #196; Pal et al., ICML 2021,
    regularise this sum of the solver's error estimates weighted by the step). A rejected step
    is dropped by diffrax with its state, so only accepted steps count; the steps themselves
    are `solver`'s (the accumulator's own error estimate is zero and its rate is zero).

    **Arguments:** `solver`: an adaptive diffrax solver (one with an error estimate).
    """

    solver: diffrax.AbstractAdaptiveSolver

    term_structure = diffrax.AbstractTerm

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, y_error, dense, state, result = self.solver.step(
            terms, t0, t1, y0, args, solver_state, made_jump
        )
        x1, integrals = y1
        error = sum(jnp.sum(jnp.abs(e)) for e in jax.tree.leaves(y_error[0]))
        added = integrals["local_error"] + jnp.abs(t1 - t0) * error
        return (x1, {**integrals, "local_error": added}), y_error, dense, state, result


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
        t_arr = jnp.asarray(t, dtype=x.dtype)
        if "uniform_motion" in self.terms:
            along = self._along(self._field(args), args, f)  # f: F(t, x), computed once
            rates["uniform_motion"] = jnp.sum(along(t_arr, x) ** 2)
        if "r3" in self.terms:  # d^3 x / dt^3: the total derivative along the flow, twice
            third = self._along(self._along(self._field(args), args), args, f)
            rates["r3"] = jnp.sum(third(t_arr, x) ** 2)
        for name in ("local_error", "steer"):  # accumulated by LocalErrorSolver; STEER: none
            if name in self.terms:
                rates[name] = jnp.zeros((), x.dtype)
        return f, rates

    def _field(self, args) -> Callable:
        return lambda tt, y: self.field(tt, y, args)

    def _along(self, h: Callable, args, f=None) -> Callable:
        """`(t, y) -> d/dt h(t, x(t))` at `x(t) = y` along the flow: one jvp in the direction
        `(1, F(t, y))` (nested, these are Taylor-mode derivatives of the trajectory). `f`: the
        field at the point the result is evaluated at, when already computed (the outermost
        derivative; an inner one must evaluate the field itself, where it is differentiated)."""

        def dh(tt, y):
            v = self.field(tt, y, args) if f is None else f
            return jax.jvp(h, (tt, y), (jnp.ones_like(tt), v))[1]

        return dh


def integrate_regularizers(
    model,
    x0: Float[Array, " d"],
    terms: tuple[str, ...] = ("kinetic", "jacobian", "uniform_motion"),
    *,
    key=None,
    probe: Float[Array, " d"] | None = None,
    steer_width: float | None = None,
) -> tuple[Float[Array, " d"], dict[str, Float[Array, ""]]]:
    """`x(t1)` and trajectory regularisers of a neural ODE, all in one `diffeqsolve`:

    - `kinetic`: `int |F|^2 dt` (RNODE kinetic energy, Finlay et al. 2020);
    - `jacobian`: `int |eps^T D_x F|^2 dt`, Hutchinson's estimator of `int |D_x F|_F^2 dt` with one
      Gaussian probe `eps` (from `key`) fixed within the solve, or an explicit `probe`;
    - `uniform_motion`: `int |d/dt F(t, x(t))|^2 dt = int |d_t F + (D_x F) F|^2 dt` (Eq. 43 for any
      field: zero exactly when the trajectory is a straight line at constant speed); TayNODE's
      `R_2` (Kelly et al. 2020);
    - `r3`: `int |d^3 x / dt^3|^2 dt`, TayNODE's `R_3` (their MNIST recipe), by nested jvps
      along the flow;
    - `local_error`: `sum_steps |h| sum |error estimate|`, the model's adaptive solver's own
      local error estimates along this solve (`LocalErrorSolver`; Pal et al. 2021): it
      depends on the solver and controller, not on the trajectory alone;
    - `steer`: STEER (Ghosh et al., NeurIPS 2020): the solve ends at a random time
      `T ~ U[t1 - b, t1 + b]` instead of `t1` (`b = steer_width`), so `x1` is `x(T)`. It
      regularises by the draw alone: its reported integral is exactly 0 (a sum of the
      integrals stays a correct loss), and the other terms integrate over `[t0, T]`. `T` is
      `jax.random.uniform(steer_key, (), x0.dtype, t1 - b, t1 + b)` with
      `probe_key, steer_key = jax.random.split(key)` (the jacobian probe, if any, is drawn
      from `probe_key`: the two draws are independent). Use it for training solves only.

    `terms` defaults to the first three (RNODE's and Eq. 43's); `r3`, `local_error` and `steer`
    on request (`TRAJECTORY_TERMS` lists all six).

    **Arguments:**

    - `model`: a neural ODE observing `x(t1)` (not `observation_times`, with `steer`).
    - `x0`: one initial state.
    - `terms`: names from `TRAJECTORY_TERMS`.
    - `key`: a PRNG key, for `jacobian`'s probe (without `probe`) and `steer`'s end time.
    - `probe`: an explicit Hutchinson probe for `jacobian` (shape of `x0`).
    - `steer_width`: STEER's half-width `b`, in `(0, t1 - t0)` (so that `T > t0`). Default
      None: `(t1 - t0) / 2`, our choice (STEER tunes `b` per task; a half-interval keeps
      every draw at least half the interval long).

    **Returns:** `(x(t1), integrals)`: the end state (`x(T)` with `steer`) and a dict from each
    name in `terms` to its integral (a scalar).

    **Raises:** `ValueError` for an unknown term (listing the valid ones), `jacobian` without a
    `key` or `probe`, `steer` without a `key`, a `steer_width` outside `(0, t1 - t0)`, or
    `steer` on a model with `observation_times`.
    """
    terms = tuple(terms)
    unknown = [t for t in terms if t not in TRAJECTORY_TERMS]
    if unknown:
        raise ValueError(f"unknown regulariser(s) {unknown}; valid: {list(TRAJECTORY_TERMS)}.")
    end = None
    if "steer" in terms:
        key, end = _steer_end_time(model, key, steer_width, x0.dtype)
    if "jacobian" in terms and probe is None:
        if key is None:
            raise ValueError("the `jacobian` term needs a `key` (Hutchinson probe) or a `probe`.")
        probe = jax.random.normal(key, jnp.shape(x0), dtype=x0.dtype)
    field = _AugmentedField(model.field, terms, probe)
    zeros = {t: jnp.zeros((), dtype=x0.dtype) for t in terms}
    augmented = model.with_field(field)
    if "local_error" in terms:
        augmented = augmented.with_options(solver=LocalErrorSolver(model.solver))
    if end is not None:
        augmented = augmented.with_options(t1=end)
    (x1, integrals), _ = augmented.solve((x0, zeros))
    return x1, integrals


def _steer_end_time(model, key, width, dtype):
    """`(probe_key, T)`: STEER's end time `T ~ U[t1 - b, t1 + b]` from one half of `key`, the
    other half left for the jacobian probe (the two draws independent)."""
    if key is None:
        raise ValueError("the `steer` term needs a `key` (it draws the solve's end time).")
    if model.observation_times is not None:
        raise ValueError(
            "the `steer` term moves the end time of an x(t1) observable; received a model with "
            f"observation_times {model.observation_times} (a trajectory observable)."
        )
    t0, t1 = float(model.t0), float(model.t1)
    b = (t1 - t0) / 2 if width is None else width
    if not 0 < b < t1 - t0:
        raise ValueError(
            f"`steer_width` (STEER's half-width b) must be in (0, t1 - t0) = (0, {t1 - t0:g}), "
            f"so that every end time is after t0; received {width!r}."
        )
    probe_key, steer_key = jax.random.split(key)
    return probe_key, jax.random.uniform(steer_key, (), dtype, t1 - b, t1 + b)


# the regularisers of affine fields: (function of w, b and t1, what it is called in messages)
_AFFINE = {
    "eq45": (linear_gauge_fixing_penalty, "Eq. 45"),
    "rotation_covariant": (rotation_covariant_penalty, "footnote 12"),
}


def _affine_penalty(name: str, model, inputs) -> Float[Array, ""]:
    field = getattr(model, "field", None)
    penalty, label = _AFFINE[name]

    def message(detail: str) -> str:
        return (
            f"regulariser {name!r} ({label}) needs a field affine in the state, as in a LinearNODE "
            f"(dx/dt = w(t) x + b(t)); received a {type(model).__name__} with field "
            f"{describe_field(field)}, {detail}. For a nonlinear field use 'uniform_motion' "
            "(Eq. 43), its generalisation."
        )

    if not isinstance(model, AbstractNeuralODE):
        raise TypeError(message("which is not a neural ODE"))
    inputs = jnp.asarray(inputs)
    linear, residual = linear_field(model, dim=inputs.shape[-1], dtype=inputs.dtype)
    checked = check_affine(
        linear, residual, lambda m: message(f"which is {not_affine(m)}"), TypeError
    )
    t0 = model.t0
    return checked(
        penalty(lambda s: linear.weight(t0 + s), lambda s: linear.bias(t0 + s), model.t1 - t0)
    )


PENALTIES = (*_AFFINE, *TRAJECTORY_TERMS)


def gauge_fixing_penalty(
    name: str, model, inputs: Float[Array, "n d"], *, key=None, steer_width: float | None = None
) -> Float[Array, ""]:
    """The regulariser `name` of `model` at lambda = 1, as a training loss term:

    - `"eq45"`: Eq. 45 (`linear_gauge_fixing_penalty` of `w`, `b` on [t0, t1]) of a neural ODE
      whose field is affine in the state: a `LinearNODE` (or any `AbstractLinearField`), or any
      field `F(t, y) = w(t) y + b(t)` (a closure or Module), for which `w(t) = D_y F(t, 0)` and
      `b(t) = F(t, 0)` are derived after a numerical affinity check (see
      `orbits.linear_node_fingerprint`; `d` is `inputs.shape[-1]`). It does not depend on the
      values of `inputs`.
    - `"rotation_covariant"`: footnote 12's `int |(d/dt - w) b|^2 dt`
      (`rotation_covariant_penalty`), for the same affine fields as `"eq45"`.
    - `"kinetic"`, `"jacobian"`, `"uniform_motion"`, `"r3"`, `"local_error"`, `"steer"`: the
      mean over `inputs` of `integrate_regularizers` (any neural ODE; `jacobian` draws one probe
      per input from `key`). `"steer"` (one end time per input from `key`, half-width
      `steer_width`) adds no term: its value is 0, accepted so that a list of regulariser
      names may hold it; STEER acts on the training solve (`integrate_regularizers`).

    **Raises:** `ValueError` for an unknown name (listing the valid ones), `"jacobian"` or
    `"steer"` without a `key`, or as `integrate_regularizers`; `TypeError` for `"eq45"` or
    `"rotation_covariant"` on a field that fails the affinity check (Eq. 45 is
    `|d/dt (w x + b)|^2` for affine fields only; `"uniform_motion"` is its generalisation to
    any field; under `jit` with traced field arrays the check is an `eqx.error_if` instead) or
    for a model that is not a neural ODE.
    """
    if name not in PENALTIES:
        raise ValueError(f"unknown regulariser {name!r}; valid: {list(PENALTIES)}.")
    if name in _AFFINE:
        return _affine_penalty(name, model, inputs)
    if not isinstance(model, AbstractNeuralODE):
        raise TypeError(
            f"regulariser {name!r} integrates along trajectories of a neural ODE; received a "
            f"{type(model).__name__}."
        )
    if name in ("jacobian", "steer") and key is None:
        what = "Hutchinson probes" if name == "jacobian" else "the solves' end times"
        raise ValueError(f"the {name!r} regulariser needs a `key` ({what}).")
    keys = None if key is None else jax.random.split(key, inputs.shape[0])  # None: no leaves

    def one(x, k):
        return integrate_regularizers(model, x, (name,), key=k, steer_width=steer_width)[1][name]

    return jnp.mean(jax.vmap(one)(inputs, keys))
