"""Gauge-fixing metrics: spread across seeds and distance to the canonical gauge.

Spreads of hand-made seed sets have closed forms (means and standard deviations of a few O(1)
numbers): 1e-12 asserted, roundoff being ~1e-15. Fingerprints are solved with rtol 1e-10, so
quantities built from them are compared at 1e-8.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from gaugejax import orbits


D = 3
SQRT_2_3 = np.sqrt(2.0 / 3.0)  # the population std of (0, 1, 2)


def nets(delta):
    """Three linear nets with weights `W + s delta`, s = 0, 1, 2, and equal biases."""
    W = jax.random.normal(jax.random.key(0), delta.shape)
    b = jax.random.normal(jax.random.key(1), delta.shape[:2])
    return [gj.LinearNet(W + s * delta, b) for s in range(3)]


def test_parameter_spread_closed_form():
    delta = jax.random.normal(jax.random.key(2), (2, D, D))
    models = nets(delta)
    # std over seeds of w + s delta_j is sqrt(2/3) |delta_j|; biases agree (std 0); the mean runs
    # over all 2 D^2 + 2 D entries
    closed = SQRT_2_3 * float(jnp.sum(jnp.abs(delta))) / (2 * D * D + 2 * D)
    np.testing.assert_allclose(orbits.parameter_spread(models), closed, rtol=1e-12)
    np.testing.assert_allclose(orbits.parameter_spread(tuple(models)), closed, rtol=1e-12)
    # one stacked model (a leading seed axis) gives the same number
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    np.testing.assert_allclose(orbits.parameter_spread(stacked), closed, rtol=1e-12)
    # `where` picks the parameters: the weights alone, or the (identical) biases
    weights = orbits.parameter_spread(models, where=lambda m: m.weights)
    np.testing.assert_allclose(weights, SQRT_2_3 * float(jnp.mean(jnp.abs(delta))), rtol=1e-12)
    assert orbits.parameter_spread(stacked, where=lambda m: m.biases) < 1e-15  # roundoff
    # seed_spread is the primitive: any per-seed quantity with a leading axis
    values = jnp.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])  # stds (1.633, 0)
    np.testing.assert_allclose(orbits.seed_spread(values), 2 * SQRT_2_3 / 2, rtol=1e-12)


def test_function_spread_closed_form():
    delta = jax.random.normal(jax.random.key(2), (1, D, D))
    models = nets(delta)  # one layer: x -> (W + s delta) x + b
    x = jax.random.normal(jax.random.key(3), (5, D))
    # outputs y_n + s delta x_n for s = 0, 1, 2: std sqrt(2/3) |(delta x_n)_i|
    closed = SQRT_2_3 * float(jnp.mean(jnp.abs(x @ delta[0].T)))
    np.testing.assert_allclose(orbits.function_spread(models, x), closed, rtol=1e-12)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    np.testing.assert_allclose(orbits.function_spread(stacked, x), closed, rtol=1e-12)
    # without inputs, the fingerprints of affine neural ODEs: dx/dt = a_s x on [0, 1] has
    # (M, m) = (exp(a_s) I, 0), so the spread is std_s(exp(a_s)) D / (D^2 + D) (the D diagonal
    # entries of M vary; the rest of M and m do not)
    rates = jnp.array([0.1, 0.4, -0.2])

    def node(a):
        field = gj.BasisLinearField(
            gj.FourierBasis(1.0, 0), a * jnp.eye(D)[None], jnp.zeros((1, D))
        )
        return gj.LinearNODE(field, t1=1.0)

    closed = float(jnp.std(jnp.exp(rates))) * D / (D * D + D)
    nodes = [node(a) for a in rates]
    np.testing.assert_allclose(orbits.function_spread(nodes), closed, rtol=1e-8)
    np.testing.assert_allclose(
        orbits.function_spread(eqx.filter_vmap(node)(rates)), closed, rtol=1e-8
    )


def test_canonical_distance():
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    model = gj.random_linear_node(D, 1.0, key=jax.random.key(8), stepsize_controller=tight)
    M, m = orbits.linear_node_fingerprint(model)
    canonical = model.with_field(gj.FunctionLinearField(*gj.canonical_gauge(M, m, 1.0)))
    # the canonical gauge's trajectories are straight lines, which Tsit5 integrates exactly, so
    # its fingerprint and canonical gauge come back to roundoff: measured 6e-16
    assert orbits.canonical_distance(canonical) < 1e-10
    far = orbits.canonical_distance(model)
    assert far > 1e-2  # measured 0.63
    # a given fingerprint is used as is (no solve); here the same (M, m), quadrature and, up to
    # roundoff in t and in jacfwd, the same (w, b): 1e-12. Any affine field (a closure; w, b by
    # jacfwd), and the same field shifted to [0.5, 1.5] (the same I/O map, hence the same M, m)
    np.testing.assert_allclose(
        orbits.canonical_distance(model, fingerprint=(M, m)), far, rtol=1e-12
    )
    w, b = model.weight, model.bias
    closure = gj.NeuralODE(lambda t, y, args: w(t) @ y + b(t), t1=1.0)
    np.testing.assert_allclose(
        orbits.canonical_distance(closure, dim=D, fingerprint=(M, m)), far, rtol=1e-12
    )
    shifted = gj.LinearNODE(
        gj.FunctionLinearField(lambda t: w(t - 0.5), lambda t: b(t - 0.5)), t1=1.5, t0=0.5
    )
    np.testing.assert_allclose(
        orbits.canonical_distance(shifted, fingerprint=(M, m)), far, rtol=1e-12
    )


def test_metrics_refuse_bad_inputs():
    models = nets(jnp.ones((2, D, D)))
    with pytest.raises(ValueError, match="at least 2 models; `models` has 1"):
        orbits.parameter_spread(models[:1])
    with pytest.raises(ValueError, match="at least 2 models; `models` has 1"):
        orbits.function_spread(models[:1], jnp.ones((2, D)))
    wider = gj.LinearNet(jnp.zeros((2, D + 1, D + 1)), jnp.zeros((2, D + 1)))
    with pytest.raises(ValueError, match=r"`models\[1\]` does not have the structure of"):
        orbits.parameter_spread([models[0], wider])
    deeper = gj.LinearNet(jnp.zeros((3, D, D)), jnp.zeros((3, D)))
    with pytest.raises(ValueError, match=r"`models\[2\]` does not have the structure"):
        orbits.parameter_spread([*models[:2], deeper])
    with pytest.raises(ValueError, match=r"outputs of `models\[1\]` have shapes"):
        orbits.function_spread([models[0], lambda x: x[:2]], jnp.ones((2, D)))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    with pytest.raises(ValueError, match="same leading seed axis"):
        orbits.parameter_spread(eqx.tree_at(lambda m: m.biases, stacked, jnp.zeros((2, D))))
    with pytest.raises(ValueError, match="at least 2 seeds; `models` has 1"):
        orbits.parameter_spread(jax.tree.map(lambda a: a[:1], stacked))
    with pytest.raises(ValueError, match="at least 2 seeds; `values` has 1"):
        orbits.seed_spread(jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="`values` has no inexact arrays"):
        orbits.seed_spread({"steps": jnp.arange(4)})
    # (a scalar `inputs` is refused by the jaxtyping annotation under the suite's hook, a
    # TypeError, and by the ValueError without it)
    with pytest.raises((TypeError, ValueError), match="inputs"):
        orbits.function_spread(models, jnp.ones(()))
    model = gj.random_linear_node(D, 1.0, key=jax.random.key(8))
    with pytest.raises(ValueError, match="`t1` must be > t0"):
        orbits.canonical_distance(model, t1=0.0)
    with pytest.raises(ValueError, match="`num_nodes` must be a positive int"):
        orbits.canonical_distance(model, num_nodes=0)
    with pytest.raises(ValueError, match=r"`fingerprint` must be \(M, m\) of shapes"):
        orbits.canonical_distance(model, fingerprint=(jnp.eye(2), jnp.zeros(2)))
    with pytest.raises(ValueError, match="eigenvalue -1 on"):  # no canonical gauge exists
        orbits.canonical_distance(model, fingerprint=(-jnp.eye(D), jnp.zeros(D)))
    w = model.weight
    tanh = gj.NeuralODE(lambda t, y, args: jnp.tanh(w(t) @ y), t1=1.0)
    with pytest.raises(ValueError, match="not affine in the state y"):
        orbits.canonical_distance(tanh, dim=D)
