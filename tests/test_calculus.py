"""Lie bracket, deform (Eq. 9/16/20), pullback (finite Eq. 13-16, Eq. 25), reparametrize.

Tolerances: identities that are exact algebra are checked to 1e-12 (float64 roundoff of a few
matmuls on O(1) numbers is ~1e-15; 1e-12 leaves room for d <= 5 sums). First-order
expansions are checked by their log-log slope (2 expected; [1.9, 2.1] accepted).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


T = 1.0


def mlp_field(getkey, d=3):
    return gj.MLPField(d, 16, 2, key=getkey(), out_scale=0.7)


def generator(getkey, d=3, time=True, vanishing=True):
    gauge = gj.LieDeformationGauge(
        d, T, key=getkey(), boundary="vanishing" if vanishing else "free", time_component=time
    )
    return gauge.generator(gauge.sample(getkey()))


def test_lie_bracket_linear_fields(getkey):
    A, B = jax.random.normal(getkey(), (2, 5, 5))
    z = jax.random.normal(getkey(), (5,))
    got = gj.lie_bracket(lambda z: A @ z, lambda z: B @ z)(z)
    np.testing.assert_allclose(got, (B @ A - A @ B) @ z, rtol=0, atol=1e-12)
    # a broken bracket (wrong order) is detected
    assert jnp.max(jnp.abs(got - (A @ B - B @ A) @ z)) > 1e-2


def test_lie_bracket_nonlinear_by_hand():
    def u(z):
        return jnp.stack([z[0] * z[1], z[0]])

    def v(z):
        return jnp.stack([jnp.sin(z[1]), z[0] ** 2])

    z0, z1 = 0.7, -1.3
    by_hand = jnp.array([z0 * jnp.cos(z1) - z1 * jnp.sin(z1) - z0**3, 2 * z0**2 * z1 - jnp.sin(z1)])
    got = gj.lie_bracket(u, v)(jnp.array([z0, z1]))
    np.testing.assert_allclose(got, by_hand, rtol=0, atol=1e-14)
    np.testing.assert_allclose(gj.lie_bracket(v, u)(jnp.array([z0, z1])), -by_hand, atol=1e-14)


def test_lie_bracket_pytree_and_jit_vmap(getkey):
    A, B = jax.random.normal(getkey(), (2, 4, 4))

    def u(z):
        w = jnp.tanh(A @ jnp.concatenate([z["a"], z["b"]]))
        return {"a": w[:2], "b": w[2:]}

    def v(z):
        w = jnp.sin(B @ jnp.concatenate([z["a"], z["b"]]))
        return {"a": w[:2], "b": w[2:]}

    zs = jax.random.normal(getkey(), (7, 4))
    got = jax.jit(jax.vmap(lambda z: gj.lie_bracket(u, v)({"a": z[:2], "b": z[2:]})))(zs)
    want = jax.vmap(
        gj.lie_bracket(lambda z: jnp.tanh(A @ z), lambda z: jnp.sin(B @ z)),
    )(zs)
    np.testing.assert_allclose(jnp.concatenate([got["a"], got["b"]], axis=1), want, atol=1e-14)


def test_lie_bracket_wrong_structure_raises():
    with pytest.raises(ValueError, match="u\\(z\\)"):
        gj.lie_bracket(lambda z: z[:2], lambda z: z)(jnp.ones(3))


def test_deform_spatial_is_eq16_term_by_term(getkey):
    F = mlp_field(getkey)
    eps = generator(getkey, time=False)
    s = 0.37

    @jax.jit  # one program for both points (not the eager ops of each)
    def terms(t, y):
        e0, ey = eps(t, y)
        f = F(t, y, None)
        DF = jax.jacfwd(lambda y: F(t, y, None))(y)
        Deps = jax.jacfwd(lambda y: eps(t, y)[1])(y)
        dt_eps = jax.jacfwd(lambda t: eps(t, y)[1])(t)
        eq16 = f + s * (DF @ ey - Deps @ f - dt_eps)
        return e0, gj.deform(F, eps, s)(t, y, None), eq16

    for t, y in [
        (0.3, jax.random.normal(getkey(), (3,))),
        (0.8, jax.random.normal(getkey(), (3,))),
    ]:
        e0, got, eq16 = terms(jnp.asarray(t), y)
        assert e0 == 0
        np.testing.assert_allclose(got, eq16, rtol=0, atol=1e-12)


def time_only_fields(getkey):
    F = mlp_field(getkey)
    c = jnp.array([0.3, -0.2])

    def e0(t):
        return jnp.sum(c * jnp.sin(jnp.arange(1.0, 3.0) * jnp.pi * t / T)) + 0.4 * t

    return F, e0


def test_deform_time_only_is_derived_eq20_not_printed(getkey):
    F, e0 = time_only_fields(getkey)
    y = jax.random.normal(getkey(), (3,))
    t, s = jnp.asarray(0.41), 0.2

    @jax.jit  # one program (not the eager ops)
    def terms(t, y):
        f = F(t, y, None)
        dtF = jax.jacfwd(lambda t: F(t, y, None))(t)
        de0 = jax.grad(e0)(t)
        derived = f + s * (de0 * f + e0(t) * dtF)
        printed = f + s * (f * e0(t) + dtF * e0(t))
        got = gj.deform(F, lambda t, y: (e0(t), jnp.zeros_like(y)), s)(t, y, None)
        return got, derived, printed

    got, derived, printed = terms(t, y)
    np.testing.assert_allclose(got, derived, rtol=0, atol=1e-12)
    assert jnp.max(jnp.abs(got - printed)) > 1e-3


def test_deform_matches_finite_spacetime_diffeo_to_first_order(getkey):
    """deform(F, eps, h) - spacetime_pullback(F, (s, y) -> (s, y) + h eps(s, y)) = O(h^2)."""
    F = mlp_field(getkey)
    eps = generator(getkey, time=True)
    points = [(jnp.asarray(t), jax.random.normal(getkey(), (3,))) for t in (0.2, 0.5, 0.9)]
    hs = [4e-2, 2e-2, 1e-2, 5e-3]

    @jax.jit  # one program for every h, sign and point (h traced)
    def gap_at(h, scale, t, y):
        def chart(s, y):
            e0, ey = eps(s, y)
            return s + h * e0, y + h * ey

        finite = gj.spacetime_pullback(F, chart)
        infinitesimal = gj.deform(F, eps, scale)
        return jnp.max(jnp.abs(finite(t, y, None) - infinitesimal(t, y, None)))

    def gap(h, sign):
        return max(float(gap_at(h, sign * h, t, y)) for t, y in points)

    errors = [gap(h, +1) for h in hs]
    assert 1.9 < gj.loglog_slope(hs, errors) < 2.1, errors
    # a wrong sign of the generator is off at first order (slope 1)
    assert 0.9 < gj.loglog_slope(hs, [gap(h, -1) for h in hs]) < 1.1


def test_pullback_linear_is_eq25(getkey):
    d = 3
    W0, W1, A = 0.5 * jax.random.normal(getkey(), (3, d, d))
    b0, c0 = jax.random.normal(getkey(), (2, d))

    def w(t):
        return W0 + jnp.sin(jnp.pi * t) * W1

    def b(t):
        return b0 * jnp.cos(t)

    def G(t):
        return jax.scipy.linalg.expm(jnp.sin(jnp.pi * t / T) * A)

    def c(t):
        return jnp.sin(jnp.pi * t / T) * c0

    F = lambda t, x, args: w(t) @ x + b(t)  # noqa: E731
    pulled = gj.pullback(F, lambda t, y: G(t) @ y + c(t))

    @jax.jit  # one program for the three times (not the eager ops of each)
    def both(t, y):
        Gi = jnp.linalg.inv(G(t))
        dG = jax.jacfwd(G)(t)
        dc = jax.jacfwd(c)(t)
        w_new = Gi @ w(t) @ G(t) - Gi @ dG
        b_new = Gi @ (b(t) + w(t) @ c(t) - dc)
        return pulled(t, y, None), w_new @ y + b_new

    for t in (0.1, 0.45, 0.77):
        y = jax.random.normal(getkey(), (d,))
        np.testing.assert_allclose(*both(jnp.asarray(t), y), rtol=0, atol=1e-12)


def test_spacetime_pullback_reduces_to_reparametrize(getkey):
    F = mlp_field(getkey)

    def tau(s):
        return s + 0.1 * jnp.sin(jnp.pi * s)

    y = jax.random.normal(getkey(), (3,))
    s = jnp.asarray(0.33)
    a = gj.spacetime_pullback(F, lambda s, y: (tau(s), y))(s, y, None)
    r = gj.reparametrize(F, tau)(s, y, None)
    np.testing.assert_allclose(a, r, rtol=0, atol=1e-13)
    np.testing.assert_allclose(r, (1 + 0.1 * jnp.pi * jnp.cos(jnp.pi * s)) * F(tau(s), y, None))


def test_reparametrize_rejects_non_increasing_tau(getkey):
    F = mlp_field(getkey)
    with pytest.raises(ValueError, match="strictly increasing"):
        gj.reparametrize(
            F, lambda s: s - 0.5 * jnp.sin(2 * jnp.pi * s), grid=jnp.linspace(0, 1, 11)
        )
    gj.reparametrize(F, lambda s: s + 0.1 * jnp.sin(jnp.pi * s), grid=jnp.linspace(0, 1, 11))


def test_bad_inputs_raise_clear_errors(getkey):
    F = mlp_field(getkey)
    y = jnp.ones(3)
    with pytest.raises(ValueError, match="scalar eps0"):
        gj.deform(F, lambda t, y: (jnp.ones(2), y), 0.1)(0.5, y, None)
    with pytest.raises(ValueError, match="eps_y|structure"):
        gj.deform(F, lambda t, y: (0.0, y[:2]), 0.1)(0.5, y, None)
    with pytest.raises(TypeError, match="eps"):
        gj.deform(F, 3.0, 0.1)
    with pytest.raises(ValueError, match="chart"):
        gj.spacetime_pullback(F, lambda s, y: (s, y[:2]))(0.5, y, None)
    with pytest.raises(TypeError, match="psi"):
        gj.pullback(F, None)
