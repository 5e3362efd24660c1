"""Orbit geometry: gradient orthogonality, the rescaling conserved quantity, fingerprints.

Cosines are sums of O(1) products in float64: below 1e-10 is roundoff; a loss that breaks the
symmetry (weight decay 0.1 next to a data loss of O(10)) gives cosines of about 1e-3.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaugejax as gj
from gaugejax import orbits

from .conftest import loglog_slope


D = 3


def relu_net(key):
    k1, k2 = jax.random.split(key)
    return gj.FeedforwardNet(
        jax.random.normal(k1, (3, D, D)) / np.sqrt(D), 1.0 + jax.random.normal(k2, (3, D)), "relu"
    )


def data(key):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (32, D)), jax.random.normal(ky, (32, D))


def mse(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def test_gradient_is_orthogonal_to_gauge_orbits():
    x, y = data(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 8)
    cases = [
        (relu_net(jax.random.key(2)), gj.RescalingGauge((D, D), 0.5)),
        (
            eqx.nn.MLP(D, D, 8, 2, activation=jax.nn.relu, key=jax.random.key(3)),
            gj.RescalingGauge((8, 8), 0.5),
        ),
        (
            gj.LinearNet(
                jax.random.normal(jax.random.key(4), (4, D, D)) / np.sqrt(D), jnp.zeros((4, D))
            ),
            gj.DiscreteLinearGauge(D, 4),
        ),
    ]
    for model, gauge in cases:
        cos = orbits.gradient_orbit_cosines(lambda m: mse(m, x, y), model, gauge, keys)
        assert jnp.max(jnp.abs(cos)) < 1e-10, (type(model).__name__, cos)
    tokens = jax.random.normal(jax.random.key(5), (4, 5, D))
    att = gj.SelfAttention(*jax.random.normal(jax.random.key(6), (3, D, D)), "relu")
    target = jax.random.normal(jax.random.key(7), (4, 5, D))
    cos = orbits.gradient_orbit_cosines(
        lambda m: jnp.mean((jax.vmap(m)(tokens) - target) ** 2), att, gj.AttentionGauge(D), keys
    )
    assert jnp.max(jnp.abs(cos)) < 1e-10
    # weight decay breaks the symmetry: the gradient then has a component along the orbit
    model, gauge = cases[0]
    decayed = orbits.gradient_orbit_cosines(
        lambda m: mse(m, x, y) + 0.1 * jnp.sum(m.weights**2), model, gauge, keys
    )
    assert jnp.max(jnp.abs(decayed)) > 1e-4  # measured 2e-3: 10^7 x the invariant case


def test_conserved_quantity_drifts_at_order_learning_rate():
    x, y = data(jax.random.key(0))
    net = relu_net(jax.random.key(2))
    q0 = orbits.rescaling_conserved_quantity(net)

    def drift(lr, decay=0.0):
        steps = int(round(0.2 / lr))  # same total time
        res = gj.train(
            lambda m, b: mse(m, *b),
            net,
            optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr)),
            lambda k: (x, y),
            key=jax.random.key(0),
            num_steps=steps,
            steps_per_chunk=steps,
        )
        return float(jnp.max(jnp.abs(orbits.rescaling_conserved_quantity(res.model) - q0)))

    lrs = [0.002, 0.001, 0.0005]  # the asymptotic O(lr) regime for this net and data
    drifts = [drift(lr) for lr in lrs]
    assert abs(loglog_slope(lrs, drifts) - 1) < 0.2, drifts
    assert drift(0.001, decay=0.5) > 10 * drifts[1]


def test_linear_node_fingerprint_is_gauge_invariant():
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    model = gj.random_linear_node(D, 1.0, key=jax.random.key(8), stepsize_controller=tight)
    gauge = gj.LinearGauge(D, 1.0)
    moved = gauge.act(gauge.sample(jax.random.key(9)), model)
    M0, m0 = orbits.linear_node_fingerprint(model)
    M1, m1 = orbits.linear_node_fingerprint(moved)
    np.testing.assert_allclose(M1, M0, atol=1e-8)
    np.testing.assert_allclose(m1, m0, atol=1e-8)
    other = gj.random_linear_node(D, 1.0, key=jax.random.key(10), stepsize_controller=tight)
    assert jnp.max(jnp.abs(orbits.linear_node_fingerprint(other)[0] - M0)) > 1e-2


def test_function_space_cosines_for_linear_node_gauges():
    # LinearGauge moves w(t), b(t) out of any finite basis, so the cosine is taken in L2([0, T]).
    # With rtol 1e-10 the sensitivity-system response is accurate to ~1e-10 relative; measured
    # cosines are ~4e-12, so 1e-8 leaves margin. A gauge with G(T) != 1 (sin modes of period
    # 1.5 T) changes the I/O map: measured 0.02-0.08, so > 1e-3 shows the check can fail.
    tight = diffrax.PIDController(rtol=1e-10, atol=1e-10)
    model = gj.random_linear_node(D, 1.0, key=jax.random.key(8), stepsize_controller=tight)
    x, y = data(jax.random.key(0))
    keys = jax.random.split(jax.random.key(3), 3)

    def loss(out):
        return jnp.mean((out - y) ** 2)

    cos = orbits.function_space_cosines(loss, model, gj.LinearGauge(D, 1.0), x, keys, num_knots=16)
    assert jnp.max(jnp.abs(cos)) < 1e-8, cos
    bad = orbits.function_space_cosines(loss, model, gj.LinearGauge(D, 1.5), x, keys, num_knots=16)
    assert jnp.min(jnp.abs(bad)) > 1e-3, bad
    with pytest.raises(TypeError, match="LinearNODE"):
        orbits.function_space_cosines(
            loss, relu_net(jax.random.key(2)), gj.LinearGauge(D, 1.0), x, keys
        )
