"""Numerical symmetry discovery: the null space of the Jacobian of outputs with respect to
parameters, for any JAX function of a parameter PyTree, and its comparison with the known
gauge families' generators.

A continuous symmetry moves parameters along directions that leave every output unchanged
to first order: the null space of `J = d fn(params, inputs) / d params` at the point (Henry,
Marchetti and Kohn, ICLR 2025, count parameter redundancy this way). Its dimension depends on
the inputs (few inputs leave more directions unconstrained: Grigsby, Lindsey and Rolnick 2023
call the batch-dependent excess "hidden symmetries"), so use at least as many outputs as
parameters you expect to be constrained.

The dimension is read from the singular values of `J`, descending, relative to the largest:
values at or below `null_tol` count as zero; the `gap` is the ratio of the smallest value
above `null_tol` to the largest at or below it (floored at the dtype's epsilon). A gap below
`min_gap` means the spectrum has no clear split: the dimension is then None (inconclusive),
never a guessed count. Defaults for float64: `null_tol = 1e-9` (symmetric directions measure
1e-16 to 1e-14 relative on the census models), `min_gap = 1e4`.

Two methods:

- `"dense"`: the whole Jacobian (`jax.jacfwd` or `jax.jacrev`, whichever needs fewer passes)
  and its SVD; refused above `max_dense_bytes` with the matrix-free suggestion.
- `"randomized"`: matrix-free, a randomized range finder (Halko, Martinsson and Tropp 2011):
  `J Omega` by `k` jvps, an orthonormal `Q`, `Q^T J` by `k` vjps, its SVD; `k` doubles until
  the spectrum reaches `null_tol` (then the rank is below `k` and exact up to rounding) or `k`
  reaches `min(m, n)`. It returns the row-space basis (the null space is its complement,
  usually far larger); `num_matvecs` counts the jvps and vjps.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..gauges.base import AbstractGauge


METHODS = ("auto", "dense", "randomized")


@dataclasses.dataclass(frozen=True)
class SymmetryDimension:
    """The numerically discovered symmetry of `fn` at `params` (see the module docstring).

    - `dimension`: the null-space dimension, or None when the spectrum has no clear gap.
    - `singular_values`: descending (numpy). Dense: all `num_params` of them (the
      `num_params - num_outputs` structural zeros of a wide Jacobian included); randomized:
      the `k` computed ones.
    - `gap`: the ratio the dimension was read at; `null_tol`, `min_gap`: the thresholds.
    - `basis`: `(num_params, dimension)` orthonormal null-space basis in flattened parameter
      coordinates (dense only; None otherwise); `row_basis`: `(num_params, rank)` orthonormal
      basis of the complement (both methods, when the dimension is known).
    - `unravel`: flattened coordinates -> a PyTree shaped like `params` (`basis_tree(i)`).
    - `method`, `num_params`, `num_outputs`, `num_matvecs` (jvps + vjps; dense: the passes of
      `jacfwd`/`jacrev`), `verdict` ("clear" / "inconclusive") and `reason`.
    """

    dimension: int | None
    singular_values: np.ndarray
    gap: float
    null_tol: float
    min_gap: float
    basis: np.ndarray | None
    row_basis: np.ndarray | None
    unravel: Callable
    method: str
    num_params: int
    num_outputs: int
    num_matvecs: int
    verdict: str
    reason: str

    def basis_tree(self, i: int) -> PyTree:
        """Null-space direction `i` as a PyTree shaped like `params` (dense method only)."""
        if self.basis is None:
            raise ValueError("`basis_tree`: no null-space basis (randomized method or no gap).")
        return self.unravel(jnp.asarray(self.basis[:, i]))


def _read_spectrum(s: np.ndarray, n: int, eps: float, null_tol: float, min_gap: float):
    """(dimension or None, gap, reason) from descending singular values `s` (length n, or
    fewer when the trailing ones were not computed: then they are known to be below s[-1])."""
    top = float(s[0]) if s.size else 0.0
    if top == 0.0:
        return n, float("inf"), "the Jacobian is zero: every direction is a symmetry"
    q = s / top
    null = int(np.sum(q <= null_tol))
    rank = s.size - null
    above = float(q[rank - 1]) if rank else float("inf")
    below = max(float(q[rank]) if null else 0.0, eps)
    gap = above / below
    dim = n - rank
    if gap < min_gap:
        return (
            None,
            gap,
            f"no clear gap: the smallest value above null_tol = {null_tol:.0e} is {above:.2e}, "
            f"the largest below {below:.2e} (ratio {gap:.2e} < min_gap = {min_gap:.0e})",
        )
    return (
        dim,
        gap,
        f"{rank} singular values above {above:.2e}, {dim} directions at or below "
        f"{below:.2e} (relative; gap {gap:.2e})",
    )


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        raise ValueError(
            f"{what} has {int(np.sum(~np.isfinite(a)))} non-finite entries: `fn` is not "
            "differentiable at `params` for these `inputs` (e.g. a norm or pooling of an "
            "all-zero window); move the point or the inputs."
        )


def _orthonormal_columns(a: np.ndarray, rtol: float) -> np.ndarray:
    """An orthonormal basis of the span of `a`'s columns (numerical rank at `rtol`)."""
    if a.size == 0:
        return np.zeros((a.shape[0], 0))
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    r = int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0
    return u[:, :r]


def module_function(model: Any) -> tuple[Callable[[PyTree, Any], PyTree], PyTree]:
    """An equinox Module as the `(fn, params)` that `symmetry_dimension` reads: `params` its
    inexact arrays (the coordinates), `fn(params, xs)` the model applied to each example of
    the batch `xs` (vmapped over the leading axis), every other leaf held fixed.

    **Raises:** `ValueError` when `model` is not an equinox Module or has no inexact array.
    """
    if not isinstance(model, eqx.Module):
        raise ValueError(f"`model` must be an equinox Module; received {type(model).__name__}.")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if not jax.tree.leaves(params):
        raise ValueError(f"`model` ({type(model).__name__}) has no inexact array to vary.")

    def fn(p, xs):
        return jax.vmap(eqx.combine(p, static))(xs)

    return fn, params


def symmetry_dimension(
    fn: Callable[[PyTree, Any], PyTree],
    params: PyTree,
    inputs: Any,
    *,
    method: str = "auto",
    null_tol: float | None = None,
    min_gap: float = 1e4,
    max_dense_bytes: int = 2**30,
    key: PRNGKeyArray | None = None,
    initial_rank: int = 64,
) -> SymmetryDimension:
    """The null space of `d fn(params, inputs) / d params` at `params`: its dimension, the
    spectrum it is read from, and a basis (module docstring).

    **Arguments:**

    - `fn`: any JAX function `(params, inputs) -> outputs` (a PyTree of arrays), e.g. a user's
      own attention in `jnp`, or `lambda p, x: eqx.combine(p, static)(x)` for a Module.
    - `params`: the parameter PyTree (its inexact arrays are the coordinates; other leaves are
      held fixed); `inputs`: passed to `fn` unchanged.
    - `method`: `"dense"`, `"randomized"` (matrix-free), or `"auto"` (dense when the Jacobian
      fits in `max_dense_bytes`).
    - `null_tol`: relative singular value at or below which a direction counts as symmetric
      (default `1e-9` in float64, `1e-4` in float32); `min_gap`: the gap that makes the count
      clear.
    - `key`: for the randomized method's test vectors (default `jax.random.key(0)`);
      `initial_rank`: its first `k`.

    **Returns:** a `SymmetryDimension`.

    **Raises:** `ValueError` for an unknown `method`, params without inexact arrays, bad
    thresholds, a Jacobian with non-finite entries, or (`method="dense"`) a Jacobian above
    `max_dense_bytes` (its estimated size, and the `method="randomized"` suggestion).
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; received {method!r}.")
    if not (isinstance(min_gap, int | float) and min_gap > 1):
        raise ValueError(f"`min_gap` must be a number > 1; received {min_gap!r}.")
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    flat, unravel_arrays = ravel_pytree(arrays)
    if flat.size == 0:
        raise ValueError("`params` must hold at least one floating-point array; received none.")
    dtype = flat.dtype
    eps = float(jnp.finfo(dtype).eps)
    if null_tol is None:
        null_tol = 1e-9 if dtype == jnp.float64 else 1e-4
    if not 0 < null_tol < 1:
        raise ValueError(f"`null_tol` must be in (0, 1); received {null_tol!r}.")

    def unravel(v):
        return eqx.combine(unravel_arrays(v), static)

    def f(v):
        return ravel_pytree(fn(unravel(v), inputs))[0]

    out = jax.eval_shape(f, flat)
    n, m = flat.size, out.size
    size = m * n * jnp.dtype(dtype).itemsize
    if method == "auto":
        method = "dense" if size <= max_dense_bytes else "randomized"
    if method == "dense" and size > max_dense_bytes:
        raise ValueError(
            f"`method='dense'`: the Jacobian is {m} outputs x {n} parameters = {size / 2**20:.0f} "
            f"MiB, above max_dense_bytes = {max_dense_bytes / 2**20:.0f} MiB; use "
            "method='randomized' (matrix-free) or raise max_dense_bytes."
        )
    if method == "dense":
        forward = n <= m
        jac = jax.jit(jax.jacfwd(f) if forward else jax.jacrev(f))(flat)
        jac = np.asarray(jac).reshape(m, n)
        _check_finite(jac, "the Jacobian")
        # all n rows of V^T; the m x m U of a tall Jacobian is never used (full_matrices=True
        # computed it: 3-5 s of CPU for 6000 x 122, against 0.04 s without it)
        _, s, vt = np.linalg.svd(jac, full_matrices=m < n)
        s = np.concatenate([s, np.zeros(n - s.size)])  # a wide Jacobian's structural zeros
        dim, gap, reason = _read_spectrum(s, n, eps, null_tol, min_gap)
        basis = row = None
        if dim is not None:
            basis, row = vt[n - dim :].T, vt[: n - dim].T
        return SymmetryDimension(
            dim, s, gap, null_tol, min_gap, basis, row, unravel, "dense", n, m,
            n if forward else m, "clear" if dim is not None else "inconclusive", reason,
        )  # fmt: skip

    key = jax.random.key(0) if key is None else key
    jvps = jax.jit(jax.vmap(lambda t: jax.jvp(f, (flat,), (t,))[1], in_axes=1, out_axes=1))
    _, pullback = jax.vjp(f, flat)
    vjps = jax.jit(jax.vmap(lambda c: pullback(c)[0]))
    k, matvecs, full = min(initial_rank, m, n), 0, min(m, n)
    while True:
        omega = jax.random.normal(jax.random.fold_in(key, k), (n, k), dtype)
        q, _ = np.linalg.qr(np.asarray(jvps(omega)))  # (m, k): the range of J
        b = np.asarray(vjps(jnp.asarray(q.T)))  # (k, n) = Q^T J
        _check_finite(b, "Q^T J (the range finder's projection)")
        matvecs += 2 * k
        _, s, vt = np.linalg.svd(b, full_matrices=False)
        if (s.size and s[-1] <= null_tol * s[0]) or k >= full:
            break
        k = min(2 * k, full)
    dim, gap, reason = _read_spectrum(s, n, eps, null_tol, min_gap)
    row = None if dim is None else vt[: n - dim].T
    return SymmetryDimension(
        dim, s, gap, null_tol, min_gap, None, row, unravel, "randomized", n, m, matvecs,
        "clear" if dim is not None else "inconclusive", reason,
    )  # fmt: skip


def gauge_generators(
    gauge: AbstractGauge, model: Any, free: PyTree | None = None
) -> Float[Array, "n k"]:
    """The generators of a parameter gauge family at `model`: the tangents along every
    coordinate direction of its Lie algebra (`identity()`'s entries), as columns in the
    flattened coordinates `symmetry_dimension` uses for `eqx.filter(model,
    eqx.is_inexact_array)`.

    **Arguments:**

    - `gauge`: an `AbstractGauge` acting on the parameters of `model`.
    - `free`: optional boolean PyTree shaped like `identity()`: only its True entries are
      directions of the group (e.g. `DiscreteLinearGauge` holds its fixed ends `G_0 = G_N =
      1` in the element; moving them is no symmetry).

    **Returns:** an `(num_params, k)` array (`k` = the floating entries of `identity()`, or
    the True ones of `free` among them: integer entries, a finite factor such as
    `DecoderGauge(permutations=True)`'s permutations, have no directions; columns may be
    dependent or zero: `compare_symmetries` takes their span).

    **Raises:** as `gauge.check_model`; `ValueError` for a `free` of another shape.
    """
    gauge.check_model(model)
    # an element's integer leaves (a finite factor, e.g. a permutation) have no directions
    identity = gauge.identity()
    spec = jax.tree.map(eqx.is_inexact_array, identity)
    inexact, finite = eqx.partition(identity, spec)
    base, unravel_inexact = ravel_pytree(inexact)

    def unravel(e):
        return eqx.combine(unravel_inexact(e), finite)

    directions = np.eye(base.size)
    if free is not None:
        # entry by entry in leaf order (as `ravel_pytree`), whatever containers `free` uses;
        # the integer entries' flags dropped with them
        leaves = jax.tree.leaves(identity)
        kept = np.concatenate(
            [np.full(np.size(x), eqx.is_inexact_array(x)) for x in leaves] or [np.zeros(0, bool)]
        )
        flags = [np.ravel(np.asarray(x, dtype=bool)) for x in jax.tree.leaves(free)]
        mask = np.concatenate(flags or [np.zeros(0, bool)])
        if mask.shape != kept.shape:
            raise ValueError(
                f"`free` must have the shape of `identity()` ({kept.size} entries); received "
                f"{mask.size} entries."
            )
        directions = directions[mask[kept]]

    def column(e):
        return ravel_pytree(gauge.tangent(model, unravel(e)))[0]

    return jax.jit(jax.vmap(column, out_axes=1))(jnp.asarray(directions, dtype=base.dtype))


@dataclasses.dataclass(frozen=True)
class SymmetryComparison:
    """The discovered null space against the span of known generators.

    - `known_rank`: dimension of the generators' span; `discovered`: the null-space dimension.
    - `angles`: principal angles (radians, ascending) between the generators' span and the
      null space, one per known direction (from their sines, accurate for small angles):
      `max_angle` near 0 means every known generator is a symmetry found numerically.
    - `explained`: known directions inside the null space (angle <= `angle_tol`);
      `unexplained`: null directions no known generator accounts for (candidate new
      symmetries), with an orthonormal basis `unexplained_basis` (dense results only).
    """

    known_rank: int
    discovered: int
    angles: np.ndarray
    max_angle: float
    angle_tol: float
    explained: int
    unexplained: int
    unexplained_basis: np.ndarray | None


def compare_symmetries(
    result: SymmetryDimension,
    generators: Float[Array, "n k"] | Float[np.ndarray, "n k"] | Sequence[Any],
    *,
    angle_tol: float = 1e-6,
    rank_tol: float = 1e-10,
) -> SymmetryComparison:
    """Principal angles between `result`'s null space and the span of `generators` (e.g. from
    `gauge_generators` of every known family at the same point, concatenated).

    **Arguments:**

    - `result`: a `SymmetryDimension` with a clear dimension.
    - `generators`: an `(num_params, k)` array, or a sequence of them (joined column-wise).
    - `angle_tol`: angle (radians) below which a known direction counts as found;
      `rank_tol`: relative singular value below which generators are dependent.

    **Returns:** a `SymmetryComparison`.

    **Raises:** `ValueError` for an inconclusive `result` or generators of the wrong length.
    """
    if result.dimension is None or result.row_basis is None:
        raise ValueError(f"`result` has no clear dimension ({result.reason}): nothing to compare.")
    if not isinstance(generators, jax.Array | np.ndarray):
        generators = np.concatenate([np.asarray(g) for g in generators], axis=1)
    gen = np.asarray(generators, dtype=np.float64)
    if gen.ndim != 2 or gen.shape[0] != result.num_params:
        raise ValueError(
            f"`generators` must be ({result.num_params}, k) (one column per generator in the "
            f"flattened parameters); received shape {gen.shape}."
        )
    known = _orthonormal_columns(gen, rank_tol)
    # the sines of the principal angles: the known directions' components outside the null
    # space, i.e. in the row space (accurate where arccos of the cosines would lose digits)
    sines = np.linalg.svd(result.row_basis.T @ known, compute_uv=False) if known.size else []
    sines = np.clip(np.sort(np.asarray(sines))[::-1], 0.0, 1.0)
    angles = np.sort(np.arcsin(np.concatenate([sines, np.zeros(known.shape[1] - len(sines))])))
    explained = int(np.sum(angles <= angle_tol))
    unexplained = result.dimension - explained
    extra = None
    if result.basis is not None:
        # null directions orthogonal to the explained known span
        inside = known @ (known.T @ result.basis) if known.size else np.zeros_like(result.basis)
        extra = _orthonormal_columns(result.basis - inside, 1e-6)
    return SymmetryComparison(
        known_rank=known.shape[1],
        discovered=result.dimension,
        angles=angles,
        max_angle=float(angles.max()) if angles.size else 0.0,
        angle_tol=angle_tol,
        explained=explained,
        unexplained=max(unexplained, 0),
        unexplained_basis=extra,
    )
