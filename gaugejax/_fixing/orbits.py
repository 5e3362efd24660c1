"""Orbit geometry: tangents of gauge orbits in parameter space, gradient orthogonality,
conserved quantities of gradient flow, gauge-invariant fingerprints, and the metrics of gauge
fixing (spread across seeds, distance to the canonical gauge)."""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Float, Key, PRNGKeyArray, PyTree, Shaped

from .._core.correspondence import affine_propagator
from .._core.numerics import quadrature
from .._core.solve import DeformationSensitivityField, MovedField, SensitivityField, SolveStats
from ..gauges.base import AbstractGauge
from ..gauges.rescaling import (  # re-exported: its one home is the rescaling module
    rescaling_conserved_quantity as rescaling_conserved_quantity,
)
from ..models import AbstractNeuralODE
from ..models.linear import (
    AbstractLinearField,
    BasisLinearField,
    LinearNODE,
    PiecewiseLinearBasis,
)
from ..models.linearize import check_affine, describe_field, linear_field, not_affine
from ..models.solved import observe_tangent
from .canonical import canonicalize
from .gauge_fixing import canonical_gauge


def _flat_params(tree) -> Float[Array, " p"]:
    return ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0]


def orbit_tangent(gauge: AbstractGauge, model: Any, key: PRNGKeyArray) -> Float[Array, " p"]:
    """A random tangent vector of the gauge orbit through `model`, flattened over the model's
    inexact arrays: `gauge.tangent(model, v)` with `v = sample(key) - identity()` (a valid
    direction at the identity for the families here, whose constraints are linear or open)."""
    direction = jax.tree.map(jnp.subtract, gauge.sample(key), gauge.identity())
    tangent = gauge.tangent(model, direction)
    params = eqx.filter(model, eqx.is_inexact_array)
    # filter_jvp gives None for outputs untouched by the gauge (a symbolic zero): zeros here
    tangent = jax.tree.map(
        lambda p, t: p if p is None else (jnp.zeros_like(p) if t is None else t),
        params,
        eqx.filter(tangent, eqx.is_inexact_array),
        is_leaf=lambda x: x is None,
    )
    return _flat_params(tangent)


def gradient_orbit_cosines(
    loss_fn, model: Any, gauge: AbstractGauge, keys: Key[Array, " k"]
) -> Float[Array, " k"]:
    """Cosines between `grad loss_fn(model)` and orbit tangents (one per key). For a loss that is
    invariant on the orbit they vanish (Kunin et al. 2020): the gradient is orthogonal to the
    gauge orbit, so training without a gauge-breaking term never moves along it."""
    grad = _flat_params(eqx.filter_grad(loss_fn)(model))
    tangents = jax.vmap(lambda k: orbit_tangent(gauge, model, k))(keys)
    return tangents @ grad / (jnp.linalg.norm(tangents, axis=1) * jnp.linalg.norm(grad))


class _Acted(eqx.Module):
    """`a -> gauge.act(a, model)`: the gauge orbit through `model` as a path of models (a
    Module, so equal structures share one compiled solve)."""

    gauge: Any
    model: Any

    def __call__(self, a):
        return self.gauge.act(a, self.model)


def gauge_sensitivity(
    model: Any, gauge: AbstractGauge, direction: PyTree
) -> SensitivityField | DeformationSensitivityField:
    """The forward sensitivity field of a neural ODE along a gauge direction at the identity,
    on states `(y, dy)`: `DeformationSensitivityField(model.field, eps)` for a family with a
    first-order generator eps (`gauge.first_order_generator(direction)`: two jvps per
    evaluation), else `SensitivityField(MovedField(a -> gauge.act(a, model)),
    gauge.identity(), direction)`. Solved from `(x0, 0)` it gives `gauge_response`; as a
    field it serves cost analyses and solves of one's own.

    **Arguments:**

    - `model`: a neural ODE, e.g. `gj.NeuralODE`.
    - `gauge`: a family acting on it, e.g. `gj.LieDeformationGauge`.
    - `direction`: a tangent at the identity, shaped like an element (e.g. `gauge.sample(key)`
      for a family whose identity is zero).

    **Returns:** a `gj.DeformationSensitivityField` or a `gj.SensitivityField`, both called
    as `(t, (y, dy), args) -> (dy/dt, d(dy)/dt)`.
    """
    generator = gauge.first_order_generator(direction)
    if generator is not None:
        return DeformationSensitivityField(model.field, generator)
    return SensitivityField(MovedField(_Acted(gauge, model)), gauge.identity(), direction)


def gauge_response(
    model: Any, gauge: AbstractGauge, direction: PyTree, inputs: PyTree
) -> tuple[PyTree, SolveStats | None]:
    """The first-order change of the model's outputs when the gauge moves it along `direction`
    from the identity: `d/ds model_s(x)` at s = 0 for `model_s = gauge.act(identity + s
    direction, model)`, for a batch of inputs. It is what a first-order sweep measures per
    sample, asked of the model itself (`observe_tangent`): for a neural ODE the forward
    sensitivity system of `gauge_sensitivity`, solved under the model's own error control (a
    jvp through an adaptive solve would choose its steps for the outputs alone); for other
    models a jvp. Zero (to solver tolerance) exactly when the direction is a symmetry to first
    order.

    **Arguments:** `model`, `gauge`, `direction` as `gauge_sensitivity`; `inputs`: a batch of
    inputs (leading axis).

    **Returns:** `(d_outputs, stats)`: the response, shaped like the outputs, and the
    `SolveStats` of the solves (None for a model without solves).
    """
    generator = gauge.first_order_generator(direction)
    return observe_tangent(
        model, _Acted(gauge, model), gauge.identity(), direction, inputs, generator
    )


@eqx.filter_jit
def _ray(model, gauge, element, inputs, scales):
    identity = gauge.identity()
    reference = jax.vmap(model)(inputs)

    def one(s):
        g = jax.tree.map(lambda e, i: i + s * (e - i), element, identity)
        return jnp.max(jnp.abs(jax.vmap(gauge.act(g, model))(inputs) - reference))

    return jax.lax.map(one, scales)


def ray_deviations(
    model: Any,
    gauge: AbstractGauge,
    element: PyTree,
    inputs: Float[ArrayLike, "n ..."],
    scales: Sequence[float] | Float[ArrayLike, " k"],
) -> Float[Array, " k"]:
    """The output deviation along the ray of elements `g_s = identity + s (element - identity)`:
    `max |model_s(x) - model(x)|` over `inputs` for each scale s, with
    `model_s = gauge.act(g_s, model)`, in one compiled program (the scales traced). For a family
    whose elements are linear coordinates at the identity (e.g. the coefficients of a
    `LieDeformationGauge` generator) `g_s = s element`; `gj.loglog_slope(scales, deviations)`
    is then the order at which the element's direction is a symmetry (2 for a first-order
    symmetry, Thm 2.1; 1 for a direction that moves the output).

    **Arguments:**

    - `model`: any model `gauge` acts on, called on one input (`vmap`ped over `inputs`).
    - `gauge`: the family.
    - `element`: the element the ray points to (s = 1).
    - `inputs`: a batch of inputs (leading axis).
    - `scales`: the values of s.

    **Returns:** one deviation per scale.
    """
    return _ray(model, gauge, element, jnp.asarray(inputs), jnp.asarray(scales))


def _fingerprint(model, linear, t1, tolerances) -> tuple[Array, Array]:
    return affine_propagator(linear.weight, linear.bias, t1, model.t0, **tolerances)


def linear_node_fingerprint(
    model: AbstractNeuralODE, *, dim: int | None = None, **tolerances
) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
    """`(M, m)` with `x(t1) = M x(t0) + m`: the Wilson line and the integrated bias over
    [t0, t1] of a neural ODE whose field is affine in the state, invariant under every gauge of
    the linear neural ODE (compare trained runs without aligning their parameters).

    For an `AbstractLinearField` (e.g. a `LinearNODE`) its `weight`, `bias` are used. Any other
    field `F(t, y, args)` (a closure or Module) is read as `w(t) = D_y F(t, 0)` (forward-mode
    Jacobian) and `b(t) = F(t, 0)`, after a numerical affinity check: at four fixed
    pseudo-random `(t, y)`, t in [t0, t1] and |y| ~ 0.1 to 10 sqrt(d), the relative residual
    `|F(t, y) - F(t, 0) - w(t) y| / (|F(t, y)| + |F(t, 0)| + |w(t)|_F |y|)` must be at most
    `sqrt(eps)` of the field's dtype (1.5e-8 in float64, 3.5e-4 in float32). An affine field
    shows roundoff, a few eps times the conditioning of its own arithmetic; a nonlinear one
    (tanh, a cubic term) shows O(1) at states of unit size. `sqrt(eps)` sits between, with
    room for fields computed through moderately ill-conditioned steps. The check is numerical:
    a field that is affine near these states only (a ReLU whose kinks lie beyond them) passes.
    Under `jit` with traced field arrays it runs as an `eqx.error_if`.

    **Arguments:**

    - `model`: an `AbstractNeuralODE` (e.g. `LinearNODE`, or `NeuralODE(field, t1=...)`).
    - `dim`: the state dimension d; needed only for a field that declares none (an
      `AbstractLinearField`, an `MLPField` or a field with an int `dim` attribute do).
    - `tolerances`: `rtol`, `atol`, `max_steps` of `affine_propagator` (default 1e-10).

    **Returns:** `(M, m)`, shapes `(d, d)` and `(d,)`.

    **Raises:** `TypeError` if `model` is not a neural ODE; `ValueError` if the field is not
    affine in y (the fingerprint of a nonlinear field is not defined), or if d can be neither
    inferred nor taken from `dim`.
    """
    linear, residual = linear_field(model, dim=dim)
    checked = check_affine(linear, residual, _fingerprint_error(model), ValueError)
    return checked(_fingerprint(model, linear, model.t1, tolerances))


def _fingerprint_error(model):
    def message(measured: str) -> str:
        return (
            f"the field {describe_field(model.field)} is {not_affine(measured)}; the fingerprint "
            "(M, m) of a nonlinear field is not defined. (A field affine by construction whose "
            "roundoff exceeds this can be wrapped as FunctionLinearField(w, b), which skips the "
            "check.)"
        )

    return message


# ---------------------------------------------------------------------------- seed metrics


def _num_seeds(tree, arg: str, what: str, is_leaf=eqx.is_inexact_array) -> int:
    """The common leading (seed) axis of the arrays of a stacked pytree."""
    leaves = [x for x in jax.tree.leaves(eqx.filter(tree, is_leaf)) if x is not None]
    if not leaves:
        raise ValueError(f"`{arg}` has no {what} arrays to compare across seeds.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = sorted({tuple(jnp.shape(x)) for x in leaves})
        raise ValueError(
            f"`{arg}` must be a list of models or one pytree whose {what} arrays all carry the "
            f"same leading seed axis; received arrays of shapes {shapes}."
        )
    (size,) = sizes
    if size < 2:
        raise ValueError(f"a spread needs at least 2 seeds; `{arg}` has {size}.")
    return size


def seed_spread(values: PyTree) -> Float[Array, ""]:
    """The spread across seeds of any per-seed quantity: the mean over entries of the
    across-seed standard deviation,

    `spread = mean_j sqrt(mean_s (v_sj - mean_s v_sj)^2)`,

    where `v_s` concatenates the flattened inexact arrays of `values` for seed s (the
    population standard deviation, ddof 0; leaves in pytree order). It is 0 (to roundoff) when
    all seeds agree, and scales like the values: `spread(c v) = |c| spread(v)`.

    **Arguments:**

    - `values`: a pytree (an array, a tuple of arrays, a stacked model) whose inexact arrays all
      carry the same leading seed axis S >= 2; other leaves are ignored.

    **Returns:** a scalar.

    **Raises:** `ValueError` if `values` has no inexact arrays, if they do not share a leading
    axis, or if that axis has fewer than 2 seeds.
    """
    size = _num_seeds(values, "values", "inexact")
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(eqx.filter(values, eqx.is_inexact_array))]
    if len({x.dtype for x in leaves}) > 1:
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(*leaves)
        leaves = [x.astype(dtype) for x in leaves]
    flat = jnp.concatenate([x.reshape(size, -1) for x in leaves], axis=1)
    return jnp.mean(jnp.std(flat, axis=0))


def _stack(trees: list, arg: str) -> PyTree:
    """Stack the inexact arrays of trees of one structure along a new leading axis."""
    if len(trees) < 2:
        raise ValueError(f"a spread needs at least 2 models; `{arg}` has {len(trees)}.")
    params = [eqx.filter(t, eqx.is_inexact_array) for t in trees]
    first, def0 = jax.tree.flatten(params[0])
    for i, p in enumerate(params[1:], 1):
        leaves, treedef = jax.tree.flatten(p)
        shapes = [jnp.shape(x) for x in leaves]
        if treedef != def0 or shapes != [jnp.shape(x) for x in first]:
            raise ValueError(
                f"`{arg}[{i}]` does not have the structure of `{arg}[0]` (its inexact arrays "
                f"differ in tree structure or shapes: {shapes} vs "
                f"{[jnp.shape(x) for x in first]}); a spread compares models of one structure."
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params)


def parameter_spread(
    models: Sequence[PyTree] | PyTree,
    *,
    where: Callable[[PyTree], PyTree] | None = None,
    canonical: bool = False,
    gauge: AbstractGauge | Sequence[AbstractGauge] | None = None,
) -> Float[Array, ""]:
    """The spread of the parameters of models trained from different seeds: `seed_spread` of
    their flattened inexact arrays (the mean over parameter entries of the across-seed standard
    deviation, ddof 0). On a gauge orbit it is large while `function_spread` is small.

    **Arguments:**

    - `models`: a `list` (or `tuple`) of S >= 2 models of one structure, or one model whose
      inexact arrays all carry a leading seed axis S >= 2 (e.g. from `eqx.filter_vmap`). Arrays
      captured by closures are not pytree leaves and are not seen.
    - `where`: optional `model -> subtree` choosing the parameters to compare (e.g.
      `lambda m: (m.field.weights, m.field.biases)` to leave out a time basis); applied to each
      model, or to the stacked model (after `canonical`).
    - `canonical`: the spread modulo the gauge group: each model is first replaced by its
      canonical representative (`gj.canonicalize(model, gauge)`), so models that differ only
      by an element of the group have spread 0 (to rounding). A stacked model is unstacked
      first.
    - `gauge`: with `canonical`, the families to canonicalise along (as `gj.canonicalize`;
      None: the model's full known group).

    **Returns:** a scalar.

    **Raises:** `ValueError` for fewer than 2 models or seeds, models of different structures,
    a stacked model whose arrays do not share a leading axis, no inexact arrays, or a `gauge`
    without `canonical`; as `gj.canonicalize` with `canonical`.
    """
    if gauge is not None and not canonical:
        raise ValueError("`gauge` chooses the canonical form: pass it with `canonical=True`.")
    select = (lambda m: m) if where is None else where
    if canonical:
        if not isinstance(models, (list, tuple)):
            size = _num_seeds(models, "models", "inexact")
            params, static = eqx.partition(models, eqx.is_inexact_array)
            models = [
                eqx.combine(jax.tree.map(lambda a, i=i: a[i], params), static) for i in range(size)
            ]
        models = [canonicalize(m, gauge) for m in models]
    if isinstance(models, (list, tuple)):
        stacked = _stack([select(m) for m in models], "models")
    else:
        stacked = select(models)
    _num_seeds(stacked, "models", "inexact")
    return seed_spread(stacked)


@eqx.filter_jit
def _stacked_outputs(models, inputs):
    return eqx.filter_vmap(lambda mod: jax.vmap(mod)(inputs))(models)


@eqx.filter_jit
def _stacked_fingerprints(models, dim):
    return eqx.filter_vmap(lambda mod: linear_node_fingerprint(mod, dim=dim))(models)


def function_spread(
    models: Sequence[Callable] | Callable,
    inputs: Shaped[ArrayLike, "n ..."] | None = None,
    *,
    dim: int | None = None,
) -> Float[Array, ""]:
    """The spread of the functions of models trained from different seeds: `seed_spread` of
    their outputs on `inputs` (the mean over output entries of the across-seed standard
    deviation, ddof 0), or, without `inputs`, of their fingerprints `(M, m)`
    (`linear_node_fingerprint`), which determine the I/O map `x -> M x + m` of a neural ODE
    with an affine field on all inputs at once.

    **Arguments:**

    - `models`: a `list` (or `tuple`) of S >= 2 models (any callables of one input; their
      architectures may differ, their outputs must have one shape), or one model whose arrays
      all carry a leading seed axis S >= 2 (evaluated under `eqx.filter_vmap`).
    - `inputs`: a batch `(n, ...)` of inputs, each evaluated as `model(x)`; None for the
      fingerprint spread of affine neural ODEs.
    - `dim`: the state dimension for `linear_node_fingerprint` (fingerprints only).

    **Returns:** a scalar.

    **Raises:** `ValueError` for fewer than 2 models or seeds, outputs of different shapes, a
    stacked model whose arrays do not share a leading axis, or `inputs` without a batch axis;
    the errors of `linear_node_fingerprint` without `inputs`.
    """
    if inputs is not None:
        inputs = jnp.asarray(inputs)
        if inputs.ndim < 1:
            raise ValueError(
                f"`inputs` must carry a leading batch axis (n, ...); received shape {inputs.shape}."
            )
    if isinstance(models, (list, tuple)):
        if len(models) < 2:
            raise ValueError(f"a spread needs at least 2 models; `models` has {len(models)}.")
        if inputs is None:
            outs = [linear_node_fingerprint(m, dim=dim) for m in models]
        else:
            outs = [jax.vmap(m)(inputs) for m in models]
        shapes = [jax.tree.map(jnp.shape, o) for o in outs]
        for i, shape in enumerate(shapes[1:], 1):
            if shape != shapes[0]:
                raise ValueError(
                    f"the outputs of `models[{i}]` have shapes {shape}, those of `models[0]` "
                    f"{shapes[0]}: a function spread compares outputs of one shape."
                )
        return seed_spread(jax.tree.map(lambda *xs: jnp.stack(xs), *outs))
    _num_seeds(models, "models", "array", is_leaf=eqx.is_array)
    if inputs is None:
        return seed_spread(_stacked_fingerprints(models, dim))
    return seed_spread(_stacked_outputs(models, inputs))


def canonical_distance(
    model: AbstractNeuralODE,
    t1: float | None = None,
    num_nodes: int = 16,
    *,
    dim: int | None = None,
    fingerprint: tuple[Float[ArrayLike, "d d"], Float[ArrayLike, " d"]] | None = None,
    **tolerances,
) -> Float[Array, ""]:
    """The L2 distance over [t0, t1] between the field `(w, b)` of `model` and the canonical
    (uniform-motion) gauge `(w_c, b_c)` of its own I/O map on [t0, t1] (`canonical_gauge` of
    its fingerprint, shifted to start at t0):

    `sqrt(int_t0^t1 |w(t) - w_c(t)|_F^2 + |b(t) - b_c(t)|^2 dt)`,

    by `num_nodes`-point Gauss-Legendre quadrature. Zero exactly on the canonical gauge, the
    unique zero of Eq. 45 on the orbit; gauge fixing drives it towards 0. Eager (the existence
    check of `canonical_gauge` runs on the host), not for use under `jit`.

    **Arguments:**

    - `model`: a neural ODE whose field is affine in the state (see `linear_node_fingerprint`).
    - `t1`: the end of the interval, default `model.t1`.
    - `num_nodes`: quadrature nodes (16: spectrally accurate for smooth fields).
    - `dim`: the state dimension, for a field that declares none.
    - `fingerprint`: the `(M, m)` of `model` over [t0, t1] if already computed (saves a solve).
    - `tolerances`: `rtol`, `atol`, `max_steps` of the fingerprint's solve.

    **Returns:** a scalar.

    **Raises:** `ValueError` if `t1 <= t0`, `num_nodes < 1`, the field is not affine, or the
    I/O map has no canonical gauge (M with an eigenvalue on (-inf, 0]); `TypeError` if `model`
    is not a neural ODE.
    """
    linear, residual = linear_field(model, dim=dim)
    t0 = float(model.t0)
    t1 = float(model.t1) if t1 is None else t1
    if not float(t1) > t0:
        raise ValueError(f"`t1` must be > t0 = {t0}; received {t1!r}.")
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise ValueError(f"`num_nodes` must be a positive int; received {num_nodes!r}.")
    checked = check_affine(linear, residual, _fingerprint_error(model), ValueError)
    t1 = float(t1)
    if fingerprint is None:
        fingerprint = _fingerprint(model, linear, t1, tolerances)
    M, m = fingerprint
    d = jax.eval_shape(linear.bias, t0).shape
    if jnp.shape(M) != d + d or jnp.shape(m) != d:
        raise ValueError(
            f"`fingerprint` must be (M, m) of shapes {d + d} and {d} for this model; received "
            f"{jnp.shape(M)} and {jnp.shape(m)}."
        )
    wc, bc = canonical_gauge(M, m, t1 - t0)

    def gap(t):
        s = t - t0
        return jnp.sum((linear.weight(t) - wc(s)) ** 2) + jnp.sum((linear.bias(t) - bc(s)) ** 2)

    dtype = jnp.asarray(M).dtype
    return checked(jnp.sqrt(quadrature(gap, t0, t1, num_nodes, dtype=dtype)))


class _PerturbedLinearField(AbstractLinearField):
    """`w + dw`, `b + db`: a linear field plus a perturbation in a finite basis."""

    base: AbstractLinearField
    delta: BasisLinearField

    def weight(self, t):
        return self.base.weight(t) + self.delta.weight(t)

    def bias(self, t):
        return self.base.bias(t) + self.delta.bias(t)


def _hat_gram(t0: float, t1: float, num_knots: int) -> np.ndarray:
    """Gram matrix `int phi_j phi_k dt` of hat functions on equispaced knots (closed form)."""
    h = (t1 - t0) / (num_knots - 1)
    gram = np.diag(np.full(num_knots, 2 * h / 3)) + np.diag(np.full(num_knots - 1, h / 6), 1)
    gram = gram + np.diag(np.full(num_knots - 1, h / 6), -1)
    gram[0, 0] = gram[-1, -1] = h / 3
    return gram


def function_space_cosines(
    loss: Callable[[PyTree], Float[Array, ""]],
    model: LinearNODE,
    gauge: AbstractGauge,
    inputs: Float[Array, "n d"],
    keys: Key[Array, " k"],
    *,
    num_knots: int = 64,
    num_nodes: int = 64,
) -> Float[Array, " k"]:
    """Gradient-orbit cosines in function space, for gauges that act on the field `(w(t), b(t))`
    of a `LinearNODE` (e.g. `LinearGauge`: Eq. 25 leaves any finite time basis, so its orbit
    tangents are not parameter vectors and `gradient_orbit_cosines` does not apply).

    `cos_k = D_v L / (|v|_L2 |grad L|_L2)` for the loss `L = loss(x(T) of inputs)`, with

    - `D_v L`: the loss's first-order change along the orbit tangent `v` of sample k, from the
      forward sensitivity system under error control (`NeuralODE.solve_tangent`);
    - `|v|_L2^2 = int |dw|_F^2 + |db|^2 dt` by `num_nodes`-point Gauss-Legendre quadrature;
    - `|grad L|_L2`: the norm of the functional gradient projected onto hat functions on
      `num_knots` knots (`g^T Gram^-1 g` with `g` the reverse-mode gradient of the coefficients):
      a lower bound that converges from below as knots are added, so `|cos|` is if anything
      overestimated.

    For a boundary-preserving gauge and an invariant loss the cosines vanish to solver tolerance;
    a gauge with `G(T) != 1` gives O(0.1).

    **Raises:** `TypeError` if `model` is not a `LinearNODE`.
    """
    if not isinstance(model, LinearNODE):
        raise TypeError(
            f"`model` must be a LinearNODE (the gauge acts on w(t), b(t)); received "
            f"{type(model).__name__}."
        )
    t0, t1 = float(model.t0), float(model.t1)
    outputs = jax.vmap(model)(inputs)
    d = inputs.shape[-1]

    # |grad L| from the gradient of hat-function coefficients of a perturbation (dW, db)
    basis = PiecewiseLinearBasis(t1 - t0, num_knots)
    basis = eqx.tree_at(lambda b: b.knots, basis, basis.knots + t0)  # hats on [t0, t1]

    def perturbed_loss(delta):
        dW, db = delta
        field = _PerturbedLinearField(model.field, BasisLinearField(basis, dW, db))
        return loss(jax.vmap(model.with_field(field))(inputs))

    zero = (jnp.zeros((num_knots, d, d), inputs.dtype), jnp.zeros((num_knots, d), inputs.dtype))
    gW, gb = jax.grad(perturbed_loss)(zero)
    gram_inv = jnp.asarray(np.linalg.inv(_hat_gram(t0, t1, num_knots)), dtype=inputs.dtype)
    g = jnp.concatenate([gW.reshape(num_knots, -1), gb], axis=1)
    grad_norm = jnp.sqrt(jnp.sum(g * (gram_inv @ g)))

    identity = gauge.identity()

    def one(key):
        direction = jax.tree.map(jnp.subtract, gauge.sample(key), identity)
        d_out = gauge_response(model, gauge, direction, inputs)[0]
        d_loss = jax.jvp(loss, (outputs,), (d_out,))[1]

        def field_tangent(t):
            def wb(a):
                moved = gauge.act(a, model)
                return moved.weight(t), moved.bias(t)

            dw, db = jax.jvp(wb, (identity,), (direction,))[1]
            return jnp.sum(dw**2) + jnp.sum(db**2)

        v_norm = jnp.sqrt(quadrature(field_tangent, t0, t1, num_nodes, dtype=inputs.dtype))
        return d_loss / (v_norm * grad_norm)

    return jax.lax.map(one, keys)
