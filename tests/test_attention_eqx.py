"""`AttentionGauge` on `eqx.nn.MultiheadAttention` with every bias and all sizes different:
output invariance, the negative control, `from_model`, the group law (shifts included), the
tangent against a closed form, and the refusals (eager `ValueError`, run-time error under jit).

Tolerances: invariances to 1e-12 relative (float64 roundoff of O(1) outputs through sampled
matrices of condition <= 10 is ~1e-15); the control must break by > 1e-3 (it changes the scores
by O(1)); parameter identities to 1e-12 (a few solves and products of condition-10 matrices).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from gaugejax.gauges.attention import AttentionGauge, AttentionGaugeElement


H, QS, KS, VS, OS, QK, VO = 3, 5, 4, 6, 7, 2, 3  # every size different, qk != vo
NUM = 16  # sampled elements


def _mha(key, biases=True):
    """An `eqx.nn.MultiheadAttention` whose weights and biases are all N(0, 1/4): O(1) biases
    (equinox's are small), drawn by one random call (equinox's init compiles several)."""
    shape = eqx.filter_eval_shape(
        lambda: eqx.nn.MultiheadAttention(
            H,
            QS,
            KS,
            VS,
            OS,
            qk_size=QK,
            vo_size=VO,
            use_query_bias=biases,
            use_key_bias=biases,
            use_value_bias=biases,
            use_output_bias=biases,
            key=jax.random.key(0),
        )
    )
    leaves, tree = jax.tree.flatten(shape)
    sizes = [x.size if isinstance(x, jax.ShapeDtypeStruct) else 0 for x in leaves]
    flat = 0.5 * jax.random.normal(key, (sum(sizes),))
    offsets = np.cumsum([0, *sizes])
    filled = [
        flat[a:b].reshape(x.shape) if isinstance(x, jax.ShapeDtypeStruct) else x
        for x, a, b in zip(leaves, offsets[:-1], offsets[1:], strict=True)
    ]
    return jax.tree.unflatten(tree, filled)


_sample = eqx.filter_jit(lambda gauge, keys: jax.vmap(gauge.sample)(keys))
_act = eqx.filter_jit(lambda gauge, g, model: gauge.act(g, model))


def _pick(els, i):
    return jax.tree.map(lambda x: x[i], els)


@pytest.fixture(scope="module")
def setup():
    """The model, inputs, its gauge and NUM elements (sampled by one compiled program)."""
    k = jax.random.split(jax.random.key(31), 5)
    model = _mha(k[0])
    inputs = (
        jax.random.normal(k[1], (4, QS)),
        jax.random.normal(k[2], (6, KS)),
        jax.random.normal(k[3], (6, VS)),
    )
    gauge = AttentionGauge.from_model(model)
    return model, inputs, gauge, _sample(gauge, jax.random.split(k[4], NUM))


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def params(m):
    return jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))


def assert_params_close(a, b, atol):
    for x, y in zip(params(a), params(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@eqx.filter_jit
def _deviations(gauge, model, inputs, els, mask):
    """Relative output deviation per element of the gauge, of its control, and of the gauge
    under `mask` (one compilation)."""

    def devs(gauge, mask):
        ref = model(*inputs, mask=mask)
        out = jax.vmap(lambda g: gauge.act(g, model)(*inputs, mask=mask))(els)
        return jnp.max(jnp.abs(out - ref), axis=(1, 2)) / jnp.max(jnp.abs(ref))

    return devs(gauge, None), devs(gauge.control(), None), devs(gauge, mask)


def test_output_invariance_and_control(setup):
    model, inputs, gauge, els = setup
    control = gauge.control()
    assert control.condition == "printed" and not control.require_symmetry
    # a key-padding mask hiding every key of query 1: equinox gives that row uniform weights
    # (summing to 1), so even the value shift stays exact
    mask = jnp.ones((4, 6), dtype=bool).at[1].set(False).at[2, :3].set(False)
    dev, broken, masked = _deviations(gauge, model, inputs, els, mask)
    assert dev.shape == (NUM,) and float(dev.max()) < 1e-12, dev
    # the negative control (keys by A^-T instead of A^-1: A B^T != I) breaks by O(1)
    assert float(broken.min()) > 1e-3, broken
    assert float(masked.max()) < 1e-12, masked
    # every part is sampled and moves every parameter (so the invariance is not vacuous)
    g = _pick(els, 0)
    assert float(jnp.abs(g.value_shift).min()) > 0 and float(jnp.abs(g.key_shift).min()) > 0
    moved = params(_act(gauge, g, model))
    assert min(rel(a, b) for a, b in zip(moved, params(model), strict=True)) > 1e-2


def test_dropout_breaks_only_the_value_shift(setup):
    """Training-mode dropout rescales the kept weights, so rows no longer sum to 1."""
    model, inputs, gauge, els = setup
    drop = eqx.tree_at(lambda m: m.dropout, model, eqx.nn.Dropout(0.5, inference=False))
    g = eqx.tree_at(lambda e: e.value_shift, _pick(els, 0), jnp.zeros((H, VO)))
    shifted = eqx.tree_at(lambda e: e.value_shift, g, jnp.ones((H, VO)))

    @eqx.filter_jit
    def outputs(els):
        dkey = jax.random.key(5)  # the same dropout mask for every call
        ref = drop(*inputs, key=dkey)
        out = jax.vmap(lambda g: gauge.act(g, drop)(*inputs, key=dkey))(els)
        return ref, out

    ref, (linear, shift) = outputs(jax.tree.map(lambda a, b: jnp.stack([a, b]), g, shifted))
    assert rel(linear, ref) < 1e-12
    assert rel(shift, ref) > 1e-3


def test_from_model_reads_sizes(setup):
    model, inputs, g, els = setup
    assert (g.num_heads, g.head_dim, g.vo_dim, g.value_dim) == (H, QK, VO, VO)
    assert not g.rescale and g.value_output and g.value_shift and g.key_shift
    assert els.A.shape == (NUM, H, QK, QK) and els.M.shape == (NUM, H, VO, VO)
    assert els.value_shift.shape == (NUM, H, VO) and els.key_shift.shape == (NUM, H, QK)
    bare = AttentionGauge.from_model(_mha(jax.random.key(1), biases=False))
    assert not bare.value_shift and not bare.key_shift and bare.value_output
    el = eqx.filter_eval_shape(bare.sample, jax.random.key(0))
    assert el.A.shape == (H, QK, QK) and el.M.shape == (H, VO, VO)
    assert el.value_shift.shape == (H, VO) and el.key_shift.shape == (H, QK)
    # the gaugejax models: ReLU gets the alpha rescaling, softmax does not
    # (from_model reads shapes only, so abstract models do)
    mh = eqx.filter_eval_shape(
        gj.MultiHeadAttention, 4, 2, 3, key=jax.random.key(2), activation="relu"
    )
    g = AttentionGauge.from_model(mh)
    assert (g.num_heads, g.head_dim, g.vo_dim, g.rescale, g.value_output) == (2, 3, 3, True, True)
    sa = gj.SelfAttention(*jnp.zeros((3, 4, 4)), "softmax")
    g = AttentionGauge.from_model(sa)
    assert (g.num_heads, g.head_dim, g.rescale, g.value_output) == (1, 4, False, False)


def _rescaled(model, els):
    """The gauge with alpha (require_symmetry=False: not a softmax symmetry) and the elements
    with random alphas: exercises alpha != 1 together with the shifts in the group law."""
    gauge = AttentionGauge.from_model(model, rescale=True, require_symmetry=False)
    alpha = jnp.exp(0.5 * jax.random.normal(jax.random.key(4), els.alpha.shape))
    return gauge, eqx.tree_at(lambda e: e.alpha, els, alpha)


def test_identity_compose_inverse(setup):
    model, inputs, gauge0, els0 = setup
    for gauge, els in [(gauge0, els0), _rescaled(model, els0)]:
        # identity: products with exact identity matrices and zero shifts are exact
        assert_params_close(_act(gauge, gauge.identity(), model), model, atol=1e-15)
        g1, g2 = _pick(els, 1), _pick(els, 2)
        # act(compose(g1, g2)) == act(g2, act(g1)): a few products and solves, 1e-12
        both = _act(gauge, gauge.compose(g1, g2), model)
        assert_params_close(both, _act(gauge, g2, _act(gauge, g1, model)), atol=1e-12)
        # the order matters (so the comparison above discriminates)
        other = _act(gauge, gauge.compose(g2, g1), model)
        assert max(rel(a, b) for a, b in zip(params(other), params(both), strict=True)) > 1e-3
        back = _act(gauge, gauge.inverse(g1), _act(gauge, g1, model))
        assert_params_close(back, model, atol=1e-12)
        e = gauge.compose(g1, gauge.inverse(g1))
        for x, y in zip(jax.tree.leaves(e), jax.tree.leaves(gauge.identity()), strict=True):
            np.testing.assert_allclose(x, y, atol=1e-12)
    # the shift laws by hand: s = M2^T s1 + s2, t = alpha2 A2^-1 t1 + t2
    c = gauge.compose(g1, g2)
    for h in range(H):
        s = g2.M[h].T @ g1.value_shift[h] + g2.value_shift[h]
        t = g2.alpha[h] * np.linalg.solve(g2.A[h], g1.key_shift[h]) + g2.key_shift[h]
        np.testing.assert_allclose(c.value_shift[h], s, atol=1e-12)
        np.testing.assert_allclose(c.key_shift[h], t, atol=1e-12)


_tangent = eqx.filter_jit(lambda gauge, model, v: gauge.tangent(model, v))


def test_tangent_matches_closed_form(setup):
    """d/da act(identity + a v) at 0, per head: W_q -> dA^T W_q; keys (dalpha - dA) k + dt;
    values dM^T v + ds; output columns -C dM^T, output bias -sum_h C_h ds_h (1e-12: O(1)
    products, roundoff ~1e-15)."""
    model, inputs, gauge, els = setup
    gauge, els = _rescaled(model, els)
    v = jax.tree.map(jnp.subtract, _pick(els, 3), gauge.identity())
    tan = _tangent(gauge, model, v)
    q, k, val, o = model.query_proj, model.key_proj, model.value_proj, model.output_proj
    C = o.weight.reshape(OS, H, VO)
    dbo = np.zeros(OS)
    for h in range(H):
        rq, rv = slice(h * QK, (h + 1) * QK), slice(h * VO, (h + 1) * VO)
        dA, da, dM = v.A[h], v.alpha[h], v.M[h]
        dK = da * np.eye(QK) - dA
        np.testing.assert_allclose(tan.query_proj.weight[rq], dA.T @ q.weight[rq], atol=1e-12)
        np.testing.assert_allclose(tan.query_proj.bias[rq], dA.T @ q.bias[rq], atol=1e-12)
        np.testing.assert_allclose(tan.key_proj.weight[rq], dK @ k.weight[rq], atol=1e-12)
        want = dK @ k.bias[rq] + v.key_shift[h]
        np.testing.assert_allclose(tan.key_proj.bias[rq], want, atol=1e-12)
        np.testing.assert_allclose(tan.value_proj.weight[rv], dM.T @ val.weight[rv], atol=1e-12)
        want = dM.T @ val.bias[rv] + v.value_shift[h]
        np.testing.assert_allclose(tan.value_proj.bias[rv], want, atol=1e-12)
        np.testing.assert_allclose(tan.output_proj.weight[:, rv], -C[:, h] @ dM.T, atol=1e-12)
        dbo -= C[:, h] @ v.value_shift[h]
    np.testing.assert_allclose(tan.output_proj.bias, dbo, atol=1e-12)
    assert float(np.abs(dbo).max()) > 1e-2 and float(np.abs(v.alpha).max()) > 1e-2


def test_refusals(setup):
    model, inputs, gauge, els = setup
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(5))
    with pytest.raises(TypeError, match=r"AttentionGauge.*eqx\.nn\.MultiheadAttention.*MLP"):
        gauge.check_model(mlp)
    with pytest.raises(TypeError, match="AttentionGauge"):
        gauge.act(gauge.identity(), mlp)
    with pytest.raises(TypeError, match="MLP"):
        AttentionGauge.from_model(mlp)
    # softmax: no alpha rescaling
    with pytest.raises(ValueError, match="softmax"):
        AttentionGauge.from_model(model, rescale=True)
    with pytest.raises(ValueError, match="softmax"):
        AttentionGauge(QK, H, value_dim=VO).check_model(model)
    # sizes: both named
    with pytest.raises(ValueError, match=r"2 heads.*3 heads"):
        AttentionGauge(QK, 2, rescale=False, value_dim=VO).check_model(model)
    with pytest.raises(ValueError, match=r"value dim 2.*value dim 3"):
        AttentionGauge(QK, H, rescale=False).check_model(model)
    with pytest.raises(ValueError, match="printed"):
        AttentionGauge(QK, H, rescale=False, value_dim=VO, condition="printed").act(
            gauge.identity(), model
        )
    # shifts need their biases
    bare = _mha(jax.random.key(1), biases=False)
    with pytest.raises(ValueError, match="value_shift"):
        AttentionGauge.from_model(bare, value_shift=True)
    with pytest.raises(ValueError, match="key_shift"):
        AttentionGauge.from_model(bare, key_shift=True)


def test_bad_values_refused_eagerly_and_under_jit(setup):
    model, inputs, gauge, els = setup
    Wq, Wk, Wv = 0.5 * jax.random.normal(jax.random.key(6), (3, 4, 4))
    A = jnp.eye(4) + 0.1 * Wq
    nan_A = A.at[0, 0].set(jnp.nan)
    for alpha in (jnp.inf, jnp.nan, 0.0, -1.0):
        with pytest.raises(ValueError, match="`alpha`"):
            gj.attention_gauge(Wq, Wk, Wv, A, alpha)
    with pytest.raises(ValueError, match="`A`"):
        gj.attention_gauge(Wq, Wk, Wv, nan_A, 1.0)
    with pytest.raises(ValueError, match="`A`"):
        gj.attention_gauge(Wq, Wk, Wv, jnp.zeros((4, 4)), 1.0)
    # Under jit the values are traced, so only eqx.error_if can catch them, when the program
    # runs. jax raises a JaxRuntimeError from the first (compiling) call and a ValueError from
    # the cached fast path (the valid call below warms it); both carry the message.
    at_run_time = (RuntimeError, ValueError)
    jitted = jax.jit(gj.attention_gauge)
    jitted(Wq, Wk, Wv, A, jnp.asarray(2.0))  # valid values run
    with pytest.raises(at_run_time, match="`alpha` must be finite and > 0"):
        jax.block_until_ready(jitted(Wq, Wk, Wv, A, jnp.asarray(jnp.inf)))
    with pytest.raises(at_run_time, match="`A` must be finite and invertible"):
        jax.block_until_ready(jitted(Wq, Wk, Wv, nan_A, jnp.asarray(1.0)))
    # elements given to act, and a fixed alpha
    bad = eqx.tree_at(lambda e: e.alpha, gauge.identity(), jnp.full((H,), jnp.inf))
    with pytest.raises(ValueError, match="`g.alpha` must be finite and > 0"):
        gauge.act(bad, model)
    with pytest.raises(at_run_time, match="`g.alpha` must be finite and > 0"):
        jax.block_until_ready(params(_act(gauge, bad, model)))
    singular = eqx.tree_at(lambda e: e.M, gauge.identity(), jnp.zeros((H, VO, VO)))
    # one message in both modes (the eager one adds the measured condition number)
    with pytest.raises(ValueError, match="`g.M` must be finite and invertible .* condition inf"):
        gauge.act(singular, model)
    with pytest.raises(at_run_time, match="`g.M` must be finite and invertible"):
        jax.block_until_ready(params(_act(gauge, singular, model)))
    with pytest.raises(ValueError, match="fixed_alpha"):
        AttentionGauge(QK, H, fixed_alpha=jnp.inf)
    assert isinstance(gauge.identity(), AttentionGaugeElement)
