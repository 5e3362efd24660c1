"""Small numerical helpers every floor uses: Gauss-Legendre quadrature on an interval, the
log-log slope of a convergence study (the order at which an error or a deviation vanishes), and
the matrix exponential of the gauge families (`expm`)."""

import functools
from collections.abc import Callable, Sequence

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree


def gauss_legendre(
    t0: float, t1: float, num_nodes: int, *, dtype=None
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """The `num_nodes`-point Gauss-Legendre rule on `[t0, t1]`: nodes and weights with
    `sum_i w_i f(t_i) = int_t0^t1 f(t) dt` exactly for polynomials f of degree at most
    `2 num_nodes - 1` (numpy's `leggauss` on [-1, 1], mapped affinely; computed on the host in
    float64, then cast).

    **Arguments:**

    - `t0`, `t1`: the interval, concrete numbers (`t1 < t0` gives negative weights, the
      oriented integral).
    - `num_nodes`: a positive int.
    - `dtype`: of the returned arrays (default JAX's default float dtype).

    **Returns:** `(nodes, weights)`, each of shape `(num_nodes,)`.

    **Raises:** `ValueError` for a `num_nodes` that is not a positive int or a non-finite end.
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int | np.integer) or num_nodes < 1:
        raise ValueError(f"`num_nodes` must be a positive int; received {num_nodes!r}.")
    t0, t1 = float(t0), float(t1)
    if not (np.isfinite(t0) and np.isfinite(t1)):
        raise ValueError(f"the interval must be finite; received [{t0}, {t1}].")
    nodes, weights = np.polynomial.legendre.leggauss(int(num_nodes))
    span = t1 - t0
    return (
        jnp.asarray(t0 + 0.5 * span * (nodes + 1.0), dtype=dtype),
        jnp.asarray(0.5 * span * weights, dtype=dtype),
    )


def quadrature(
    integrand: Callable[[Float[Array, ""]], PyTree],
    t0: float,
    t1: float,
    num_nodes: int,
    *,
    dtype=None,
) -> PyTree:
    """`int_t0^t1 integrand(t) dt` by `num_nodes`-point Gauss-Legendre quadrature
    (`gauss_legendre`): the integrand is evaluated once at all nodes under `vmap`. Exact for
    polynomial integrands of degree at most `2 num_nodes - 1`, and spectrally accurate for
    smooth ones.

    **Arguments:**

    - `integrand`: `t -> ` an array or PyTree of arrays (integrated leaf by leaf).
    - `t0`, `t1`, `num_nodes`, `dtype`: as `gauss_legendre`.

    **Returns:** the integral, with the structure and shapes of `integrand(t)`.

    **Raises:** as `gauss_legendre`.
    """
    ts, ws = gauss_legendre(t0, t1, num_nodes, dtype=dtype)
    return jax.tree.map(lambda v: jnp.tensordot(ws, v, axes=1), jax.vmap(integrand)(ts))


def loglog_slope(xs: Sequence | ArrayLike, ys: Sequence | ArrayLike) -> float:
    """The least-squares slope of `log ys` against `log xs`: the order p of `y ~ C x^p`, e.g.
    2 for a deviation that vanishes quadratically in a scale, -4 for the error of a
    fourth-order method against its number of steps.

    **Arguments:** `xs`, `ys`: sequences of at least two positive, finite numbers of one length.

    **Returns:** the fitted exponent p (a Python float).

    **Raises:** `ValueError` for sequences of different lengths, fewer than two points, or a
    value that is not positive and finite (its logarithm would be undefined).
    """
    x = np.asarray(xs, dtype=float).ravel()
    y = np.asarray(ys, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"`xs` and `ys` must have one length; received {x.size} and {y.size}.")
    if x.size < 2 or np.unique(x).size < 2:
        raise ValueError(f"a slope needs at least two distinct `xs`; received {x.tolist()}.")
    for name, v in (("xs", x), ("ys", y)):
        if not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"`{name}` must be positive and finite; received {v.tolist()}.")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# Taylor degree 12 on |X|_1 <= 1/4: the remainder is below 0.25^13 / 13! ~ 2e-19 relative, so
# the result is rounding-limited (~1e-15 relative for a few squarings, growing with them)
_EXPM_THETA = 0.25
_EXPM_COEFFICIENTS = tuple(1.0 / float(np.prod(np.arange(1, k + 1))) for k in range(13))
# squarings beyond 16 (|S|_1 > 0.25 * 2^16 = 16384) overflow float64 anyway: NaN instead
_EXPM_MAX_SQUARINGS = 16


def _taylor_blocks(X, X2, X3, sign):
    """The degree-12 Taylor polynomial of `exp(sign X)` as Paterson-Stockmeyer blocks in X^4:
    `B0 + X4 (B1 + X4 B2)`, each `B_i` of degree 3 in X (odd powers take `sign`)."""
    eye = jnp.eye(X.shape[-1], dtype=X.dtype)
    c = _EXPM_COEFFICIENTS

    def block(i):
        return c[i] * eye + sign * c[i + 1] * X + c[i + 2] * X2 + sign * c[i + 3] * X3

    return block(0), block(4), block(8)


# one compiled program per shape, also when called eagerly (op by op, its bounded loop's
# closure would be traced and compiled again on every call: measured 57 compilations of the
# same loop in one test file)
@functools.partial(jax.jit, static_argnames="inverse")
def expm(
    S: Float[Array, "d d"], *, inverse: bool = False
) -> Float[Array, "d d"] | tuple[Float[Array, "d d"], Float[Array, "d d"]]:
    """`expm(S)` by scaling and squaring with a degree-12 Taylor polynomial, its squaring count
    adapted to the norm of S: `s = ceil(log2(|S|_1 / 0.25))` squarings (0 for |S|_1 <= 1/4),
    so a gauge element of norm 1 costs 2, not a fixed 12.

    The polynomial takes 5 matrix products (Paterson-Stockmeyer: X^2, X^3, X^4, then two in
    X^4); no linear solve and no data-dependent branch. The squarings run in a bounded loop
    (`equinox.internal.while_loop(kind="bounded")`) whose continue test is taken over the
    whole batch: under `vmap` the batch runs its largest count (the others keep their value),
    and the loop is differentiable in forward and reverse mode. Agrees with
    `jax.scipy.linalg.expm` to ~1e-15 relative for |S|_1 <= 1, ~2e-14 at |S|_1 ~ 250 and
    ~5e-13 at ~900 (the squarings amplify rounding); `jax.scipy.linalg.expm` itself is
    avoided inside solver loops: vmapped over 512 or more 16 x 16 matrices there, its branches
    and LU solve hung jaxlib 0.10.2's CPU runtime.

    **Arguments:**

    - `S`: a square matrix.
    - `inverse`: also return `expm(-S)`, from the same powers of S (2 more products for the
      polynomial, one more per squaring: cheaper than an LU solve with the result).

    **Returns:** `expm(S)`, or `(expm(S), expm(-S))` with `inverse`; NaN where S is not finite
    or |S|_1 > 0.25 * 2^16 (where float64 overflows anyway).
    """
    norm = jnp.max(jnp.sum(jnp.abs(S), axis=-2))
    finite = jnp.isfinite(norm) & (norm <= _EXPM_THETA * 2.0**_EXPM_MAX_SQUARINGS)
    tiny = jnp.finfo(S.dtype).tiny
    squarings = jnp.ceil(jnp.log2(jnp.maximum(norm, tiny) / _EXPM_THETA))
    squarings = jnp.where(finite, jnp.clip(squarings, 0, _EXPM_MAX_SQUARINGS), 0).astype(int)
    X = S * jnp.exp2(-squarings.astype(S.dtype))
    X2 = X @ X
    X3 = X2 @ X
    X4 = X2 @ X2
    signs = (1.0, -1.0) if inverse else (1.0,)
    results = []
    for sign in signs:
        B0, B1, B2 = _taylor_blocks(X, X2, X3, sign)
        results.append(B0 + X4 @ (B1 + X4 @ (B2 + _EXPM_COEFFICIENTS[12] * X4)))

    def body(carry):
        i, Es = carry
        return i + 1, tuple(E @ E for E in Es)

    _, results = eqxi.while_loop(
        lambda carry: carry[0] < squarings,
        body,
        (jnp.zeros((), dtype=int), tuple(results)),
        max_steps=_EXPM_MAX_SQUARINGS,
        kind="bounded",
    )
    results = tuple(jnp.where(finite, E, jnp.nan) for E in results)
    return results if inverse else results[0]
