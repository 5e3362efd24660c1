"""few_step_gauge: a learned time reparametrisation makes a few fixed RK4 steps accurate on a
field whose rate is concentrated near t = 0, keeps the exact solution, and is refused for a
family that moves x(T) or bad inputs (before anything compiles)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaugejax as gj


class _Burst(eqx.Module):
    """`dx/dt = a(t) x`, `a(t) = 6 exp(-t / 0.15)`: most of the motion happens early, so
    equal steps in t waste most of their budget late."""

    def __call__(self, t, x, args=None):
        return 6.0 * jnp.exp(-t / 0.15) * x


N = 4


@pytest.fixture(scope="module")
def setup():
    model = gj.NeuralODE(_Burst(), t1=1.0)
    gauge = gj.TimeReparamGauge(1.0, num_modes=4, rho=0.9)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(8, 2)))
    held_out = jnp.asarray(rng.normal(size=(8, 2)))
    return model, gauge, inputs, held_out


@pytest.fixture(scope="module")
def learned(setup):
    model, gauge, inputs, held_out = setup
    return gj.few_step_gauge(
        model, gauge, inputs, num_steps=N, key=jax.random.key(0), held_out=held_out,
        optimizer=optax.adam(1e-2), optimise_steps=150, steps_per_chunk=50, max_steps=8,
    )  # fmt: skip


def test_learned_reparam_lowers_the_few_step_error(setup, learned):
    _, gauge, _, held_out = setup
    # measured: 3.6e-3 -> 7.0e-7 relative error (5.1e3x) on held-out inputs (float64)
    assert learned.error_before > 1e-3
    assert learned.reduction > 500.0
    assert learned.search.final_objective < learned.search.initial_objective
    # the learned map puts its steps early: tau'(s) < 1 near s = 0 (small steps in t there)
    # tau'(0.05), one compiled program (eagerly, a program per op)
    slope = eqx.filter_jit(lambda e: jax.grad(gauge.base_map(e))(jnp.asarray(0.05)))
    assert float(slope(learned.element)) < 0.6  # measured 0.32
    assert learned.errors_after.shape == (held_out.shape[0],)
    assert learned.train_evaluations == 150 * 8 * 4 * N


def test_exact_solution_unchanged(setup, learned):
    held_out = setup[3]
    # tight Tsit5 solves of the gauged and the plain model agree (measured 4.4e-11)
    assert learned.exact_deviation < 1e-10
    # and the reference is the exact solution x(T) = x0 exp(int_0^1 a)
    growth = np.exp(6.0 * 0.15 * (1.0 - np.exp(-1.0 / 0.15)))
    np.testing.assert_allclose(learned.reference, np.asarray(held_out) * growth, rtol=1e-9)


def test_zero_learning_rate_gives_the_plain_error(setup, learned):
    model, gauge, inputs, held_out = setup
    res = gj.few_step_gauge(
        model, gauge, inputs, num_steps=N, key=jax.random.key(0), held_out=held_out,
        optimizer=optax.sgd(0.0), optimise_steps=50, steps_per_chunk=50, max_steps=8,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(res.element), np.zeros(4))
    np.testing.assert_array_equal(res.errors_after, res.errors_before)
    np.testing.assert_array_equal(res.errors_before, learned.errors_before)
    assert res.reduction == 1.0


def _bad(setup, match, exc=ValueError, **changes):
    model, gauge, inputs, held_out = setup
    kwargs = dict(num_steps=N, key=jax.random.key(0), held_out=held_out, max_steps=8)
    args = dict(model=model, gauge=gauge, inputs=inputs)
    for k in list(changes):
        if k in args:
            args[k] = changes.pop(k)
    kwargs.update(changes)
    with pytest.raises(exc, match=match):
        gj.few_step_gauge(args["model"], args["gauge"], args["inputs"], **kwargs)


def test_refusals(setup):
    model, gauge, inputs, held_out = setup
    # a family that moves x(T) (the control: tau(T) != T) is no gauge of the endpoint
    _bad(setup, "must keep x\\(T\\)", gauge=gauge.control())
    diffeo = gj.SpatialDiffeoGauge(2, 1.0, key=jax.random.key(1), boundary="free")
    _bad(setup, "must keep x\\(T\\)", gauge=diffeo)
    assert gj.keeps_endpoint(gj.ComposedGauge(diffeo, gauge)) is False
    assert gj.keeps_endpoint(gj.ComposedGauge(gauge, gauge)) is True
    _bad(setup, "`num_steps` must be an int in \\[1, max_steps = 8\\]; received 9", num_steps=9)
    _bad(setup, "`num_steps`.*received 0", num_steps=0)
    _bad(setup, "`held_out` must be a non-empty batch of states \\(n, 2\\); received shape "
         "\\(8, 3\\)", held_out=jnp.zeros((8, 3)))  # fmt: skip
    _bad(setup, "`inputs` must be finite", inputs=inputs.at[0, 0].set(jnp.nan))
    _bad(setup, "model", exc=TypeError, model=lambda x: x)  # beartype or the own check
    _bad(setup, "`reference_rtol` must be in \\(0, 1\\)", reference_rtol=0.0)
    with pytest.raises(ValueError, match="`reference` must have the inputs' shape"):
        gj.FixedStepErrorObjective(inputs, inputs[:3])
