"""Bad values refused with the argument's name, the expected and the received value (issue 22's
probes): each refusal here was, before, an object built from NaN, a NaN result reported as
converged, NaN features, or an error naming the wrong cause. Each has its good case beside it."""

import warnings

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
    # the refusal is the only message: numpy's overflow warnings from inside scikit-learn
    # (four of them before) would fail here as errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"`noise` must keep the standardised features"):
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


class _ZeroBelow(gj.gauges.AbstractParameterGauge):
    """A user's family: the rescaling gauge, but a sample whose uniform draw falls below
    `below` has one factor exactly 0 (finite, refused by the rescaling's own value check), and
    with `nan`, a NaN factor instead."""

    inner: gj.RescalingGauge
    below: float
    nan: bool = False
    infinitesimal = False

    def check_model(self, model):
        self.inner.check_model(model)

    def sample(self, key):
        g = self.inner.sample(key)
        bad = jax.random.uniform(jax.random.fold_in(key, 7)) < self.below
        value = jnp.nan if self.nan else 0.0
        return (jnp.where(bad, g[0].at[0].set(value), g[0]), *g[1:])

    def act(self, g, model):
        return self.inner.act(g, model)

    def identity(self):
        return self.inner.identity()

    def inverse(self, g):
        return self.inner.inverse(g)

    def compose(self, g1, g2):
        return self.inner.compose(g1, g2)

    def control(self):
        return None


def test_a_sweep_fails_bad_gauge_elements_per_lane():
    """Elements the family's own value check refuses (a factor 0, inf or NaN) fail their lane
    with a status code and leave the other lanes measured: before, the check's `eqx.error_if`
    fired inside the vmapped lane and the whole sweep died with `JaxRuntimeError: INTERNAL:
    CpuCallback error`. Outside a sweep the same element still raises, naming the check."""
    mlp = eqx.nn.MLP(3, 2, 8, 2, activation=jax.nn.relu, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    key = jax.random.key(2)
    # log-scales ~1e3: exp overflows to inf or underflows to 0 in every sample
    huge = gj.sweep(mlp, gj.RescalingGauge((8, 8), 1e3), x, key=key, num_samples=8, chunk_size=8)
    assert huge.failures() == {"singular_gauge": 8} and huge.verdict == "inconclusive"
    gauge = gj.RescalingGauge((8, 8))
    zero = gj.sweep(mlp, _ZeroBelow(gauge, 0.5), x, key=key, num_samples=16, chunk_size=8,
                    control_samples=0)  # fmt: skip
    nan = gj.sweep(mlp, _ZeroBelow(gauge, 0.5, nan=True), x, key=key, num_samples=16,
                   chunk_size=8, control_samples=0)  # fmt: skip
    # measured: 5 of the 16 draws fall below 0.5 (the same draws in both)
    assert zero.failures() == {"nonfinite_output": 5}  # a finite 0: the check's NaN outputs
    assert nan.failures() == {"singular_gauge": 5}
    np.testing.assert_array_equal(zero.ok, nan.ok)
    assert np.nanmax(zero.max_rel) < 3e-15  # the good lanes measured: 2.9e-16
    good = gj.sweep(mlp, gauge, x, key=key, num_samples=16, chunk_size=8)
    assert good.failures() == {} and good.verdict == "holds", good.verdict_reason
    bad = (gauge.sample(key)[0].at[0].set(0.0), gauge.sample(key)[1])
    with pytest.raises(Exception, match=r"rescaling factors must be > 0 \(and finite\)"):
        jax.block_until_ready(eqx.filter_jit(gauge.act)(bad, mlp))


class _Func(eqx.Module):  # diffrax's documentation's field: its state dimension is the MLP's
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def test_a_field_family_names_its_dim_and_the_models_interval_type():
    """A field family of `dim` 3 on a model of state dimension 2 is refused by `check_model`
    naming both (before: "could not be evaluated on `inputs`" from inside the sweep), and a
    model with `t1=jnp.asarray(1.0)` is refused naming `t1`, the Python float it must be and
    what it is (before: a ConcretizationTypeError from `float(t1)` while tracing the sweep)."""
    k = jax.random.split(jax.random.key(0), 3)
    model = gj.NeuralODE(_Func(eqx.nn.MLP(2, 2, 8, 1, key=k[0])), t1=1.0)
    x = jax.random.normal(k[1], (3, 2))
    for family in (gj.SpatialDiffeoGauge, gj.LieDeformationGauge):
        wrong = family(3, 1.0, key=k[2])
        with pytest.raises(ValueError, match=r"has `dim` = 3 .* takes states of dimension 2 "):
            wrong.check_model(model)
        with pytest.raises(ValueError, match=r"has `dim` = 3 .* takes states of dimension 2 "):
            gj.sweep(model, wrong, x, key=k[2], num_samples=2)
        family(2, 1.0, key=k[2]).check_model(model)  # the right dim is accepted
    gauge = gj.SpatialDiffeoGauge(2, 1.0, key=k[2])
    array_t1 = model.with_options(t1=jnp.asarray(1.0))
    with pytest.raises(TypeError, match=r"the model's `t1` as a Python float .* received Array"):
        gauge.check_model(array_t1)
    with pytest.raises(TypeError, match=r"the model's `t1` as a Python float"):
        gj.sweep(array_t1, gauge, x, key=k[2], num_samples=2)
    gauge.check_model(model)  # a Python float is accepted
