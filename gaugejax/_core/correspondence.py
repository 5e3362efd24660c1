"""Continuous <-> discrete correspondences: Wilson lines (Eq. 23), the integrated relation
(Eq. 32) and the lift of discrete gauges to continuous ones (Theorem 3.1).

Notation: `wilson_line(w, t_end, t_start)` is the *propagator* of `dx/dt = w(t) x` from
`t_start` to `t_end`, for either order of the times. For `t_end >= t_start` it is Eq. 23's
time-ordered exponential `T exp(int w)`; for `t_end < t_start` it is the inverse of the forward
propagator, the reverse-ordered exponential of **-w**, i.e. the paper's `W(-w)` of Eq. 22. The
printed second case of Eq. 23 (reverse-ordered exponential of +w) is not that propagator: with
it Eq. 22 and the covariance Eq. 46 fail (see the README and `experiments/linear_symmetry`).
"""

import math
from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jaxtyping import Array, Float, PyTree

from ._checks import check_value, is_traced
from ._types import ScalarLike
from .solve import solve


MatrixFn = Callable[[ScalarLike], Float[Array, "d d"]]
VectorFn = Callable[[ScalarLike], Float[Array, " d"]]


def _dim(w: MatrixFn, t) -> int:
    shape = jax.eval_shape(w, t).shape
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"`w(t)` must return a square (d, d) matrix; received shape {shape}.")
    return shape[0]


def _controller(rtol, atol):
    return diffrax.PIDController(rtol=rtol, atol=atol)


# Fields are Modules, not closures: diffeqsolve is jitted on the field's structure, so equal
# structures share one compiled program across calls (a new closure compiles anew).
class PropagatorField(eqx.Module):
    """The one field of every linear-ODE propagator here: `dU/dt = w(t) U` and, with a
    `source`, `dv/dt = w(t) v + source(t, U)` (w acting on the first axis of v).

    The Wilson line is `U` alone; the affine propagator adds `v` with `source = b(t)` (the
    integrated bias of Eq. 32); the cubic neural ODE's leading order adds the cubic
    coefficient with `source = lambda(t)[U, U, U]` (Eq. 38). `gate` (a traced 0 or 1, or None)
    switches the field off: the propagator over an empty interval under tracing.
    """

    w: MatrixFn
    source: Callable | None = None
    gate: Float[Array, ""] | None = None

    def __call__(self, t, state, args):
        U, v = state
        wt = self.w(t)
        dU = wt @ U
        dv = None if self.source is None else jnp.tensordot(wt, v, axes=1) + self.source(t, U)
        if self.gate is not None:
            dU = self.gate * dU
            dv = None if dv is None else self.gate * dv
        return dU, dv


class _Bias(eqx.Module):
    b: VectorFn

    def __call__(self, t, U):
        return self.b(t)


def propagate(
    w: MatrixFn,
    t_end: ScalarLike,
    t_start: ScalarLike,
    *,
    source: Callable | None = None,
    v0: PyTree = None,
    rtol: ScalarLike = 1e-10,
    atol: ScalarLike = 1e-10,
    max_steps: int = 4096,
) -> tuple[Float[Array, "d d"], PyTree]:
    """`(U, v)` at `t_end` of `PropagatorField(w, source)` from `(1, v0)` at `t_start`: one
    adaptive Tsit5 solve (diffrax), for either order of the times.

    Equal times give `(1, v0)`, the propagator over an empty interval: at once for concrete
    times, and for traced ones (under `jit` or `vmap`) by a solve over a dummy interval with
    the field switched off, whose result is exactly `(1, v0)` (the value at equal times
    carries no derivative with respect to them).

    **Arguments:**

    - `w`: `t -> (d, d)`.
    - `t_end`, `t_start`: the times, concrete or traced.
    - `source`: `(t, U) -> dv/dt` minus `w v`, or None (the Wilson line alone; `v` is None).
    - `v0`: the initial driven part (with a `source`).
    - `rtol`, `atol`, `max_steps`: of the adaptive solve.

    **Returns:** `(U, v)`; `v` is None without a `source`.
    """
    d = _dim(w, t_start)
    eye = jnp.eye(d, dtype=jax.eval_shape(w, t_start).dtype)
    if not is_traced((t_end, t_start)):
        if float(t_end) == float(t_start):
            return eye, v0
        field, t1, empty = PropagatorField(w, source), t_end, None
    else:
        t_end, t_start = jnp.asarray(t_end), jnp.asarray(t_start)
        empty = t_end == t_start
        # an empty lane solves over a dummy interval with the field off: exactly (1, v0), where
        # a solve from t to t would be refused
        field = PropagatorField(w, source, jnp.where(empty, 0.0, 1.0).astype(eye.dtype))
        t1 = jnp.where(empty, t_start + 1.0, t_end)
    controller = _controller(rtol, atol)
    (U, v), _ = solve(
        field, (eye, v0), t0=t_start, t1=t1, stepsize_controller=controller, max_steps=max_steps
    )
    if empty is None:
        return U, v
    return jnp.where(empty, eye, U), jax.tree.map(lambda a, a0: jnp.where(empty, a0, a), v, v0)


def affine_propagator(
    w: MatrixFn,
    b: VectorFn,
    t_end: ScalarLike,
    t_start: ScalarLike,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    max_steps: int = 4096,
) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
    """`(U, v)` with `x(t_end) = U x(t_start) + v` for `dx/dt = w(t) x + b(t)`, one diffrax
    solve of `U' = w U`, `v' = w v + b` from `(I, 0)` (`propagate` with the bias as source;
    `(I, 0)` for equal times, concrete or traced). U is the Wilson line, v the integrated bias
    `U int W_{t_start:t'} b(t') dt'` of Eq. 32."""
    d = _dim(w, t_start)
    zero = jnp.zeros(d, dtype=jax.eval_shape(w, t_start).dtype)
    return propagate(
        w, t_end, t_start, source=_Bias(b), v0=zero, rtol=rtol, atol=atol, max_steps=max_steps
    )


def wilson_line(
    w: MatrixFn,
    t_end: ScalarLike,
    t_start: ScalarLike,
    *,
    rtol: ScalarLike = 1e-10,
    atol: ScalarLike = 1e-10,
    max_steps: int = 4096,
) -> Float[Array, "d d"]:
    """The Wilson line `W(w)_{t_end:t_start}`: the propagator of `dx/dt = w(t) x` (diffrax),
    i.e. `affine_propagator` without a bias (`propagate` with no source).

    **Arguments:**

    - `w`: `t -> (d, d)`.
    - `t_end`, `t_start`: any order; `t_end < t_start` integrates backwards and gives the
      inverse of the forward propagator (Eq. 22's `W(-w)`).
    - `rtol`, `atol`, `max_steps`: of the adaptive Tsit5 solve.

    **Returns:** the (d, d) propagator; the identity when `t_end == t_start`, for concrete and
    for traced times alike.
    """
    return propagate(w, t_end, t_start, rtol=rtol, atol=atol, max_steps=max_steps)[0]


_GAUSS = (0.5 - np.sqrt(3) / 6, 0.5 + np.sqrt(3) / 6)


def wilson_line_magnus(
    w: MatrixFn, t_end: ScalarLike, t_start: ScalarLike, *, num_steps: int, order: int = 4
) -> Float[Array, "d d"]:
    """The Wilson line by a fixed-step Magnus integrator (a fast cross-check of `wilson_line`).

    Order 2: `Omega = h w(t + h/2)`. Order 4 (two Gauss points `c_{1,2} = 1/2 -+ sqrt(3)/6`):
    `Omega = h/2 (A1 + A2) + sqrt(3)/12 h^2 [A2, A1]`. Each step multiplies `expm(Omega)` on the
    left; global error O(h^order). Works for either order of the times (signed h).
    """
    if order not in (2, 4):
        raise ValueError(f"`order` must be 2 or 4; received {order!r}.")
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"`num_steps` must be a positive int; received {num_steps!r}.")
    _dim(w, t_start)
    # one compiled program per (structure of w, order): times and num_steps are traced
    dtype = jax.eval_shape(w, t_start).dtype
    times = jnp.asarray(t_end, dtype=dtype), jnp.asarray(t_start, dtype=dtype)
    return _magnus(w, *times, jnp.asarray(num_steps), order)


@eqx.filter_jit
def _magnus(w, t_end, t_start, num_steps, order):
    h = (t_end - t_start) / num_steps

    def step(n, U):
        t = t_start + n * h
        if order == 2:
            omega = h * w(t + 0.5 * h)
        else:
            A1, A2 = w(t + _GAUSS[0] * h), w(t + _GAUSS[1] * h)
            omega = 0.5 * h * (A1 + A2) + (np.sqrt(3) / 12) * h**2 * (A2 @ A1 - A1 @ A2)
        return jax.scipy.linalg.expm(omega) @ U

    out = jax.eval_shape(w, t_start)
    U0 = jnp.eye(out.shape[0], dtype=out.dtype)
    return jax.lax.fori_loop(0, num_steps, step, U0)


def _check_layers(t1, num_layers):
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"`num_layers` must be a positive int; received {num_layers!r}.")
    if not float(t1) > 0:
        raise ValueError(f"`t1` must be > 0; received {t1!r}.")


def discretize(
    w: MatrixFn,
    b: VectorFn,
    t1: float,
    num_layers: int,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> tuple[Float[Array, "N d d"], Float[Array, "N d"]]:
    """The integrated relation (Eq. 32): layer n of the linear network is the exact affine map
    of the linear neural ODE over `[n Delta, (n+1) Delta]`, `Delta = t1 / num_layers`.

    `w_bar_n` is the Wilson line over the layer, `b_bar_n` the integrated bias. Unlike an Euler
    step, the network's output equals the ODE's x(t1) for every N.

    **Returns:** `(weights (N, d, d), biases (N, d))` for `LinearNet`.
    """
    _check_layers(t1, num_layers)
    # one compiled program per (structure of w and b, num_layers): t1 is traced
    return _discretize(w, b, jnp.asarray(float(t1)), num_layers, rtol, atol)


@eqx.filter_jit
def _discretize(w, b, t1, num_layers, rtol, atol):
    edges = jnp.linspace(0.0, t1, num_layers + 1)
    return _layer_maps(w, b, edges[:-1], edges[1:], rtol, atol)


def discretize_many(
    w: MatrixFn,
    b: VectorFn,
    t1: float,
    layer_counts: Sequence[int],
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> list[tuple[Float[Array, "N d d"], Float[Array, "N d"]]]:
    """`discretize` for several numbers of layers at once (a convergence study in N): every
    layer of every N in one vmapped solve, so one compiled program instead of one per N.

    **Arguments:** `w`, `b`, `t1`, `rtol`, `atol` as `discretize`; `layer_counts`: positive
    ints.

    **Returns:** one `(weights (N, d, d), biases (N, d))` per entry of `layer_counts`, equal to
    `discretize(w, b, t1, N)` up to the batching of the solves.

    **Raises:** `ValueError` for an empty `layer_counts`, a count that is not a positive int,
    or `t1 <= 0`.
    """
    counts = list(layer_counts)
    if not counts:
        raise ValueError("`layer_counts` must name at least one number of layers.")
    for n in counts:
        _check_layers(t1, n)
    edges = [jnp.linspace(0.0, float(t1), n + 1) for n in counts]
    starts = jnp.concatenate([e[:-1] for e in edges])
    ends = jnp.concatenate([e[1:] for e in edges])
    Ws, bs = _layers(w, b, starts, ends, rtol, atol)
    splits = np.cumsum(counts)[:-1]
    return list(zip(jnp.split(Ws, splits), jnp.split(bs, splits), strict=True))


@eqx.filter_jit
def _layers(w, b, starts, ends, rtol, atol):
    return _layer_maps(w, b, starts, ends, rtol, atol)


def _layer_maps(w, b, starts, ends, rtol, atol):
    return jax.vmap(lambda a, z: _layer_map(w, b, z, a, rtol, atol))(starts, ends)


# jitted per layer (then batched): the solve is traced once per structure of w and b, not once
# per number of layers
@eqx.filter_jit
def _layer_map(w, b, t_end, t_start, rtol, atol):
    return affine_propagator(w, b, t_end, t_start, rtol=rtol, atol=atol)


def euler_discretize(
    w: MatrixFn, b: VectorFn, t1: float, num_layers: int
) -> tuple[Float[Array, "N d d"], Float[Array, "N d"]]:
    """The conventional (Euler) discretisation `w_bar_n = 1 + Delta w(n Delta)`,
    `b_bar_n = Delta b(n Delta)`, for comparison with `discretize`: its error decays like 1/N."""
    _check_layers(t1, num_layers)
    delta = float(t1) / num_layers
    ts = jnp.arange(float(num_layers)) * delta
    W = jax.vmap(w)(ts)
    return jnp.eye(W.shape[-1], dtype=W.dtype) + delta * W, delta * jax.vmap(b)(ts)


# ---------------------------------------------------------------------------- Theorem 3.1


def _smoothstep(tau):
    return tau * tau * (3.0 - 2.0 * tau)


class LiftedGauge(eqx.Module):
    """A continuous, C^1 gauge `(G(t), c(t))` through discrete values `(G_n, c_n)` at `n Delta`.

    On layer n: `G(t) = G_n expm(sigma R_n) expm(sigma P_n)` and
    `c(t) = (1 - sigma) c_n + sigma c_{n+1}`, where `G_n^-1 G_{n+1} = exp(R_n) exp(P_n)` is the
    polar decomposition (rotation times SPD; logarithms on the host with scipy) and
    `sigma = 3 tau^2 - 2 tau^3` of the layer-local time tau, so dG/dt and dc/dt vanish at nodes.
    """

    Gs: Float[Array, "N1 d d"]
    cs: Float[Array, "N1 d"]
    log_rotation: Float[Array, "N d d"]
    log_spd: Float[Array, "N d d"]
    t1: float

    def _locate(self, t):
        num = self.log_rotation.shape[0]
        x = t * num / self.t1
        n = jnp.clip(jnp.floor(x), 0, num - 1)
        return n.astype(int), _smoothstep(x - n)

    def G(self, t: ScalarLike) -> Float[Array, "d d"]:
        n, s = self._locate(t)
        expm = jax.scipy.linalg.expm
        return self.Gs[n] @ expm(s * self.log_rotation[n]) @ expm(s * self.log_spd[n])

    def c(self, t: ScalarLike) -> Float[Array, " d"]:
        n, s = self._locate(t)
        return (1.0 - s) * self.cs[n] + s * self.cs[n + 1]


def check_discrete_gauge(Gs, cs, *, atol: float = 1e-12, free_output_end=False):
    """Validate `Gs` (N+1, d, d) and `cs` (N+1, d): `G_0 = G_N = 1`, `c_0 = c_N = 0`, every
    `G_n` invertible (condition number <= 1e12) and every value finite.

    `free_output_end` (a bool, or a boolean array that may be traced) exempts the output end
    `(G_N, c_N)` from its boundary condition: the symmetry-breaking control of
    `DiscreteLinearGauge` moves it on purpose.

    **Returns:** `(Gs, cs)` as arrays; use them: under `jit` the value checks are
    `eqx.error_if` runtime errors attached to them.

    **Raises:** `ValueError` for wrong shapes, and (concrete values) for wrong end values, a
    singular or non-finite `G_n`.
    """
    Gs, cs = jnp.asarray(Gs), jnp.asarray(cs)
    if Gs.ndim != 3 or Gs.shape[1] != Gs.shape[2]:
        raise ValueError(f"`Gs` must have shape (N+1, d, d); received {Gs.shape}.")
    if cs.shape != Gs.shape[:2]:
        raise ValueError(f"`cs` must have shape {Gs.shape[:2]}; received {cs.shape}.")
    if Gs.shape[0] < 2:
        raise ValueError(f"`Gs` needs N+1 >= 2 entries; received {Gs.shape[0]}.")
    # concrete values are checked on the host now, even inside a trace; traced ones at run time
    with jax.ensure_compile_time_eval():
        eye = jnp.eye(Gs.shape[1], dtype=Gs.dtype)
        ends = jnp.stack([Gs[0], Gs[-1]])
        held = jnp.stack([jnp.asarray(True), ~jnp.asarray(free_output_end, dtype=bool)])
        bad_G = held & ~jnp.all(jnp.abs(ends - eye) <= atol, axis=(1, 2))
        bad_c = held & ~jnp.all(jnp.abs(jnp.stack([cs[0], cs[-1]])) <= atol, axis=1)
        finite = jnp.all(jnp.isfinite(Gs), axis=(1, 2)) & jnp.all(jnp.isfinite(cs), axis=1)
        svals = jnp.linalg.svd(jnp.where(finite[:, None, None], Gs, eye), compute_uv=False)
        conds = svals[:, 0] / svals[:, -1]
        singular = ~finite | ~(conds <= 1e12)

    def which(bad, name):
        return lambda: f"`{name}[{0 if bool(bad[0]) else Gs.shape[0] - 1}]` is not."

    def worst():
        n = int(jnp.argmax(singular))
        return f"`Gs[{n}]` (or `cs[{n}]`) has condition number {float(conds[n]):.2e}."

    message = "`Gs[0]` and `Gs[-1]` must be the identity (boundary condition of Eq. 33)."
    Gs = check_value(Gs, bad_G, message, received=which(bad_G, "Gs"))
    message = "every `Gs[n]` must be finite and not singular, every `cs[n]` finite."
    Gs = check_value(Gs, singular, message, received=worst)
    message = "`cs[0]` and `cs[-1]` must be zero (boundary condition of Eq. 33)."
    cs = check_value(cs, bad_c, message, received=which(bad_c, "cs"))
    return Gs, cs


def lift(Gs, cs, t1: float) -> LiftedGauge:
    """Theorem 3.1: a continuous, differentiable gauge `(G(t), c(t))` of the linear neural ODE
    with `G(n Delta) = G_n`, `c(n Delta) = c_n`, `Delta = t1 / N`, so that
    `discretize(linear_gauge_transform(w, b, G, c))` equals
    `discrete_gauge_transform(discretize(w, b), Gs, cs)`.

    **Arguments:** `Gs` (N+1, d, d) with `G_0 = G_N = 1`; `cs` (N+1, d) with zero ends; `t1`.

    **Returns:** a `LiftedGauge` with methods `G(t)` and `c(t)`.

    **Raises:** `ValueError` for wrong shapes or end values, a singular `G_n`, or
    `det G_n <= 0`: a continuous G(t) with G(0) = 1 stays in GL+(d), so such a discrete gauge
    has no continuous lift.
    """
    Gs, cs = check_discrete_gauge(Gs, cs)
    if not (isinstance(t1, (int, float)) and math.isfinite(t1) and t1 > 0):
        raise ValueError(f"`t1` must be > 0; received {t1!r}.")
    G = np.asarray(Gs, dtype=float)
    dets = np.linalg.det(G)
    bad = np.flatnonzero(dets <= 0)
    if bad.size:
        n = int(bad[0])
        raise ValueError(
            f"`Gs[{n}]` has det {dets[n]:.3g} <= 0: a continuous G(t) with G(0) = 1 keeps "
            "det G(t) > 0, so this discrete gauge has no continuous lift (Thm 3.1 needs GL+)."
        )
    log_r, log_p = [], []
    for n in range(G.shape[0] - 1):
        step = np.linalg.solve(G[n], G[n + 1])
        rot, spd = scipy.linalg.polar(step)  # step = rot @ spd, det rot = +1 here
        lam, V = np.linalg.eigh(spd)
        log_p.append((V * np.log(lam)) @ V.T)
        lr = scipy.linalg.logm(rot)
        if np.max(np.abs(np.imag(lr))) > 1e-8:
            raise ValueError(
                f"the rotation part of Gs[{n}]^-1 Gs[{n + 1}] has eigenvalue -1 (a rotation by "
                "pi): its real logarithm is not unique; perturb the gauge slightly."
            )
        lr = np.real(lr)
        log_r.append(0.5 * (lr - lr.T))  # the logarithm of a rotation is skew
    dtype = jnp.asarray(Gs).dtype
    return LiftedGauge(
        jnp.asarray(Gs),
        jnp.asarray(cs),
        jnp.asarray(np.stack(log_r), dtype=dtype),
        jnp.asarray(np.stack(log_p), dtype=dtype),
        float(t1),
    )
