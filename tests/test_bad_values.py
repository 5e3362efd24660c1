"""Bad values refused with the argument's name, the expected and the received value (issue 22's
probes): each refusal here was, before, an object built from NaN, a NaN result reported as
converged, NaN features, or an error naming the wrong cause. Each has its good case beside it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaugejax as gj


def _mlp():
    return eqx.nn.MLP(3, 2, 4, 2, activation=jax.nn.relu, key=jax.random.key(0))


def test_rescaling_gauge_refuses_a_non_finite_log_scale():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`log_scale` must be a finite number; received"):
            gj.RescalingGauge((4, 4), bad)
    assert gj.RescalingGauge((4, 4), 0.25).log_scale == 0.25
    # traced (a gauge built inside jit): the check rides on the value, raised when it runs
    build = eqx.filter_jit(lambda s: gj.RescalingGauge((4,), s).sample(jax.random.key(0)))
    assert np.all(np.isfinite(build(jnp.asarray(0.5))[0]))
    with pytest.raises(Exception, match="`log_scale` must be a finite number"):
        build(jnp.asarray(jnp.nan))


def test_balance_refuses_a_bad_tolerance_and_does_not_converge_on_nan():
    model = _mlp()
    for bad in (float("nan"), 0.0, -1e-3):
        with pytest.raises(ValueError, match=r"`tol` must be a finite number > 0; received"):
            gj.balance(model, tol=bad)
    good = gj.balance(model)
    assert bool(good.converged) and float(good.max_charge) < 1e-8  # measured 1e-11
    poisoned = eqx.tree_at(lambda m: m.layers[1].weight, model,
                           model.layers[1].weight.at[0, 0].set(jnp.nan))  # fmt: skip
    assert not bool(gj.balance(poisoned).converged)


def test_load_dataset_refuses_noise_that_overflows_or_is_not_finite():
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match=r"`noise` must be a finite number >= 0; received"):
            gj.load_dataset("moons", noise=bad)
    with pytest.raises(ValueError, match=r"`noise` must keep the standardised features finite"):
        gj.load_dataset("moons", noise=1e300)
    data = gj.load_dataset("moons", noise=1e3, num_samples=64)  # large, but representable
    assert np.all(np.isfinite(data.x_train)) and data.x_train.shape == (48, 2)


def test_teleport_names_a_non_finite_batch():
    model = _mlp()
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jnp.arange(8) % 2

    def loss(m, batch):
        xs, ys = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(xs), ys))

    res = gj.teleport(model, loss, (x, y), num_steps=2)
    assert float(res.relative_loss_change) < 1e-12  # measured 1e-16: the function is kept
    with pytest.raises(ValueError, match=r"`batch` must hold finite values only"):
        gj.teleport(model, loss, (x.at[0, 0].set(jnp.nan), y), num_steps=2)
