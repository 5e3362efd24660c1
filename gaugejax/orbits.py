"""Orbit geometry: tangents of gauge orbits in parameter space, gradient orthogonality,
conserved quantities of gradient flow, and gauge-invariant fingerprints."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Key, PRNGKeyArray

from .correspondence import affine_propagator
from .gauges.base import AbstractGauge
from .models import AbstractNeuralODE, FeedforwardNet


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
