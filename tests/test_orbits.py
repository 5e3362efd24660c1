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


# one compiled program per (loss, model, gauge) (eager dispatch compiles op by op: 360 programs)
gradient_orbit_cosines = eqx.filter_jit(orbits.gradient_orbit_cosines)


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
        cos = gradient_orbit_cosines(lambda m: mse(m, x, y), model, gauge, keys)
        assert jnp.max(jnp.abs(cos)) < 1e-10, (type(model).__name__, cos)
    tokens = jax.random.normal(jax.random.key(5), (4, 5, D))
    att = gj.SelfAttention(*jax.random.normal(jax.random.key(6), (3, D, D)), "relu")
    target = jax.random.normal(jax.random.key(7), (4, 5, D))
    cos = gradient_orbit_cosines(
        lambda m: jnp.mean((jax.vmap(m)(tokens) - target) ** 2), att, gj.AttentionGauge(D), keys
    )
    assert jnp.max(jnp.abs(cos)) < 1e-10
    # weight decay breaks the symmetry: the gradient then has a component along the orbit
    model, gauge = cases[0]
    decayed = gradient_orbit_cosines(
        lambda m: mse(m, x, y) + 0.1 * jnp.sum(m.weights**2), model, gauge, keys
    )
    assert jnp.max(jnp.abs(decayed)) > 1e-4  # measured 2e-3: 10^7 x the invariant case


def test_conserved_quantity_drifts_at_order_learning_rate():
    x, y = data(jax.random.key(0))
    net = relu_net(jax.random.key(2))
    q0 = jnp.stack(orbits.rescaling_conserved_quantity(net))

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
        q = jnp.stack(orbits.rescaling_conserved_quantity(res.model))
        return float(jnp.max(jnp.abs(q - q0)))

    lrs = [0.002, 0.001, 0.0005]  # the asymptotic O(lr) regime for this net and data
    drifts = [drift(lr) for lr in lrs]
    assert abs(gj.loglog_slope(lrs, drifts) - 1) < 0.2, drifts
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
    # cosines are ~4e-12, so 1e-8 leaves margin. A gauge with G(T) != 1 (boundary="free":
    # quarter-period sin modes) changes the I/O map: measured 0.03, so > 1e-3 shows the check
    # can fail.
    tight = diffrax.PIDController(rtol=1e-10, atol=1e-10)
    model = gj.random_linear_node(D, 1.0, key=jax.random.key(8), stepsize_controller=tight)
    x, y = data(jax.random.key(0))
    keys = jax.random.split(jax.random.key(3), 3)

    def loss(out):
        return jnp.mean((out - y) ** 2)

    cos = orbits.function_space_cosines(loss, model, gj.LinearGauge(D, 1.0), x, keys, num_knots=16)
    assert jnp.max(jnp.abs(cos)) < 1e-8, cos
    free = gj.LinearGauge(D, 1.0, boundary="free")
    bad = orbits.function_space_cosines(loss, model, free, x, keys, num_knots=16)
    assert jnp.min(jnp.abs(bad)) > 1e-3, bad
    with pytest.raises(TypeError, match="LinearNODE"):
        orbits.function_space_cosines(
            loss, relu_net(jax.random.key(2)), gj.LinearGauge(D, 1.0), x, keys
        )


class _CubicModule(eqx.Module):
    """`F(t, y) = (1 + t) A y + c + k y^3`: a user's Module (no `dim` attribute), affine in y for
    k = 0 only; k is an array, so both cases share one compiled program."""

    A: jax.Array
    c: jax.Array
    k: jax.Array

    def __call__(self, t, y, args):
        return (1 + t) * self.A @ y + self.c + self.k * y**3


def test_fingerprint_of_any_affine_field():
    # w(t) = D_y F(t, 0) of `w(t) @ y + b(t)` is w(t) up to roundoff, so both fingerprints come
    # from the same rtol-1e-10 solve of the same (w, b): measured identical; 1e-9 leaves room for
    # roundoff-level differences flipping an adaptive step decision (~ the solve tolerance).
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    model = gj.random_linear_node(D, 1.0, key=jax.random.key(8), stepsize_controller=tight)
    w, b = model.weight, model.bias
    closure = gj.NeuralODE(lambda t, y, args: w(t) @ y + b(t), t1=1.0)
    M0, m0 = orbits.linear_node_fingerprint(model)
    M1, m1 = orbits.linear_node_fingerprint(closure, dim=D)
    np.testing.assert_allclose(M1, M0, rtol=0, atol=1e-9)
    np.testing.assert_allclose(m1, m0, rtol=0, atol=1e-9)
    # an affine Module on [t0, t1] = [0.5, 1.5], under jit (its arrays traced, so the affinity
    # check runs as eqx.error_if): dx/dt = (1 + t) a x + c has M = exp(2 a) I and
    # m = int_t0^t1 exp(a int_s^t1 (1 + u) du) ds c (64-point Gauss quadrature, exact to 1e-15);
    # the solve is good to ~1e-10, so 1e-9 relative
    a, c = 0.3, jnp.array([1.0, -2.0, 0.5])
    module = gj.NeuralODE(_CubicModule(a * jnp.eye(D), c, jnp.zeros(())), t1=1.5, t0=0.5)
    jitted = eqx.filter_jit(lambda mod: orbits.linear_node_fingerprint(mod, dim=D))
    M, m = jitted(module)
    np.testing.assert_allclose(M, np.exp(2 * a) * np.eye(D), rtol=1e-9, atol=1e-12)
    growth = gj.quadrature(lambda s: jnp.exp(a * ((1.5 - s) + (1.5**2 - s**2) / 2)), 0.5, 1.5, 64)
    np.testing.assert_allclose(m, growth * c, rtol=1e-9)
    # the same program with k = 1 (a cubic field) raises at run time
    cubic = eqx.tree_at(lambda mod: mod.field.k, module, jnp.ones(()))
    with pytest.raises(eqx.EquinoxRuntimeError, match="_CubicModule is not affine"):
        jitted(cubic)


def test_fingerprint_refuses_nonlinear_fields_and_bad_inputs():
    w = gj.random_linear_node(D, 1.0, key=jax.random.key(8)).weight
    tanh = gj.NeuralODE(lambda t, y, args: jnp.tanh(w(t) @ y), t1=1.0)
    # tanh's residual at |y| ~ 0.1..10 is O(0.1-1) relative, vs the 1.5e-8 float64 tolerance;
    # the check runs before any solve
    with pytest.raises(ValueError, match=r"<lambda> \(a function\) is not affine in the state y"):
        orbits.linear_node_fingerprint(tanh, dim=D)
    cubic = gj.NeuralODE(_CubicModule(jnp.eye(D), jnp.zeros(D), jnp.ones(())), t1=1.0)
    with pytest.raises(ValueError, match="fingerprint .* of a nonlinear field is not defined"):
        orbits.linear_node_fingerprint(cubic, dim=D)
    mlp = gj.NeuralODE(gj.MLPField(D, 8, 1, key=jax.random.key(0)), t1=1.0)
    with pytest.raises(ValueError, match="MLPField is not affine"):  # its dim is inferred
        orbits.linear_node_fingerprint(mlp)
    with pytest.raises(ValueError, match="cannot infer the state dimension.*pass `dim=`"):
        orbits.linear_node_fingerprint(tanh)
    with pytest.raises(ValueError, match=r"maps a \(2,\) state to shape \(3,\)"):
        orbits.linear_node_fingerprint(gj.NeuralODE(lambda t, y, args: jnp.ones(3), t1=1.0), dim=2)
    with pytest.raises(ValueError, match="`dim` must be a positive int"):
        orbits.linear_node_fingerprint(tanh, dim=0)
    # (under the suite's jaxtyping hook the annotation refuses it first, also as a TypeError)
    with pytest.raises(TypeError, match="FeedforwardNet"):
        orbits.linear_node_fingerprint(relu_net(jax.random.key(2)))
