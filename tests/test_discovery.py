"""Symmetry discovery: Jacobian null spaces of plain `jnp` functions and of gaugejax / equinox
modules, against the counts the known families predict, at float64."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import gaugejax as gj


D, A, DV, T, B = 6, 3, 4, 10, 8  # model dim, head dim, value dim, tokens, sequences


def _attention(p, xs, activation):
    """A user's own single-head attention in `jnp` (not a gaugejax module), over B sequences."""

    def one(x):
        s = x @ p["q"] @ p["k"].T @ x.T / jnp.sqrt(A)
        w = jax.nn.softmax(s, axis=-1) if activation == "softmax" else s
        return w @ x @ p["v"]

    return jax.vmap(one)(xs)


@pytest.fixture
def attention_point(getkey):
    p = {
        "q": jax.random.normal(getkey(), (D, A)),
        "k": jax.random.normal(getkey(), (D, A)),
        "v": jax.random.normal(getkey(), (D, DV)),
    }
    return p, jax.random.normal(getkey(), (B, T, D))


def _gl_generators(p):
    """The query-key GL(A) generators `dq = q E, dk = -k E^T` (E the unit matrices)."""
    cols = []
    for i in range(A):
        for j in range(A):
            e = jnp.zeros((A, A)).at[i, j].set(1.0)
            t = {"q": p["q"] @ e, "k": -p["k"] @ e.T, "v": jnp.zeros_like(p["v"])}
            cols.append(ravel_pytree(t)[0])
    return jnp.stack(cols, axis=1)


@pytest.mark.parametrize("activation, expected", [("softmax", A * A), ("linear", A * A + 1)])
def test_attention_null_space_is_the_catalogue(attention_point, activation, expected):
    """Single-head attention with head dimension a: a^2 symmetric directions (GL(a) on
    query-key), a^2 + 1 without the softmax (the alpha rescaling of Eq. 36 joins). Both
    methods find it; the spectrum's gap is > 1e10 (symmetric directions at rounding, 1e-16
    relative; the smallest constrained ones above 1e-2); the known GL(a) generators lie in the
    discovered null space to 1e-12 rad, and only the alpha direction is left unexplained."""
    p, xs = attention_point

    def fn(params, x):
        return _attention(params, x, activation)

    dense = gj.symmetry_dimension(fn, p, xs, method="dense")
    rand = gj.symmetry_dimension(fn, p, xs, method="randomized", initial_rank=8)
    n = 2 * D * A + D * DV
    for r in (dense, rand):
        assert r.verdict == "clear" and r.dimension == expected, r.reason
        assert r.num_params == n and r.num_outputs == B * T * DV and r.gap > 1e10
    assert dense.singular_values.shape == (n,) and dense.basis.shape == (n, expected)
    np.testing.assert_allclose(dense.basis.T @ dense.basis, np.eye(expected), atol=1e-12)
    # the randomized method's top singular values are the dense ones (to rounding)
    k = n - expected
    np.testing.assert_allclose(rand.singular_values[:k], dense.singular_values[:k], rtol=1e-9)
    assert rand.num_matvecs > 0 and rand.basis is None and rand.row_basis.shape == (n, k)
    # a null direction as a PyTree leaves outputs unchanged to first order
    v = dense.basis_tree(0)
    _, dout = jax.jvp(lambda q: fn(q, xs), (p,), (v,))
    assert float(jnp.max(jnp.abs(dout))) < 1e-12 * float(jnp.max(jnp.abs(fn(p, xs))))
    for r in (dense, rand):
        cmp = gj.compare_symmetries(r, _gl_generators(p))
        assert cmp.known_rank == A * A and cmp.max_angle < 1e-12
        assert cmp.explained == A * A and cmp.unexplained == expected - A * A
    # negative case: a direction that changes the function is far from the null space
    wrong = jnp.concatenate([_gl_generators(p), jax.random.normal(jax.random.key(1), (n, 1))], 1)
    cmp = gj.compare_symmetries(dense, wrong)
    assert cmp.known_rank == A * A + 1 and cmp.max_angle > 0.1
    assert cmp.explained == A * A


def test_relu_mlp_rescaling_is_found_and_the_excess_depends_on_the_batch():
    """`eqx.nn.MLP` (ReLU, biases, widths 5-7-7-3). On 2000 inputs of spread 8 (every linear
    region well sampled): one symmetric direction per hidden unit (14), all explained by
    `RescalingGauge`'s generators. On 2000 inputs of spread 0.5 (fewer regions reached) the
    same network has more (measured 22): "hidden" directions of this batch, which no
    rescaling generator explains - the batch dependence Grigsby, Lindsey and Rolnick (2023)
    describe."""
    mlp = eqx.nn.MLP(5, 3, 7, 2, activation=jax.nn.relu, key=jax.random.key(2))
    fn, params = gj.module_function(mlp)
    gens = gj.gauge_generators(gj.RescalingGauge.from_model(mlp), mlp)
    x = jax.random.normal(jax.random.key(102), (2000, 5))
    wide = gj.symmetry_dimension(fn, params, 8 * x)
    assert wide.verdict == "clear" and wide.dimension == 14, wide.reason
    cmp = gj.compare_symmetries(wide, gens)
    assert cmp.known_rank == 14 and cmp.max_angle < 1e-10 and cmp.unexplained == 0
    narrow = gj.symmetry_dimension(fn, params, 0.5 * x)
    assert narrow.verdict == "clear" and narrow.dimension > 14, narrow.reason
    cmp = gj.compare_symmetries(narrow, gens)
    assert cmp.explained == 14 and cmp.unexplained == narrow.dimension - 14
    assert cmp.unexplained_basis.shape == (wide.num_params, narrow.dimension - 14)


def test_no_gap_is_inconclusive_and_bad_input_is_refused():
    """A linear map with singular values spread evenly over 1 .. 1e-12 has no gap: the result
    is inconclusive with the ratio, never a guessed count. A Jacobian over the dense budget is
    refused with its size and the matrix-free suggestion."""
    n = 24
    u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
    h = jnp.asarray(u * np.logspace(0, -12, n))

    def fn(p, x):
        return h @ p["w"] + 0 * x

    r = gj.symmetry_dimension(fn, {"w": jnp.ones(n)}, jnp.zeros(()))
    assert r.dimension is None and r.verdict == "inconclusive"
    assert "no clear gap" in r.reason and r.gap < 1e4
    with pytest.raises(ValueError, match="no clear dimension"):
        gj.compare_symmetries(r, np.zeros((n, 1)))
    with pytest.raises(ValueError, match="method='randomized'"):
        gj.symmetry_dimension(fn, {"w": jnp.ones(n)}, 0.0, method="dense", max_dense_bytes=100)
    with pytest.raises(ValueError, match="`method`"):
        gj.symmetry_dimension(fn, {"w": jnp.ones(n)}, 0.0, method="svd")
    with pytest.raises(ValueError, match="non-finite"):  # d sqrt(x) at 0
        gj.symmetry_dimension(lambda p, x: jnp.sqrt(p["w"]), {"w": jnp.zeros(3)}, 0.0)
    with pytest.raises(ValueError, match="floating-point"):
        gj.symmetry_dimension(fn, {"w": jnp.arange(3)}, 0.0)


def test_module_function_is_the_model_on_a_batch():
    lin = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    fn, params = gj.module_function(lin)
    xs = jnp.arange(12.0, dtype=jnp.float64).reshape(4, 3)
    np.testing.assert_array_equal(fn(params, xs), jax.vmap(lin)(xs))
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 3 * 2 + 2
    # varied parameters move the outputs: zero weights leave the bias alone
    zeroed = eqx.tree_at(lambda m: m.weight, params, jnp.zeros((2, 3)))
    np.testing.assert_array_equal(fn(zeroed, xs), jnp.broadcast_to(lin.bias, (4, 2)))
    with pytest.raises(ValueError, match=r"`model` must be an equinox Module; received function"):
        gj.module_function(lambda x: x)
    with pytest.raises(ValueError, match=r"has no inexact array to vary"):
        gj.module_function(eqx.nn.Lambda(jnp.tanh))


def test_gauge_generators_free_flags_in_any_container():
    """`free` is read entry by entry in leaf order, whatever containers hold the flags (the
    census passes a tuple for a `DiscreteGaugeElement`): held entries give no column; flags
    of another size are refused with both sizes."""
    D, layers = 3, 4
    net = gj.LinearNet(jnp.ones((layers, D, D)), jnp.zeros((layers, D)))
    gauge = gj.DiscreteLinearGauge(D, layers)
    ident = gauge.identity()
    every = gj.gauge_generators(gauge, net)
    assert every.shape[1] == ident.Gs.size + ident.cs.size  # 60: G_0..G_4, c_0..c_4
    held = (np.ones(ident.Gs.shape, bool), np.ones(ident.cs.shape, bool))
    for mask in held:  # the fixed ends G_0 = G_N = 1, c_0 = c_N = 0
        mask[0] = mask[-1] = False
    free = gj.gauge_generators(gauge, net, held)
    assert free.shape[1] == (layers - 1) * (D * D + D)  # 36: the interior entries only
    np.testing.assert_array_equal(free, every[:, np.concatenate([m.ravel() for m in held])])
    with pytest.raises(ValueError, match=r"60 entries\); received 59 entries"):
        gj.gauge_generators(gauge, net, (held[0], held[1].ravel()[1:]))
