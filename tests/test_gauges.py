"""Neural-ODE gauge families: boundary conditions, invariance (Thm 2.1), group laws, tangents.

Solver tolerance is rtol = atol = 1e-8; output deviations of exact symmetries are asserted below
1e-6 (global error of ~10-20 adaptive steps on an O(1) flow stays within ~100 x the local
tolerance; measured values are ~1e-8). Violations are asserted above 1e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj

from .conftest import small_node


D = 3


@pytest.fixture
def setup(getkey):
    model = small_node(getkey(), D)
    x = jax.random.normal(getkey(), (4, D))
    return model, x, getkey


def field_close(f1, f2, getkey, atol):
    for t in (0.13, 0.5, 0.91):
        y = jax.random.normal(getkey(), (D,))
        np.testing.assert_allclose(
            f1(jnp.asarray(t), y, None), f2(jnp.asarray(t), y, None), atol=atol
        )


def test_spatial_diffeo_boundary_and_invertibility(setup):
    model, x, getkey = setup
    gauge = gj.SpatialDiffeoGauge(D, 1.0, key=getkey(), rho=0.5)
    for _ in range(5):
        psi = gauge.to_map(gauge.sample(getkey()))
        y = jax.random.normal(getkey(), (D,))
        np.testing.assert_array_equal(psi(jnp.asarray(0.0), y), y)
        np.testing.assert_allclose(psi(jnp.asarray(1.0), y), y, atol=1e-15)
        for t in (0.3, 0.5):
            J = jax.jacfwd(lambda y: psi(jnp.asarray(t), y))(y)
            assert jnp.linalg.svd(J, compute_uv=False).min() >= 0.5 - 1e-12


def test_finite_spatial_diffeo_leaves_output_intact(setup):
    model, x, getkey = setup
    gauge = gj.SpatialDiffeoGauge(D, 1.0, key=getkey())
    res = gj.sweep(model, gauge, x, key=getkey(), num_samples=8, chunk_size=4)
    assert res.failures() == {}
    assert res.max_abs.max() < 1e-6, res.summary()


def test_boundary_violating_spatial_diffeo_changes_output_as_predicted(setup):
    model, x, getkey = setup
    gauge = gj.SpatialDiffeoGauge(D, 1.0, key=getkey(), boundary="free")
    g = gauge.sample(getkey())
    new = jax.vmap(gauge.act(g, model))(x)
    old = jax.vmap(model)(x)
    assert jnp.max(jnp.abs(new - old)) > 1e-2
    psi_T_inv = gauge.to_map(gauge.inverse(g))
    predicted = jax.vmap(lambda z: psi_T_inv(jnp.asarray(1.0), z))(old)
    np.testing.assert_allclose(new, predicted, atol=1e-6)


def test_time_reparam_boundary_monotone_and_invariance(setup):
    model, x, getkey = setup
    gauge = gj.TimeReparamGauge(1.0, num_modes=3, rho=0.6)
    grid = jnp.linspace(0.0, 1.0, 101)
    for _ in range(5):
        tau = gauge.to_map(gauge.sample(getkey()))
        slopes = jax.vmap(jax.grad(tau))(grid)
        assert slopes.min() >= 1 - 0.6 - 1e-12
        assert tau(jnp.asarray(0.0)) == 0.0
        np.testing.assert_allclose(tau(jnp.asarray(1.0)), 1.0, atol=1e-15)
    res = gj.sweep(model, gauge, x, key=getkey(), num_samples=8, chunk_size=4)
    assert res.failures() == {}
    assert res.max_abs.max() < 1e-6


def test_boundary_violating_reparam_evaluates_at_tau_T(setup):
    model, x, getkey = setup
    gauge = gj.TimeReparamGauge(1.0, boundary="free", rho=0.9)
    g = gauge.sample(getkey())
    tau_T = gauge.to_map(g)(jnp.asarray(1.0))
    assert abs(tau_T - 1.0) > 1e-3
    new = jax.vmap(gauge.act(g, model))(x)
    predicted = jax.vmap(model.with_options(t1=float(tau_T)))(x)
    # the change is >= 1e3 x the solver tolerance and is exactly x(tau(T))
    assert jnp.max(jnp.abs(new - jax.vmap(model)(x))) > 1e-3
    np.testing.assert_allclose(new, predicted, atol=1e-6)


@pytest.mark.parametrize("family", ["spatial", "time"])
def test_compose_and_inverse(setup, family):
    model, x, getkey = setup
    if family == "spatial":
        gauge = gj.SpatialDiffeoGauge(D, 1.0, key=getkey())
    else:
        gauge = gj.TimeReparamGauge(1.0)
    g1, g2 = gauge.sample(getkey()), gauge.sample(getkey())
    both = gauge.act(gauge.compose(g1, g2), model).field
    stepwise = gauge.act(g2, gauge.act(g1, model)).field
    field_close(both, stepwise, getkey, atol=1e-12)
    # wrong order is a different field
    with pytest.raises(AssertionError):
        field_close(both, gauge.act(g1, gauge.act(g2, model)).field, getkey, atol=1e-6)
    # inverse of a composition undoes it (fixed-point inverses: 1e-10)
    undo = gauge.act(gauge.inverse(gauge.compose(g1, g2)), gauge.act(gauge.compose(g1, g2), model))
    field_close(undo.field, model.field, getkey, atol=1e-10)
    assert gauge.inverse(gauge.inverse(g1)) is g1


def test_finite_family_tangents_are_lie_deformations(setup):
    """Spatial: tangent = Eq. 16 with eps_y = e(t) W phi(y). Time: tangent = d/dt(e0 F)."""
    model, x, getkey = setup
    F = model.field
    sp = gj.SpatialDiffeoGauge(D, 1.0, key=getkey())
    W = sp.sample(getkey())

    def eps_sp(t, y):
        return jnp.zeros(()), sp.base_map(W)(t, y) - y

    deformed = gj.deform(F, eps_sp, 1.0)
    field_close(
        sp.tangent(model, W).field, lambda t, y, a: deformed(t, y, a) - F(t, y, a), getkey, 1e-12
    )

    tr = gj.TimeReparamGauge(1.0)
    c = tr.sample(getkey())

    def eps_t(t, y):
        return tr.base_map(c)(t) - t, jnp.zeros_like(y)

    deformed_t = gj.deform(F, eps_t, 1.0)
    field_close(
        tr.tangent(model, c).field, lambda t, y, a: deformed_t(t, y, a) - F(t, y, a), getkey, 1e-12
    )


def test_lie_deformation_first_order_response_vanishes(setup):
    """Thm 2.1 (sufficiency): boundary-vanishing generators do not move the output (first order)."""
    model, x, getkey = setup
    gauge = gj.LieDeformationGauge(D, 1.0, key=getkey(), time_component=True)
    res = gj.sweep(model, gauge, x, key=getkey(), num_samples=8, chunk_size=4)
    assert res.mode == "first_order"
    assert res.failures() == {}
    assert res.max_abs.max() < 1e-6


def test_lie_deformation_finite_scale_is_second_order(setup):
    model, x, getkey = setup
    gauge = gj.LieDeformationGauge(D, 1.0, key=getkey(), amplitude=0.5)
    g = gauge.sample(getkey())
    scales = [0.2, 0.1, 0.05, 0.025]
    devs = gj.ray_deviations(model, gauge, g, x, scales)
    assert 1.8 < gj.loglog_slope(scales, devs) < 2.2, devs


def test_non_vanishing_generator_response_matches_prediction(setup):
    """Thm 2.1 (necessity): d/ds output = DPhi(z) v(0, z) - v(T, Phi(z)), v = eps_y - F eps0."""
    model, x, getkey = setup
    gauge = gj.LieDeformationGauge(D, 1.0, key=getkey(), boundary="free", time_component=True)
    g = gauge.sample(getkey())
    eps = gauge.generator(g)
    for z, measured in zip(x, gj.gauge_response(model, gauge, g, x)[0], strict=True):
        predicted = gj.first_order_response(model, eps, z)
        assert jnp.max(jnp.abs(measured)) > 1e-2
        # both sides are solves at rtol = atol = 1e-8: agreement to 1e-6 is ~100 x tolerance
        np.testing.assert_allclose(measured, predicted, atol=1e-6)
    # a prediction that forgets the time component (eps0) is measurably wrong
    spatial_only = gj.first_order_response(model, lambda t, y: (0.0, eps(t, y)[1]), x[0])
    measured0 = gj.gauge_response(model, gauge, g, x[:1])[0][0]
    assert jnp.max(jnp.abs(spatial_only - measured0)) > 1e-3


def test_lie_group_laws_and_bad_input(getkey):
    gauge = gj.LieDeformationGauge(D, 1.0, key=getkey())
    g = gauge.sample(getkey())
    zero = gauge.compose(g, gauge.inverse(g))
    assert all(jnp.all(a == 0) for a in jax.tree.leaves(zero))
    with pytest.raises(ValueError, match="boundary"):
        gj.LieDeformationGauge(D, 1.0, key=getkey(), boundary="periodic")
    with pytest.raises(ValueError, match="rho"):
        gj.SpatialDiffeoGauge(D, 1.0, key=getkey(), rho=1.0)
    with pytest.raises(ValueError, match="t1"):
        gj.TimeReparamGauge(-1.0)
    with pytest.raises(TypeError, match="NeuralODE"):
        gauge.act(g, lambda x: x)
