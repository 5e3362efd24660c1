"""Eq. 45 and the canonical (uniform-motion) gauge of linear neural ODEs.

Quadrature of smooth integrands with 32 Gauss nodes is exact to roundoff (1e-12 asserted);
solved I/O maps use rtol = atol = 1e-11 (1e-8 asserted).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


D, T = 3, 1.5


def test_eq45_closed_form_for_constant_fields():
    a, b0 = 0.7, jnp.array([0.3, -1.2, 0.5])
    penalty = gj.linear_gauge_fixing_penalty(
        lambda t: a * jnp.eye(D), lambda t: b0, T, strength=2.0
    )
    closed = 2.0 * T * (D * a**4 + a**2 * jnp.sum(b0**2))
    np.testing.assert_allclose(penalty, closed, rtol=1e-12)


def test_eq45_vanishes_on_uniform_motion_and_not_elsewhere():
    c = jnp.array([1.0, -2.0, 0.5])
    zero = gj.linear_gauge_fixing_penalty(lambda t: jnp.eye(D) / (t + 1), lambda t: c / (t + 1), T)
    assert abs(float(zero)) < 1e-12
    other = gj.linear_gauge_fixing_penalty(lambda t: jnp.eye(D) / (t + 2), lambda t: c, T)
    assert other > 1e-2
    with pytest.raises(ValueError, match="strength"):
        gj.linear_gauge_fixing_penalty(lambda t: jnp.eye(D), lambda t: c, T, strength=-1.0)


def _time_gauge(S):
    """`G(t) = expm(sin(pi t / T) S)`, `c = 0`: a rotation path for antisymmetric S."""
    return lambda t: jax.scipy.linalg.expm(jnp.sin(jnp.pi * t / T) * S), lambda t: jnp.zeros(D)


def test_rotation_covariant_penalty_is_invariant_under_rotations_only():
    """Footnote 12: `int |(d/dt - w) b|^2` is invariant under Eq. 25 with rotations G(t) in
    SO(d), c = 0 (1e-10 relative: the 32-node quadrature of smooth integrands is exact to
    roundoff, and expm/solve add a few ulps), not under a GL(d) path (its symmetric part
    rescales b), nor with a shift c != 0; Eq. 45 is not invariant even under rotations (its
    `(d/dt + w) b` is not covariant). The changes that must be there are O(0.1-1): > 1e-3."""
    model = gj.random_linear_node(D, T, key=jax.random.key(7))
    w, b = model.weight, model.bias
    k1, k2 = jax.random.split(jax.random.key(8))
    A = jax.random.normal(k1, (D, D))
    G_rot, c0 = _time_gauge(A - A.T)
    G_gl, _ = _time_gauge(A + A.T)
    base_cov = gj.rotation_covariant_penalty(w, b, T)
    base_eq45 = gj.linear_gauge_fixing_penalty(w, b, T)
    rot = gj.linear_gauge_transform(w, b, G_rot, c0)
    gl = gj.linear_gauge_transform(w, b, G_gl, c0)
    shifted = gj.linear_gauge_transform(
        w, b, G_rot, lambda t: jnp.sin(jnp.pi * t / T) * jax.random.normal(k2, (D,))
    )
    orthogonal = G_rot(0.4)
    np.testing.assert_allclose(orthogonal.T @ orthogonal, jnp.eye(D), atol=1e-13)
    rel = lambda a, b: float(abs(a - b) / abs(b))  # noqa: E731
    assert base_cov > 1e-2 and base_eq45 > 1e-2
    assert rel(gj.rotation_covariant_penalty(*rot, T), base_cov) < 1e-10
    assert rel(gj.rotation_covariant_penalty(*gl, T), base_cov) > 1e-3
    assert rel(gj.rotation_covariant_penalty(*shifted, T), base_cov) > 1e-3
    assert rel(gj.linear_gauge_fixing_penalty(*rot, T), base_eq45) > 1e-3
    # closed form for constant fields: |(d/dt - w) b0|^2 T = |w b0|^2 T
    a, b0 = 0.7, jnp.array([0.3, -1.2, 0.5])
    const = gj.rotation_covariant_penalty(lambda t: a * jnp.eye(D), lambda t: b0, T, strength=2.0)
    np.testing.assert_allclose(const, 2.0 * T * a**2 * jnp.sum(b0**2), rtol=1e-12)
    # the library's rotation family (antisymmetric modes, c = 0) against its GL(d) default
    for kind in ("expm", "cayley"):
        so = gj.LinearGauge(D, T, group="SO", kind=kind, rho=0.9)
        g = so.sample(k2)
        G = so.base_map(g).G(0.7)
        np.testing.assert_allclose(G.T @ G, jnp.eye(D), atol=1e-13)
        np.testing.assert_allclose(jnp.linalg.det(G), 1.0, atol=1e-13)
        moved = so.act(g, model)
        assert rel(gj.rotation_covariant_penalty(moved.weight, moved.bias, T), base_cov) < 1e-10
    general = gj.LinearGauge(D, T, rho=0.9)
    moved = general.act(general.sample(k2), model)
    assert rel(gj.rotation_covariant_penalty(moved.weight, moved.bias, T), base_cov) > 1e-3
    with pytest.raises(ValueError, match="`group` must be 'GL' or 'SO'; received 'O'"):
        gj.LinearGauge(D, T, group="O")
    # through the training-loss entry point: the same number, and only for affine fields
    via = gj.gauge_fixing_penalty("rotation_covariant", model, jnp.zeros((2, D)))
    np.testing.assert_allclose(via, base_cov, rtol=1e-12)
    mlp = gj.NeuralODE(gj.MLPField(D, 8, 1, key=k2), t1=T)
    with pytest.raises(TypeError, match="'rotation_covariant' \\(footnote 12\\).*affine"):
        gj.gauge_fixing_penalty("rotation_covariant", mlp, jnp.ones((2, D)))
    with pytest.raises(ValueError, match="strength"):
        gj.rotation_covariant_penalty(w, b, T, strength=-0.1)


def test_canonical_gauge_has_zero_penalty_and_the_same_io_map():
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    model = gj.random_linear_node(D, T, key=jax.random.key(3), stepsize_controller=tight)
    M, m = gj.affine_propagator(model.weight, model.bias, T, 0.0)
    w, b = gj.canonical_gauge(M, m, T)
    assert abs(float(gj.linear_gauge_fixing_penalty(w, b, T))) < 1e-12
    canonical = model.with_field(gj.FunctionLinearField(w, b))
    x = jax.random.normal(jax.random.key(4), (5, D))
    np.testing.assert_allclose(jax.vmap(canonical)(x), jax.vmap(model)(x), atol=1e-8)
    # the original and a gauge-transformed copy are on the same orbit but not canonical
    gauge = gj.LinearGauge(D, T)
    moved = gauge.act(gauge.sample(jax.random.key(5)), canonical)
    assert gj.linear_gauge_fixing_penalty(moved.weight, moved.bias, T) > 1e-3
    assert gj.linear_gauge_fixing_penalty(model.weight, model.bias, T) > 1e-3


def test_canonical_gauge_existence_condition():
    with pytest.raises(ValueError, match="eigenvalue -0.5"):
        gj.canonical_gauge(jnp.diag(jnp.array([1.0, -0.5, 2.0])), jnp.zeros(D), T)
    with pytest.raises(ValueError, match=r"\(-inf, 0\]"):
        gj.canonical_gauge(jnp.diag(jnp.array([1.0, 0.0, 2.0])), jnp.zeros(D), T)
    # complex eigenvalues (a rotation) are fine
    rot = jnp.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    gj.canonical_gauge(rot, jnp.zeros(D), T)


def test_trajectory_regularisers_closed_forms():
    """dx/dt = a x: int |F|^2 = a^2 |x0|^2 (e^{2aT} - 1)/(2a); d/dt F = a^2 x; d^3x/dt^3 = a^3 x;
    J = a I."""
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    a = 0.7
    field = gj.FunctionLinearField(lambda t: a * jnp.eye(D), lambda t: jnp.zeros(D))
    model = gj.LinearNODE(field, t1=T, stepsize_controller=tight)
    x0 = jnp.array([1.0, -0.5, 2.0])
    terms = ("kinetic", "jacobian", "uniform_motion", "r3")
    x1, integrals = gj.integrate_regularizers(model, x0, terms, probe=jnp.ones(D))
    grow = (jnp.exp(2 * a * T) - 1) / (2 * a) * jnp.sum(x0**2)
    np.testing.assert_allclose(x1, x0 * jnp.exp(a * T), rtol=1e-9)
    np.testing.assert_allclose(integrals["kinetic"], a**2 * grow, rtol=1e-9)
    np.testing.assert_allclose(integrals["uniform_motion"], a**4 * grow, rtol=1e-9)
    np.testing.assert_allclose(integrals["jacobian"], a**2 * D * T, rtol=1e-9)
    np.testing.assert_allclose(integrals["r3"], a**6 * grow, rtol=1e-9)


def test_r3_on_polynomial_fields_is_taynodes_closed_form():
    """dx/dt = x^2 from x0: x(t) = x0 / (1 - x0 t), x'' = 2 x^3, x''' = 6 x^4, so
    `int_0^T |x''|^2 = 4 x0^5 ((1 - x0 T)^-5 - 1) / 5` and `int_0^T |x'''|^2 = 36 x0^7 ((1 -
    x0 T)^-7 - 1) / 7` (TayNODE's R_2 and R_3). And dx/dt = 2 t (x = x0 + t^2, uniformly
    accelerated): R_2 = 4 T, while R_3 vanishes (the case that tells R_3 from R_2)."""
    tight = diffrax.PIDController(rtol=1e-12, atol=1e-12)
    terms = ("uniform_motion", "r3")
    model = gj.NeuralODE(lambda t, y, args: y**2, t1=1.0, stepsize_controller=tight)
    _, got = gj.integrate_regularizers(model, jnp.array([0.5]), terms)
    np.testing.assert_allclose(got["uniform_motion"], 4 * 0.5**5 * (0.5**-5 - 1) / 5, rtol=1e-9)
    np.testing.assert_allclose(got["r3"], 36 * 0.5**7 * (0.5**-7 - 1) / 7, rtol=1e-9)
    accelerated = model.with_field(lambda t, y, args: 2 * t * jnp.ones_like(y))
    _, got = gj.integrate_regularizers(accelerated, jnp.array([0.5]), terms)
    np.testing.assert_allclose(got["uniform_motion"], 4.0, rtol=1e-12)
    assert abs(float(got["r3"])) < 1e-20  # measured 0.0


def test_hutchinson_probes_sum_to_the_frobenius_integral():
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    model = gj.random_linear_node(D, T, key=jax.random.key(6), stepsize_controller=tight)
    x0 = jnp.ones(D)
    total = sum(
        gj.integrate_regularizers(model, x0, ("jacobian",), probe=e)[1]["jacobian"]
        for e in jnp.eye(D)
    )
    exact = gj.quadrature(lambda t: jnp.sum(model.weight(t) ** 2), 0.0, T, 32)
    np.testing.assert_allclose(total, exact, rtol=1e-9)
    with pytest.raises(ValueError, match="needs a `key`"):
        gj.integrate_regularizers(model, x0, ("jacobian",))
    with pytest.raises(ValueError, match=r"unknown regulariser\(s\) \['speed'\]"):
        gj.integrate_regularizers(model, x0, ("speed",))


def test_uniform_motion_vanishes_on_the_canonical_gauge_trajectories():
    """Eq. 43 along trajectories and Eq. 45 select the same representative of a linear orbit."""
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    model = gj.random_linear_node(D, T, key=jax.random.key(7), stepsize_controller=tight)
    M, m = gj.affine_propagator(model.weight, model.bias, T, 0.0)
    canonical = model.with_field(gj.FunctionLinearField(*gj.canonical_gauge(M, m, T)))
    for x0 in jax.random.normal(jax.random.key(8), (3, D)):
        on = gj.integrate_regularizers(canonical, x0, ("uniform_motion",))[1]["uniform_motion"]
        off = gj.integrate_regularizers(model, x0, ("uniform_motion",))[1]["uniform_motion"]
        assert abs(float(on)) < 1e-12 and off > 1e-3


def test_gauge_fixing_penalty_matches_its_parts_and_refuses_mismatches():
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    model = gj.random_linear_node(D, T, key=jax.random.key(7), stepsize_controller=tight)
    xs = jax.random.normal(jax.random.key(8), (3, D))
    eq45 = gj.gauge_fixing_penalty("eq45", model, xs)
    direct = gj.linear_gauge_fixing_penalty(model.weight, model.bias, T)
    assert abs(float(eq45 - direct)) < 1e-12 and eq45 > 1e-3
    # the trajectory terms are the input-mean of integrate_regularizers (same solve; 1e-12)
    kinetic = gj.gauge_fixing_penalty("kinetic", model, xs)
    parts = [gj.integrate_regularizers(model, x, ("kinetic",))[1]["kinetic"] for x in xs]
    assert abs(float(kinetic) - float(np.mean(parts))) < 1e-12
    key = jax.random.key(9)
    jac = gj.gauge_fixing_penalty("jacobian", model, xs, key=key)
    keys = jax.random.split(key, len(xs))
    parts = [
        gj.integrate_regularizers(model, x, ("jacobian",), key=k)[1]["jacobian"]
        for x, k in zip(xs, keys, strict=True)
    ]
    assert abs(float(jac) - float(np.mean(parts))) < 1e-12 and jac > 1e-3
    M, m = gj.affine_propagator(model.weight, model.bias, T, 0.0)
    canonical = model.with_field(gj.FunctionLinearField(*gj.canonical_gauge(M, m, T)))
    assert abs(float(gj.gauge_fixing_penalty("uniform_motion", canonical, xs))) < 1e-12
    mlp = gj.NeuralODE(gj.MLPField(D, 8, 1, key=jax.random.key(0)), t1=T)
    with pytest.raises(TypeError, match="'eq45'.*LinearNODE.*MLPField.*uniform_motion"):
        gj.gauge_fixing_penalty("eq45", mlp, xs)
    assert gj.gauge_fixing_penalty("uniform_motion", mlp, xs) > 0  # any field is fine there
    with pytest.raises(ValueError, match=r"unknown regulariser 'rnode'.*'kinetic'"):
        gj.gauge_fixing_penalty("rnode", model, xs)
    with pytest.raises(ValueError, match="needs a `key`"):
        gj.gauge_fixing_penalty("jacobian", model, xs)


class _CubicModule(eqx.Module):
    """`F(t, y) = (1 + t) a y + c + k y^3`: affine in y for k = 0 only (k an array)."""

    a: jax.Array
    c: jax.Array
    k: jax.Array

    def __call__(self, t, y, args):
        return (1 + t) * self.a * y + self.c + self.k * y**3


def test_eq45_for_any_affine_field():
    # w(t) = D_y F(t, 0) = w(t) exactly for F = w(t) y + b(t) and the same quadrature: measured
    # identical, 1e-12 (the module's roundoff statement) asserted
    model = gj.random_linear_node(D, T, key=jax.random.key(7))
    w, b = model.weight, model.bias
    closure = gj.NeuralODE(lambda t, y, args: w(t) @ y + b(t), t1=T)
    xs = jax.random.normal(jax.random.key(8), (3, D))
    eq45 = gj.gauge_fixing_penalty("eq45", model, xs)
    assert abs(float(gj.gauge_fixing_penalty("eq45", closure, xs) - eq45)) < 1e-12
    # a Module on [0.5, 2]: w = (1 + t) a, dw/dt = a, b = c, so with u = 1 + t the integrand is
    # D (a + a^2 u^2)^2 + a^2 u^2 |c|^2; exact polynomial integrals, 32-node quadrature: 1e-12
    a, c, t0, t1 = 0.7, jnp.array([1.0, -2.0, 0.5]), 0.5, 2.0
    module = gj.NeuralODE(_CubicModule(jnp.asarray(a), c, jnp.zeros(())), t1=t1, t0=t0)
    u0, u1 = 1 + t0, 1 + t1

    def integral(n):  # int u^n du over [u0, u1]
        return (u1 ** (n + 1) - u0 ** (n + 1)) / (n + 1)

    closed = D * (a**2 * integral(0) + 2 * a**3 * integral(2) + a**4 * integral(4))
    closed += a**2 * float(jnp.sum(c**2)) * integral(2)
    np.testing.assert_allclose(gj.gauge_fixing_penalty("eq45", module, xs), closed, rtol=1e-12)
    # under jit (traced arrays) the affinity check is an eqx.error_if: same value, or a raise
    jitted = eqx.filter_jit(lambda mod: gj.gauge_fixing_penalty("eq45", mod, xs))
    np.testing.assert_allclose(jitted(module), closed, rtol=1e-12)
    cubic = eqx.tree_at(lambda mod: mod.field.k, module, jnp.ones(()))
    with pytest.raises(eqx.EquinoxRuntimeError, match="_CubicModule, which is not affine"):
        jitted(cubic)
    # eagerly, a nonlinear field keeps the TypeError pointing to 'uniform_motion'
    with pytest.raises(
        TypeError, match="'eq45'.*_CubicModule, which is not affine.*uniform_motion"
    ):
        gj.gauge_fixing_penalty("eq45", cubic, xs)
    tanh = gj.NeuralODE(lambda t, y, args: jnp.tanh(w(t) @ y + b(t)), t1=T)
    with pytest.raises(TypeError, match=r"<lambda> \(a function\), which is not affine"):
        gj.gauge_fixing_penalty("eq45", tanh, xs)


def test_local_error_term_is_the_solvers_own_error_estimate():
    """`local_error` sums `|h| |error estimate|` over the accepted steps (Pal et al. 2021): it
    follows the tolerance on dx/dt = x^2 (measured 0.73, 1.4, 1.8 x tol at tol 1e-6, 1e-8,
    1e-10), and vanishes to rounding (measured 8e-18) on dx/dt = t^3, which Tsit5 (order 5)
    integrates exactly; it is differentiable in the field's parameters (a training term)."""

    def local_error(field, tol):
        pid = diffrax.PIDController(rtol=jnp.asarray(tol), atol=jnp.asarray(tol))
        model = gj.NeuralODE(field, t1=1.0, stepsize_controller=pid)
        return gj.integrate_regularizers(model, jnp.array([0.5]), ("local_error",))[1]

    run = eqx.filter_jit(local_error)  # one program per field: the tolerances are arrays
    square = lambda t, y, args: y**2  # noqa: E731
    for tol in (1e-6, 1e-8, 1e-10):
        got = float(run(square, tol)["local_error"])
        assert 0.3 * tol < got < 5 * tol, (tol, got)
    exact = float(run(lambda t, y, args: t**3 * jnp.ones_like(y), 1e-6)["local_error"])
    assert 0.0 <= exact < 1e-16
    grad = jax.grad(lambda a: local_error(lambda t, y, args: a * y**2, 1e-6)["local_error"])(1.0)
    assert np.isfinite(grad) and grad > 0  # measured 5.5e-6


def _steer_model():
    a = 0.7
    field = gj.FunctionLinearField(lambda t: a * jnp.eye(D), lambda t: jnp.zeros(D))
    tight = diffrax.PIDController(rtol=1e-11, atol=1e-11)
    return a, gj.LinearNODE(field, t1=T, stepsize_controller=tight)


def test_steer_solves_to_an_end_time_drawn_from_its_half_of_the_key():
    """STEER on dx/dt = a x (T = 1.5, b = 0.5): each key's solve ends at the T drawn from the
    second half of `split(key)`: x(T) = x0 e^{aT}, and the other terms integrate over [0, T]
    (kinetic in closed form; jacobian a^2 |eps|^2 T with eps from the first half), to 5e-12
    relative (measured 3e-13, 8e-13, 6e-16 at rtol = atol = 1e-11); steer's own integral is
    0. Jitted and vmapped over 6 keys (a traced end time), the six end times are distinct and
    inside [T - b, T + b]."""
    a, model = _steer_model()
    x0 = jnp.array([1.0, -0.5, 2.0])
    keys = jax.random.split(jax.random.key(0), 6)

    @jax.jit
    @jax.vmap
    def run(key):
        return gj.integrate_regularizers(
            model, x0, ("steer", "kinetic", "jacobian"), key=key, steer_width=0.5
        )

    x1, got = run(keys)
    probe_keys, steer_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    ends = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float64, T - 0.5, T + 0.5))(steer_keys)
    probes = jax.vmap(lambda k: jax.random.normal(k, (D,), jnp.float64))(probe_keys)
    np.testing.assert_allclose(x1, x0 * jnp.exp(a * ends)[:, None], rtol=5e-12)
    kinetic = a**2 * jnp.sum(x0**2) * (jnp.exp(2 * a * ends) - 1) / (2 * a)
    np.testing.assert_allclose(got["kinetic"], kinetic, rtol=5e-12)
    np.testing.assert_allclose(got["jacobian"], a**2 * jnp.sum(probes**2, 1) * ends, rtol=5e-12)
    np.testing.assert_array_equal(got["steer"], 0.0)
    assert len(set(np.asarray(ends).tolist())) == 6
    assert bool(jnp.all((ends >= T - 0.5) & (ends <= T + 0.5)))
    # eager, default half-width (t1 - t0) / 2, and through the loss entry point (value 0)
    x1, _ = gj.integrate_regularizers(model, x0, ("steer",), key=keys[0])
    end = jax.random.uniform(jax.random.split(keys[0])[1], (), jnp.float64, T / 2, 3 * T / 2)
    np.testing.assert_allclose(x1, x0 * jnp.exp(a * end), rtol=5e-12)
    assert float(gj.gauge_fixing_penalty("steer", model, x0[None], key=keys[0])) == 0.0


def test_steer_refuses_a_width_outside_the_interval_and_a_missing_key():
    _, model = _steer_model()
    x0 = jnp.ones(D)
    for width in (0.0, -0.1, 1.5, 2.0):
        with pytest.raises(ValueError, match=rf"`steer_width`.*\(0, 1.5\).*received {width}"):
            gj.integrate_regularizers(
                model, x0, ("steer",), key=jax.random.key(0), steer_width=width
            )
    with pytest.raises(ValueError, match="`steer` term needs a `key`"):
        gj.integrate_regularizers(model, x0, ("steer",))
    with pytest.raises(ValueError, match="'steer' regulariser needs a `key`"):
        gj.gauge_fixing_penalty("steer", model, x0[None])
    observed = model.with_options(observation_times=(0.5, T))
    with pytest.raises(ValueError, match="observation_times"):
        gj.integrate_regularizers(observed, x0, ("steer",), key=jax.random.key(0))
    with pytest.raises(ValueError, match="deterministic"):
        gj.TrajectoryObjective("steer", x0[None])
