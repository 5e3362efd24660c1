"""Attention gauge symmetries (Eq. 35-37), merging (footnote 10), the cubic neural ODE (Eq. 38)
and attention as an integrated neural ODE (Eq. 39-42).

Algebraic invariances are asserted to 1e-12 relative (float64 roundoff of O(10) scores);
breaking to > 1e-3; solved identities to 1e-8 (solves at rtol = atol <= 1e-10).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj

from .conftest import CompileCounter


D, N = 4, 5


@pytest.fixture(scope="module")
def att():
    k = jax.random.split(jax.random.key(21), 6)
    x = jax.random.normal(k[0], (N, D))
    Wq, Wk, Wv = jax.random.normal(k[1], (3, D, D)) / 2
    A = jax.random.normal(k[2], (D, D))
    return x, Wq, Wk, Wv, A, k


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_attention_function(att):
    x, Wq, Wk, Wv, A, k = att
    s = (x @ Wq) @ (x @ Wk).T
    np.testing.assert_allclose(gj.attention(x, Wq, Wk, Wv, "identity"), s @ (x @ Wv), atol=1e-12)
    soft = jax.nn.softmax(s / 2.0, axis=-1) @ (x @ Wv)
    np.testing.assert_allclose(
        gj.attention(x, Wq, Wk, Wv, "softmax", scaled=True), soft, atol=1e-12
    )
    with pytest.raises(ValueError, match="activation"):
        gj.attention(x, Wq, Wk, Wv, "gelu")
    with pytest.raises((ValueError, TypeError), match="Wq|Wk"):
        gj.attention(x, Wq, Wk[:, :2], Wv, "relu")


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_derived_condition_is_a_symmetry_for_every_alpha(att, activation):
    x, Wq, Wk, Wv, A, k = att
    model = gj.SelfAttention(Wq, Wk, Wv, activation)
    for alpha in (0.3, 1.0, 2.5):
        new = gj.SelfAttention(*gj.attention_gauge(Wq, Wk, Wv, A, alpha), activation)
        assert rel(new(x), model(x)) < 1e-12
    printed = gj.SelfAttention(
        *gj.attention_gauge(Wq, Wk, Wv, A, 1.0, condition="printed"), activation
    )
    assert rel(printed(x), model(x)) > 1e-3


def test_softmax_keeps_only_the_gl_part(att):
    x, Wq, Wk, Wv, A, k = att
    model = gj.SelfAttention(Wq, Wk, Wv, "softmax")
    assert (
        rel(gj.SelfAttention(*gj.attention_gauge(Wq, Wk, Wv, A, 1.0), "softmax")(x), model(x))
        < 1e-12
    )
    assert (
        rel(gj.SelfAttention(*gj.attention_gauge(Wq, Wk, Wv, A, 1.7), "softmax")(x), model(x))
        > 1e-3
    )


def test_attention_gauge_families_and_errors(att):
    x, Wq, Wk, Wv, A, k = att
    xs = jnp.stack([x, 0.5 * x])
    relu = gj.SelfAttention(Wq, Wk, Wv, "relu")
    res = gj.sweep(relu, gj.AttentionGauge(D), xs, key=k[3], num_samples=16, chunk_size=8)
    assert res.max_rel.max() < 1e-12
    soft = gj.SelfAttention(Wq, Wk, Wv, "softmax")
    res = gj.sweep(
        soft, gj.AttentionGauge(D, rescale=False), xs, key=k[3], num_samples=16, chunk_size=8
    )
    assert res.max_rel.max() < 1e-12
    with pytest.raises(ValueError, match="softmax"):
        gj.AttentionGauge(D).act(gj.AttentionGauge(D).identity(), soft)
    with pytest.raises(ValueError, match="printed"):
        gj.AttentionGauge(D, condition="printed").act(gj.AttentionGauge(D).identity(), relu)
    loose = gj.AttentionGauge(D, require_symmetry=False)
    assert gj.sweep(soft, loose, xs, key=k[3], num_samples=8, chunk_size=8).max_rel.min() > 1e-3
    with pytest.raises(ValueError, match="invertible"):
        gj.attention_gauge(Wq, Wk, Wv, jnp.zeros((D, D)), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        gj.attention_gauge(Wq, Wk, Wv, A, -1.0)
    # under the suite's jaxtyping hook the annotation rejects the shape first (a TypeError)
    with pytest.raises((ValueError, TypeError), match=r"square|'A'"):
        gj.attention_gauge(Wq, Wk, Wv, A[:2], 1.0)
    g = gj.AttentionGauge(D).sample(k[4])
    both = gj.AttentionGauge(D).compose(g, gj.AttentionGauge(D).inverse(g))
    np.testing.assert_allclose(both.A[0], jnp.eye(D), atol=1e-12)


def test_gauge_contract_on_gaugejax_models(att):
    x, Wq, Wk, Wv, A, k = att
    xs = jnp.stack([x, 0.5 * x])
    relu = gj.SelfAttention(Wq, Wk, Wv, "relu")
    gauge = gj.AttentionGauge(D)
    # wrong kind: TypeError naming the family, the expected kinds and the received type
    merged = gj.MergedAttention.from_attention(relu)
    with pytest.raises(TypeError, match=r"AttentionGauge acts on SelfAttention.*MergedAttention"):
        gauge.check_model(merged)
    with pytest.raises(TypeError, match="MergedAttention"):
        gauge.act(gauge.identity(), merged)
    # wrong sizes or parts: ValueError before anything is traced
    with pytest.raises(ValueError, match=r"query/key dim 3.*query/key dim 4"):
        gj.AttentionGauge(3).check_model(relu)
    with pytest.raises(ValueError, match="output projection"):
        gj.AttentionGauge(D, value_output=True).check_model(relu)
    with pytest.raises(ValueError, match="value_shift"):
        gj.AttentionGauge(D, value_shift=True).check_model(relu)
    # the control (printed condition, A B^T != alpha I) breaks by O(1); the gauge does not
    control = gauge.control()
    assert control.condition == "printed" and not control.require_symmetry
    assert gj.sweep(relu, control, xs, key=k[3], num_samples=8, chunk_size=8).max_rel.min() > 1e-3
    # from_model reads the sizes (ReLU: alpha rescaling on)
    g = gj.AttentionGauge.from_model(relu)
    assert (g.head_dim, g.num_heads, g.rescale, g.value_output) == (D, 1, True, False)
    # tangent: at the identity, d(Wq A) = Wq dA, d(Wk alpha A^-T) = Wk (dalpha - dA^T),
    # d(Wv / alpha) = -dalpha Wv (closed form; products only, so 1e-12)
    v = jax.tree.map(jnp.subtract, gauge.sample(k[4]), gauge.identity())
    tan = gauge.tangent(relu, v)
    np.testing.assert_allclose(tan.Wq, Wq @ v.A[0], atol=1e-12)
    np.testing.assert_allclose(tan.Wk, Wk @ (v.alpha[0] * jnp.eye(D) - v.A[0].T), atol=1e-12)
    np.testing.assert_allclose(tan.Wv, -v.alpha[0] * Wv, atol=1e-12)


def test_fixed_alpha_is_composition_and_shares_the_program(att):
    x, Wq, Wk, Wv, A, k = att
    xs = jnp.stack([x, 0.5 * x])
    fixed = gj.AttentionGauge(D, fixed_alpha=2.0)
    assert isinstance(fixed.fixed_alpha, jax.Array)
    np.testing.assert_array_equal(fixed.sample(k[4]).alpha, jnp.full((1,), 2.0))
    with pytest.raises(ValueError, match="fixed_alpha"):
        gj.AttentionGauge(D, rescale=False, fixed_alpha=2.0)
    for bad in (jnp.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="fixed_alpha"):
            gj.AttentionGauge(D, fixed_alpha=bad)
    soft = gj.SelfAttention(Wq, Wk, Wv, "softmax")

    def run(alpha):
        gauge = gj.AttentionGauge(D, require_symmetry=False, fixed_alpha=jnp.asarray(alpha))
        return gj.sweep(soft, gauge, xs, key=k[3], num_samples=8, chunk_size=8).max_rel

    assert run(1.0).max() < 1e-12  # softmax keeps alpha = 1
    with CompileCounter() as counter:
        broken = run(1.7)
    assert broken.min() > 1e-3
    assert counter.count == 0  # the alpha is an argument of the compiled sweep, not a constant


def test_multi_head_residual_and_layer_norm(att):
    x, Wq, Wk, Wv, A, k = att
    xs = jnp.stack([x, 0.5 * x])
    for residual, ln in [(False, False), (True, True)]:
        mh = gj.MultiHeadAttention(
            D, 2, 3, key=k[5], activation="relu", residual=residual, layer_norm=ln
        )
        gauge = gj.AttentionGauge(3, num_heads=2, value_output=True)
        assert gj.sweep(mh, gauge, xs, key=k[3], num_samples=8, chunk_size=8).max_rel.max() < 1e-12
    with pytest.raises(ValueError, match="heads"):
        gj.AttentionGauge(2, num_heads=2).act(gj.AttentionGauge(2, num_heads=2).identity(), mh)
    # an output scale Wo -> c Wo is a symmetry only with LayerNorm and without the residual
    # (exact as LayerNorm's eps -> 0; eps = 1e-5 leaves a small change)
    changes = {}
    for residual, ln, eps in [
        (False, True, 1e-12),
        (False, True, 1e-5),
        (True, True, 1e-12),
        (False, False, 0.0),
    ]:
        mh = gj.MultiHeadAttention(
            D, 2, 3, key=k[5], residual=residual, layer_norm=ln, norm_eps=eps
        )
        scaled = eqx.tree_at(lambda m: m.Wo, mh, 3.0 * mh.Wo)
        changes[(residual, ln, eps)] = rel(scaled(x), mh(x))
    assert changes[(False, True, 1e-12)] < 1e-9
    assert 1e-5 < changes[(False, True, 1e-5)] < 1e-4  # measured 5.4e-5
    assert changes[(True, True, 1e-12)] > 1e-3 and changes[(False, False, 0.0)] > 1e-3


def test_merged_wqk_fixes_the_gl_gauge(att):
    x, Wq, Wk, Wv, A, k = att
    for act in ("softmax", "relu"):
        model = gj.SelfAttention(Wq, Wk, Wv, act, scaled=True)
        merged = gj.MergedAttention.from_attention(model)
        assert rel(merged(x), model(x)) < 1e-12
        gauged = gj.SelfAttention(*gj.attention_gauge(Wq, Wk, Wv, A, 1.0), act, scaled=True)
        np.testing.assert_allclose(
            gj.MergedAttention.from_attention(gauged).Wqk, merged.Wqk, atol=1e-12
        )


def test_cubic_node_leading_order():
    k = jax.random.split(jax.random.key(22), 3)
    A0 = 0.3 * jax.random.normal(k[0], (D, D))
    lam0 = 0.3 * jax.random.normal(k[1], (D, D, D, D))
    x0 = jax.random.normal(k[2], (D,))

    def w(t):
        return A0 * jnp.cos(jnp.pi * t)

    def lam(t):
        return lam0 * (1.0 + t)

    W, Lam = gj.integrated_cubic(w, lam, 1.0)
    np.testing.assert_allclose(W, gj.wilson_line(w, 1.0, 0.0), atol=1e-8)
    import diffrax

    tight = diffrax.PIDController(rtol=1e-12, atol=1e-12)
    scales = [1e-2, 5e-3, 2.5e-3]
    errs = []
    for eps in scales:
        xe, _ = gj.solve(gj.CubicField(w, lam, eps), x0, t1=1.0, stepsize_controller=tight)
        errs.append(
            float(
                jnp.max(jnp.abs(xe - (W @ x0 + eps * jnp.einsum("ijkl,j,k,l->i", Lam, x0, x0, x0))))
            )
        )
    assert abs(gj.loglog_slope(scales, errs) - 2) < 0.15, errs


def test_attention_as_integrated_node(att):
    x, Wq, Wk, Wv, A, k = att
    scales = [1e-2, 5e-3, 2.5e-3]
    h = gj.attention(x, Wq, Wk, Wv, "identity")
    errs = [
        float(jnp.max(jnp.abs(gj.attention_as_node(Wq, Wk, Wv, scale=s)(x) - (x + s * h))))
        for s in scales
    ]
    assert abs(gj.loglog_slope(scales, errs) - 2) < 0.15, errs
    # Eq. 41: the node's weights compute the same attention
    node = gj.attention_as_node(Wq, Wk, Wv, scale=0.01)
    assert rel(gj.attention(x, *node.weights(), "identity"), h) < 1e-12
    with pytest.raises(ValueError, match="t0"):
        gj.attention_as_node(Wq, Wk, Wv, t0=1.5)


def test_diffeomorphism_induces_the_attention_gauge(att):
    """G(t) with G(0) = G(T) = 1 maps the Eq. 41 weights by A = G(t0)^-T, B = G(t0), alpha = 1;
    the printed Eq. 36 (A B = 1) does not describe it; the alpha part is the decomposition
    redundancy lambda -> lambda/alpha, lambda~ -> alpha lambda~."""
    x, Wq, Wk, Wv, A, k = att
    node = gj.attention_as_node(Wq, Wk, Wv, scale=0.01)
    gauge = gj.LinearGauge(D, 1.0)
    G = gauge.to_map(gauge.sample(k[4])).G
    new = node.diffeomorphism(G)
    Gt0 = G(jnp.asarray(node.t0))
    expected = gj.attention_gauge(*node.weights(), jnp.linalg.inv(Gt0).T, 1.0)
    for got, want in zip(new.weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-8)
    np.testing.assert_allclose(new(x), node(x), atol=1e-8)
    printed = gj.attention_gauge(*node.weights(), jnp.linalg.inv(Gt0).T, 1.0, condition="printed")
    assert jnp.max(jnp.abs(new.weights()[1] - printed[1])) > 1e-3
    q, kk, v = node.rescale(2.0).weights()
    q0, k0, v0 = node.weights()
    np.testing.assert_allclose(kk, 2.0 * k0, atol=1e-12)
    np.testing.assert_allclose(v, v0 / 2.0, atol=1e-12)
    # both as one family: an element (G, alpha) induces the attention gauge (G(t0)^-T, alpha)
    family = gj.AttentionNODEGauge(D, 1.0)
    g = family.sample(k[4])
    Gt0 = family.linear.to_map(g.G).G(jnp.asarray(node.t0))
    expected = gj.attention_gauge(*node.weights(), jnp.linalg.inv(Gt0).T, g.alpha)
    for got, want in zip(family.act(g, node).weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-8)  # Wilson lines at tolerance 1e-11
