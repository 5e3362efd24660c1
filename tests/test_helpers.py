"""The shared helpers, one home each: the eager-or-traced value check, the propagator field
(and the propagator over an empty interval), Gauss-Legendre quadrature, the log-log slope, the
time derivative, the gauge response (the forward sensitivity system along a gauge direction),
and the API of convergence studies (`discretize_many`, `ray_deviations`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from gaugejax._core._checks import check_value, is_traced

from .conftest import small_node


# ---------------------------------------------------------------------------- check_value

MESSAGE = "`x` must be > 0."


def _positive(x):
    return check_value(x, lambda: ~(x > 0), MESSAGE, received=lambda: f"Received {x}.")


def test_check_value_raises_now_for_concrete_and_at_run_time_for_traced_values():
    ok = jnp.asarray([1.0, 2.0])
    assert _positive(ok) is ok  # concrete and fine: the value itself, nothing attached
    bad = jnp.asarray([1.0, -2.0])
    with pytest.raises(ValueError, match=r"^`x` must be > 0\. Received \[ 1\. -2\.\]\.$"):
        _positive(bad)
    # NaN fails (the condition is written ~(x > 0))
    with pytest.raises(ValueError, match="must be > 0"):
        _positive(jnp.asarray([jnp.nan]))
    # traced: the same message, when the compiled program runs (eqx.filter_jit and jax.jit)
    np.testing.assert_array_equal(eqx.filter_jit(_positive)(ok), ok)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"`x` must be > 0\."):
        eqx.filter_jit(_positive)(bad)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"`x` must be > 0\."):
        jax.jit(_positive)(bad)
    with pytest.raises(Exception, match=r"`x` must be > 0\."):  # one bad lane fails the batch
        jax.block_until_ready(jax.vmap(_positive)(jnp.asarray([[1.0], [-1.0]])))


def test_check_value_keeps_concrete_conditions_eager_inside_a_trace():
    """A condition on concrete arrays (closed over, or Python numbers) raises while tracing,
    before anything runs; a condition handed over already computed inside the trace cannot."""
    closed = jnp.asarray(-1.0)

    @jax.jit
    def f(y):
        return y + check_value(closed, lambda: ~(closed > 0), MESSAGE, error=TypeError)

    with pytest.raises(TypeError, match=r"^`x` must be > 0\."):
        f(1.0)

    @jax.jit
    def g(y):
        return y + check_value(closed, ~(closed > 0), MESSAGE)  # computed in the trace: traced

    with pytest.raises(jax.errors.JaxRuntimeError, match="must be > 0"):
        g(1.0)
    assert check_value(None, False, MESSAGE) is None  # nothing to attach when concrete
    assert is_traced(None) is False and is_traced((1.0, jnp.ones(2))) is False
    jax.jit(lambda y: is_traced((1.0, y)) or pytest.fail("not seen as traced"))(1.0)


def test_solve_refuses_equal_times_with_one_message_in_both_modes():
    def field(t, y, args):
        return -y

    message = r"`t1` must differ from `t0` \(t1 < t0 integrates backwards\)\."
    with pytest.raises(ValueError, match=message + r" Received t0 = t1 = 0\.5\."):
        gj.solve(field, jnp.ones(2), t0=0.5, t1=0.5)
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        eqx.filter_jit(lambda t: gj.solve(field, jnp.ones(2), t0=t, t1=t)[0])(jnp.asarray(0.5))


# ---------------------------------------------------------------------------- propagators


def _w(t):
    A = jnp.array([[0.0, 1.0, 0.2], [-1.0, 0.1, 0.0], [0.3, 0.0, -0.2]])
    return (1.0 + t) * A


def _b(t):
    return jnp.array([jnp.sin(t), 1.0, t**2])


def test_wilson_line_over_an_empty_interval_is_the_identity_traced_or_not():
    eye = np.eye(3)
    np.testing.assert_array_equal(gj.wilson_line(_w, 0.4, 0.4), eye)  # concrete: no solve
    jitted = jax.jit(lambda a, z: gj.wilson_line(_w, z, a))
    np.testing.assert_array_equal(jitted(0.4, 0.4), eye)  # traced equal times: also identity
    # mixed lanes under vmap: the empty lane is exactly the identity, the others unchanged
    starts, ends = jnp.asarray([0.1, 0.4, 0.9]), jnp.asarray([0.7, 0.4, 0.2])
    lanes = jax.vmap(lambda a, z: gj.wilson_line(_w, z, a))(starts, ends)
    np.testing.assert_array_equal(lanes[1], eye)
    for i in (0, 2):
        np.testing.assert_allclose(
            lanes[i], gj.wilson_line(_w, float(ends[i]), float(starts[i])), rtol=0, atol=1e-14
        )
    assert np.max(np.abs(lanes[0] - eye)) > 0.1  # a real propagator, not the identity
    # the affine propagator likewise: (1, 0) over an empty interval
    U, v = jax.jit(lambda a: gj.affine_propagator(_w, _b, a, a))(0.3)
    np.testing.assert_array_equal(U, eye)
    np.testing.assert_array_equal(v, np.zeros(3))


def test_wilson_line_is_the_affine_propagator_without_bias():
    U, v = gj.affine_propagator(_w, _b, 0.9, 0.1)
    # one field, solved with and without the driven part (whose error also steers the steps)
    np.testing.assert_allclose(gj.wilson_line(_w, 0.9, 0.1), U, rtol=0, atol=1e-10)
    assert np.max(np.abs(v)) > 0.1
    # the backward line inverts the forward one
    np.testing.assert_allclose(gj.wilson_line(_w, 0.1, 0.9) @ U, np.eye(3), atol=1e-9)


# ---------------------------------------------------------------------------- quadrature


@pytest.mark.parametrize("num_nodes", [1, 3, 8])
def test_gauss_legendre_is_exact_to_degree_2n_minus_1(num_nodes):
    t0, t1 = -0.3, 1.7
    ts, ws = gj.gauss_legendre(t0, t1, num_nodes)
    assert ts.shape == ws.shape == (num_nodes,) and ts.dtype == jnp.float64
    assert bool(jnp.all((ts > t0) & (ts < t1)))
    for degree in range(2 * num_nodes):
        exact = (t1 ** (degree + 1) - t0 ** (degree + 1)) / (degree + 1)
        got = gj.quadrature(lambda t: t**degree, t0, t1, num_nodes)
        assert abs(float(got) - exact) <= 1e-14 * max(1.0, abs(exact)), (degree, got, exact)
    # degree 2n is the first it misses (the error constant of Gauss-Legendre is not zero)
    degree = 2 * num_nodes
    exact = (t1 ** (degree + 1) - t0 ** (degree + 1)) / (degree + 1)
    assert abs(float(gj.quadrature(lambda t: t**degree, t0, t1, num_nodes)) - exact) > 1e-6


def test_quadrature_integrates_pytrees_and_smooth_functions_and_refuses_bad_input():
    integral = gj.quadrature(lambda t: (jnp.exp(t), jnp.stack([t, jnp.cos(t)])), 0.0, 1.0, 16)
    np.testing.assert_allclose(integral[0], np.e - 1, rtol=1e-14)
    np.testing.assert_allclose(integral[1], [0.5, np.sin(1.0)], rtol=1e-14)
    # the oriented integral for t1 < t0, and the dtype asked for
    assert float(gj.quadrature(lambda t: t, 1.0, 0.0, 2)) == pytest.approx(-0.5, abs=1e-15)
    assert gj.gauss_legendre(0.0, 1.0, 4, dtype=jnp.float32)[1].dtype == jnp.float32
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match="`num_nodes` must be a positive int"):
            gj.gauss_legendre(0.0, 1.0, bad)
    with pytest.raises(ValueError, match="interval must be finite"):
        gj.quadrature(lambda t: t, 0.0, float("inf"), 4)


# ---------------------------------------------------------------------------- slopes, derivatives


def test_loglog_slope_recovers_power_laws_and_refuses_bad_input():
    xs = [0.1, 0.05, 0.025, 0.0125]
    for p in (-4.0, 1.0, 2.0):
        assert gj.loglog_slope(xs, [3.0 * x**p for x in xs]) == pytest.approx(p, abs=1e-12)
    assert gj.loglog_slope(np.array([8, 16, 32]), np.array([1e-2, 2.5e-3, 6.25e-4])) == (
        pytest.approx(-2.0, abs=1e-12)
    )
    with pytest.raises(ValueError, match="one length"):
        gj.loglog_slope([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least two distinct"):
        gj.loglog_slope([1.0], [1.0])
    with pytest.raises(ValueError, match="at least two distinct"):
        gj.loglog_slope([2.0, 2.0], [1.0, 3.0])
    with pytest.raises(ValueError, match="`ys` must be positive and finite"):
        gj.loglog_slope([1.0, 2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="`xs` must be positive and finite"):
        gj.loglog_slope([1.0, float("nan")], [1.0, 2.0])


def test_time_derivative_is_the_exact_derivative_in_t():
    value, rate = gj.time_derivative(lambda t: (jnp.sin(t) * jnp.eye(2), t**3), 0.7)
    np.testing.assert_allclose(value[0], np.sin(0.7) * np.eye(2), rtol=1e-15)
    np.testing.assert_allclose(rate[0], np.cos(0.7) * np.eye(2), rtol=1e-15)
    assert float(rate[1]) == pytest.approx(3 * 0.7**2, rel=1e-15)
    value, rate = gj.time_derivative(lambda t: t**2, 3)  # an int time is cast to a float
    assert float(value) == 9.0 and float(rate) == 6.0 and rate.dtype == jnp.float64


# ---------------------------------------------------------------------------- gauge response


def test_gauge_response_is_the_first_order_change_of_the_output():
    model = small_node(jax.random.key(0), rtol=1e-12)
    x = jax.random.normal(jax.random.key(1), (3, 3))
    free = gj.LieDeformationGauge(3, 1.0, key=jax.random.key(2), boundary="free")
    g = free.sample(jax.random.key(3))
    dx, stats = gj.gauge_response(model, free, g, x)
    assert dx.shape == x.shape and stats.num_steps.shape == (3,)
    # against a central difference of the finite action (O(h^2) = 1e-6, solves to 1e-12)
    h = 1e-3

    def moved(s):
        return jax.vmap(free.act(jax.tree.map(lambda a: s * a, g), model))(x)

    central = (moved(h) - moved(-h)) / (2 * h)
    assert float(jnp.max(jnp.abs(dx))) > 1e-2  # a real response: the generator is free
    np.testing.assert_allclose(dx, central, atol=1e-6)
    # the sweep's first-order lane reports the same numbers (both ask the model)
    lane = gj.sweep_lane(model, free, x)
    key = jax.random.key(4)
    dx_lane = gj.gauge_response(model, free, free.sample(key), x)[0]
    # the same maths, compiled apart (the lane inside jit): equal to 1 ulp (measured 1.3e-16)
    np.testing.assert_allclose(lane(key)["max_abs"], jnp.max(jnp.abs(dx_lane)), rtol=1e-15)
    # a model without solves answers by a jvp: a linear map moved along a rescaling
    mlp = eqx.nn.MLP(3, 2, 4, 1, activation=jax.nn.relu, key=jax.random.key(5))
    rescaling = gj.RescalingGauge.from_model(mlp)
    direction = jax.tree.map(jnp.ones_like, rescaling.identity())
    dy, none = gj.gauge_response(mlp, rescaling, direction, x)
    assert none is None and float(jnp.max(jnp.abs(dy))) < 1e-14  # ReLU: a symmetry
    # a generator vanishing at t0 and t1 is a symmetry: the response is solver noise
    vanishing = gj.LieDeformationGauge(3, 1.0, key=jax.random.key(2))
    g0 = vanishing.sample(jax.random.key(3))
    dx0 = gj.gauge_response(model, vanishing, g0, x)[0]
    assert float(jnp.max(jnp.abs(dx0))) < 1e-6
    # the field it solves: (F, D_p F dp + D_y F dy) of the moved field
    field = gj.gauge_sensitivity(model, free, g)
    y, dy = x[0], jnp.ones(3)
    f, df = field(0.3, (y, dy), None)
    np.testing.assert_array_equal(f, model.field(0.3, y, None))
    expected = jax.jvp(
        lambda a, y_: free.act(a, model).field(0.3, y_, None), (free.identity(), y), (g, dy)
    )[1]
    np.testing.assert_allclose(df, expected, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------- API for studies


def test_discretize_many_equals_discretize_for_each_number_of_layers():
    counts = [1, 3, 4]
    many = gj.discretize_many(_w, _b, 1.0, counts)
    assert [W.shape for W, _ in many] == [(n, 3, 3) for n in counts]
    for n, (W, b) in zip(counts, many, strict=True):
        W1, b1 = gj.discretize(_w, _b, 1.0, n)
        np.testing.assert_allclose(W, W1, rtol=0, atol=1e-14)
        np.testing.assert_allclose(b, b1, rtol=0, atol=1e-14)
    # the product of the layers is the propagator over [0, 1] (Eq. 32)
    U = np.linalg.multi_dot(list(many[1][0][::-1]))
    np.testing.assert_allclose(U, gj.wilson_line(_w, 1.0, 0.0), atol=1e-9)
    with pytest.raises(ValueError, match="at least one"):
        gj.discretize_many(_w, _b, 1.0, [])
    with pytest.raises(ValueError, match="num_layers"):
        gj.discretize_many(_w, _b, 1.0, [2, 0])


def test_ray_deviations_measure_the_order_of_a_symmetry():
    model = small_node(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 3))
    scales = jnp.asarray([0.2, 0.1, 0.05, 0.025])
    orders = {}
    for boundary in ("vanishing", "free"):
        gauge = gj.LieDeformationGauge(3, 1.0, key=jax.random.key(2), boundary=boundary)
        g = gauge.sample(jax.random.key(3))
        devs = gj.ray_deviations(model, gauge, g, x, scales)
        assert devs.shape == (4,)
        # each entry is the finite deviation at that scale (here g_s = s g: identity is zero)
        moved = gauge.act(jax.tree.map(lambda a: 0.1 * a, g), model)
        expected = jnp.max(jnp.abs(jax.vmap(moved)(x) - jax.vmap(model)(x)))
        np.testing.assert_allclose(devs[1], expected, rtol=1e-12)
        orders[boundary] = gj.loglog_slope(scales, devs)
    # Thm 2.1: a vanishing generator moves the output at O(s^2), a free one at O(s)
    assert abs(orders["vanishing"] - 2) < 0.2 and abs(orders["free"] - 1) < 0.2, orders
    # the identity itself (s = 0) deviates by rounding only (its field is evaluated wrapped)
    gauge = gj.LieDeformationGauge(3, 1.0, key=jax.random.key(2))
    zero = gj.ray_deviations(model, gauge, gauge.sample(jax.random.key(3)), x, [0.0])
    assert float(zero[0]) < 1e-14
