"""The trajectory observable (issue 22, item 3): a neural ODE observed at `observation_times`
(diffrax's `SaveAt(ts=...)`) has the gauge group of maps that are the identity at every
observation time; the boundary-only families (x(T) kept) break it.

Shapes and models are those of `tests/test_contract.py`'s trajectory cases (D = 3, 2 inputs, 4
samples in one chunk; tolerances are traced), so a worker that ran those reuses the programs.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj

from .conftest import small_node


D = 3
TS = (0.15, 0.3, 0.5, 0.7, 0.85)  # 5 interior observation times


def _model(rtol=1e-8):
    return small_node(jax.random.key(1), D, rtol=rtol).with_options(observation_times=TS)


def _inputs():
    return jax.random.normal(jax.random.key(2), (2, D))


FAMILIES = {
    "spatial": lambda k, **kw: gj.SpatialDiffeoGauge(D, 1.0, key=k, **kw),
    "time": lambda k, **kw: gj.TimeReparamGauge(1.0, **kw),
    "lie": lambda k, **kw: gj.LieDeformationGauge(D, 1.0, key=k, **kw),
}


@pytest.mark.parametrize(
    "times, error, says",
    [
        ((0.5, 0.2), ValueError, "strictly increasing"),
        ((0.2, 0.2), ValueError, "0.2 after 0.2"),
        ((0.0, 0.5), ValueError, r"must lie in \(t0, t1\] = \(0.0, 1.0\]"),
        ((0.5, 1.5), ValueError, "1.5 is outside"),
        ((), ValueError, "at least one time"),
        ("0.5", TypeError, "sequence of Python numbers"),
    ],
)
def test_observation_times_are_validated(times, error, says):
    field = gj.MLPField(D, 4, 1, key=jax.random.key(0))
    with pytest.raises(error, match=r"`observation_times`.*" + says):
        gj.NeuralODE(field, t1=1.0, observation_times=times)
    for make in FAMILIES.values():
        with pytest.raises(error, match=r"`observation_times`.*" + says):
            make(jax.random.key(0), observation_times=times)
    # negative case: valid times are kept as a tuple of floats (t1 itself may be observed)
    assert gj.NeuralODE(field, t1=1.0, observation_times=[0.5, 1]).observation_times == (0.5, 1.0)


def test_trajectory_families_refuse_other_observables():
    model = _model()
    with pytest.raises(ValueError, match=r"observation_times.*\(0.0, 0.5\].*0.7 is outside"):
        model.with_options(t1=0.5)  # the times must stay inside the new interval
    for make in FAMILIES.values():
        gauge = make(jax.random.key(0), observation_times=TS)
        assert gauge.observation_times == TS
        with pytest.raises(ValueError, match=r"observes x\(t1\) only"):
            gauge.check_model(small_node(jax.random.key(1), D))
        with pytest.raises(ValueError, match="observation times"):
            gauge.check_model(model.with_options(observation_times=(0.5, 1.0)))
        with pytest.raises(ValueError, match="needs `boundary` = 'vanishing'"):
            make(jax.random.key(0), observation_times=TS, boundary="free")
        gauge.check_model(model)  # negative case: the model's own times are accepted
        make(jax.random.key(0)).check_model(model)  # and x(T) families act on it too


def test_the_model_observes_its_saved_trajectory():
    model, x = _model(), _inputs()
    out, stats = model.observe(x)
    assert out.shape == (2, len(TS), D) and stats.num_steps.shape == (2,)
    saved = jax.vmap(lambda z: model.solve(z, diffrax.SaveAt(ts=jnp.asarray(TS)))[0])(x)
    np.testing.assert_array_equal(out, saved)
    tight, how = model.tightened(jnp.float64)
    assert tight.observation_times == TS and "1.0e-11" in how
    # negative case: without observation times the observable is x(t1), bitwise as before
    plain = small_node(jax.random.key(1), D)
    assert plain.observation_times is None
    got = plain.observe(x)[0]
    controller = diffrax.PIDController(rtol=1e-8, atol=1e-8)
    want = jax.vmap(lambda z: gj.solve(plain.field, z, t1=1.0, stepsize_controller=controller)[0])(
        x
    )
    assert got.shape == (2, D)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(out[:, -1], got)  # x(0.85) is not x(1)


# measured (float64, rtol 1e-8, these keys; floor 2.4e-8): max relative deviation of the
# trajectory family (1.3x, 1.5x, 10.4x the floor) and min of its boundary-only control
MEASURED = {"lie": (3.1e-8, 4.9e-2), "spatial": (3.6e-8, 2.0e-2), "time": (2.5e-7, 6.0e-3)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_trajectory_families_hold_and_the_boundary_only_family_breaks(name):
    deviation, breaking = MEASURED[name]
    model, x = _model(), _inputs()
    gauge = FAMILIES[name](jax.random.key(0), observation_times=TS)
    kw = dict(key=jax.random.key(4), num_samples=4, chunk_size=4)
    res = gj.sweep(model, gauge, x, control_samples=4, **kw)
    assert res.verdict == "holds", res.verdict_reason
    assert res.max_rel.max() <= 30 * res.floor, res.verdict_reason
    assert res.max_rel.max() < 10 * deviation, res.verdict_reason
    # the x(T)-only family (the identity at 0 and T only) moves the interior saved states
    broken = gj.sweep(model, gauge.control(), x, control_samples=0, **kw)
    assert broken.verdict == "broken", broken.verdict_reason
    assert broken.max_rel.min() > max(1e-3, breaking / 10), broken.max_rel


def test_first_order_response_at_every_observation_time():
    """Thm 2.1 generalised: the measured first-order response at each t_i is `DPhi_{t_i}(z)
    v(0, z) - v(t_i, Phi_{t_i}(z))`; it vanishes for a generator vanishing at every t_i."""
    model, x = _model(rtol=1e-10), _inputs()
    gauge = gj.LieDeformationGauge(D, 1.0, key=jax.random.key(0), observation_times=TS)
    only = gauge.control()  # vanishing at 0 and T only
    g = gauge.sample(jax.random.key(3))

    @jax.jit
    def responses(g):
        measured = [gj.gauge_response(model, fam, g, x)[0] for fam in (gauge, only)]
        predicted = jax.vmap(lambda z: gj.first_order_response(model, only.generator(g), z))(x)
        return *measured, predicted

    kept, moved, predicted = responses(g)
    assert kept.shape == moved.shape == predicted.shape == (2, len(TS), D)
    # measured (rtol 1e-10): kept 4.1e-10; moved 7.6e-2 at the least-moved observation time;
    # prediction error 5.4e-10
    assert float(jnp.max(jnp.abs(kept))) < 4e-9
    assert float(jnp.min(jnp.max(jnp.abs(moved), axis=(0, 2)))) > 1e-2
    np.testing.assert_allclose(moved, predicted, atol=5e-9)
