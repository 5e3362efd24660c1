"""Small numerical helpers every floor uses: Gauss-Legendre quadrature on an interval, and the
log-log slope of a convergence study (the order at which an error or a deviation vanishes)."""

from collections.abc import Callable, Sequence

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
