"""Orbit geometry: tangents of gauge orbits in parameter space, gradient orthogonality,
conserved quantities of gradient flow, and gauge-invariant fingerprints."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Key, PRNGKeyArray, PyTree

from .correspondence import affine_propagator
from .gauges.base import AbstractGauge
from .models import AbstractNeuralODE, FeedforwardNet
from .models.linear import (
    AbstractLinearField,
    BasisLinearField,
    LinearNODE,
    PiecewiseLinearBasis,
)


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


def rescaling_conserved_quantity(model: FeedforwardNet) -> Float[Array, "L d"]:
    """Per hidden unit j of layer l: `|w_l[j, :]|^2 + b_l[j]^2 - |w_{l+1}[:, j]|^2`, conserved by
    gradient flow of any loss of a ReLU network (the Noether charge of the rescaling symmetry);
    drifts at O(learning rate) under gradient descent and decays under weight decay."""
    if not isinstance(model, FeedforwardNet):
        raise TypeError(f"`model` must be a FeedforwardNet; received {type(model).__name__}.")
    w, b = model.weights, model.biases
    incoming = jnp.sum(w[:-1] ** 2, axis=2) + b[:-1] ** 2
    outgoing = jnp.sum(w[1:] ** 2, axis=1)
    return incoming - outgoing


def linear_node_fingerprint(model: AbstractNeuralODE, **tolerances) -> tuple[Array, Array]:
    """`(M, m)` with `x(T) = M x(0) + m`: the Wilson line and the integrated bias over [t0, t1],
    invariant under every gauge of the linear neural ODE (compare trained runs without aligning
    their parameters)."""
    return affine_propagator(model.weight, model.bias, model.t1, model.t0, **tolerances)


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

    nodes, weights = np.polynomial.legendre.leggauss(num_nodes)
    ts = jnp.asarray(t0 + 0.5 * (t1 - t0) * (nodes + 1.0), dtype=inputs.dtype)
    wq = jnp.asarray(0.5 * (t1 - t0) * weights, dtype=inputs.dtype)
    identity = gauge.identity()

    def one(key):
        direction = jax.tree.map(jnp.subtract, gauge.sample(key), identity)

        def fn(a, t, y, args):
            return gauge.act(a, model).field(t, y, args)

        def response(x):
            return model.solve_tangent(x, jnp.zeros_like(x), fn, identity, direction)[0][1]

        d_out = jax.vmap(response)(inputs)
        d_loss = jax.jvp(loss, (outputs,), (d_out,))[1]

        def field_tangent(t):
            def wb(a):
                moved = gauge.act(a, model)
                return moved.weight(t), moved.bias(t)

            dw, db = jax.jvp(wb, (identity,), (direction,))[1]
            return jnp.sum(dw**2) + jnp.sum(db**2)

        v_norm = jnp.sqrt(jnp.dot(wq, jax.vmap(field_tangent)(ts)))
        return d_loss / (v_norm * grad_norm)

    return jax.lax.map(one, keys)
