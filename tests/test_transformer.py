"""`BlockAttention` (biases, RoPE, GQA, causal) and its gauge family: the symmetry counts the
catalogue predicts, found numerically by `symmetry_dimension` and explained by the family's
generators, at float64."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


D, K, V, N, B = 8, 4, 3, 6, 6  # model dim, head dim, value dim, tokens, sequences


@functools.partial(jax.jit, static_argnums=2)
def _rope_scores(q, k, pairing):
    """`apply_rope(q)`, and the scores of q and k both rotated from position 7 and from 0: one
    compiled program per pairing."""
    r = gj.apply_rope(q, pairing, 10000.0)
    q7, k7 = (gj.apply_rope(a, pairing, 10000.0, offset=7) for a in (q, k))
    return r, q7 @ k7.T, r @ gj.apply_rope(k, pairing, 10000.0).T


def test_rope_pairings_are_relative_rotations():
    """Both pairings rotate by position (scores depend on the relative position only), agree
    with an independent complex-number implementation (interleaved: entries (2j, 2j+1) as
    re/im; half: (j, j + k/2)), and differ from each other."""
    q, k = jax.random.normal(jax.random.key(0), (2, 5, K))
    # the reference in numpy complex arithmetic
    theta = 10000.0 ** (-2.0 * np.arange(K // 2) / K)
    phase = np.exp(1j * np.arange(5.0)[:, None] * theta[None, :])
    qn = np.asarray(q)
    want = {
        "interleaved": (qn[:, 0::2] + 1j * qn[:, 1::2]) * phase,
        "half": (qn[:, : K // 2] + 1j * qn[:, K // 2 :]) * phase,
    }
    got = {}
    for pairing, ref in want.items():
        r, shifted, unshifted = _rope_scores(q, k, pairing)
        first, second = (np.asarray(i) for i in gj.models.rope_pairs(K, pairing))
        r_np = np.asarray(r)
        np.testing.assert_allclose(r_np[:, first] + 1j * r_np[:, second], ref, rtol=0, atol=1e-14)
        np.testing.assert_allclose(shifted, unshifted, atol=1e-13)
        got[pairing] = r_np
    assert float(np.max(np.abs(got["interleaved"] - got["half"]))) > 0.1


def _census(model, xs):
    return gj.symmetry_dimension(*gj.module_function(model), xs)


H = 2
CATALOGUE = {
    # (BlockAttention keywords, the dimension the catalogue predicts)
    "multi-head": ({}, H * (K * K + V * V)),
    "activation-free": ({"activation": "linear"}, H * (K * K + V * V) + H),
    "rope interleaved": ({"rope": "interleaved"}, H * (K + V * V)),
    "rope half, causal": ({"rope": "half", "causal": True}, H * (K + V * V)),
    "key bias": ({"biases": ("k",)}, H * (K * K + V * V) + H * K),
    "value + output bias": ({"biases": ("v", "o")}, H * (K * K + V * V) + H * V),
    "value bias alone": ({"biases": ("v",)}, H * (K * K + V * V)),
    "output bias alone": ({"biases": ("o",)}, H * (K * K + V * V)),
    "GQA 4 heads / 2 groups": ({"num_heads": 4, "num_kv_heads": 2}, 2 * (K * K + V * V)),
    "MQA 2 heads / 1 group": ({"num_kv_heads": 1}, K * K + V * V),
}


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_catalogue_counts_are_found_and_explained(name):
    """The Jacobian null space of each attention variant has the dimension the catalogue
    predicts (h(k^2 + v^2); +h without softmax; h(k + v^2) with RoPE; +h k for a key bias;
    +h v for value and output biases together, +0 for either alone; GQA/MQA per group), with
    a spectral gap above 1e10 (symmetric directions at rounding, 1e-16 relative), and the
    family's generators span exactly that null space: largest principal angle < 1e-6 rad
    (measured <= 1e-13), nothing unexplained."""
    kwargs, expected = CATALOGUE[name]
    kwargs = dict(kwargs)
    heads = kwargs.pop("num_heads", H)
    model = gj.BlockAttention(D, heads, K, value_dim=V, key=jax.random.key(0), **kwargs)
    xs = jax.random.normal(jax.random.key(1), (B, N, D))
    found = _census(model, xs)
    assert found.verdict == "clear" and found.dimension == expected, found.reason
    assert found.gap > 1e10
    gauge = gj.BlockAttentionGauge.from_model(model)
    cmp = gj.compare_symmetries(found, gj.gauge_generators(gauge, model))
    assert cmp.known_rank == expected and cmp.max_angle < 1e-6, cmp.max_angle
    assert cmp.unexplained == 0


def test_the_family_holds_and_its_control_breaks():
    """Sweeps at float64: every variant's samples leave outputs unchanged to 1e-12 relative;
    each control (a generic GL(k) query-key element under RoPE, alpha != 1 under softmax)
    moves them by more than 1e-3."""
    xs = jax.random.normal(jax.random.key(1), (3, N, D))
    for kwargs in (
        {"rope": "interleaved", "biases": ("q", "v", "o")},
        {"biases": ("k", "v", "o"), "num_kv_heads": 1, "causal": True},
    ):  # (RoPE "half" with activation-free scores: the contract's block_rope_linear case)
        model = gj.BlockAttention(D, H, K, value_dim=V, key=jax.random.key(2), **kwargs)
        gauge = gj.BlockAttentionGauge.from_model(model)
        res = gj.sweep(model, gauge, xs, key=jax.random.key(3), num_samples=8, chunk_size=8)
        assert res.failures() == {} and res.verdict == "holds", (kwargs, res.verdict_reason)
        assert res.max_rel.max() < 1e-12
        assert res.control_max_rel.min() > 1e-3, (kwargs, res.control_max_rel)


def test_permutations_of_heads_and_units_keep_the_function_and_one_sided_ones_do_not():
    """Finite groups, exact up to the reordering of sums (float64: 1e-13 relative): head
    permutations under multi-query attention (one key-value head, query heads permuted among
    themselves), under RoPE with causal activation-free scores, and GQA's group and in-group
    parts composed and inverted exactly (the parameters return bit for bit); SwiGLU and GELU
    hidden units. The controls (one side moved alone) change the outputs by more than 1e-2."""
    xs = jax.random.normal(jax.random.key(1), (N, D))
    keys = jax.random.split(jax.random.key(4), 4)

    @eqx.filter_jit
    def rel(a, b):
        return jnp.max(jnp.abs(a(xs) - b(xs))) / jnp.max(jnp.abs(b(xs)))

    models = [
        gj.BlockAttention(D, 4, K, num_kv_heads=1, biases=("q", "k", "v", "o"), key=keys[0]),
        gj.BlockAttention(D, 4, K, rope="half", activation="linear", causal=True, key=keys[0]),
        gj.BlockAttention(D, 6, K, num_kv_heads=3, biases=("q", "v"), key=keys[0]),
        gj.BlockMLP(D, 7, "swiglu", key=keys[0]),
        gj.BlockMLP(D, 7, "gelu", key=keys[0]),
    ]
    for model in models:
        family = (
            gj.HeadPermutationGauge if isinstance(model, gj.BlockAttention)
            else gj.UnitPermutationGauge
        )  # fmt: skip
        gauge = family.from_model(model)
        g1, g2 = gauge.sample(keys[1]), gauge.sample(keys[2])
        assert float(rel(gauge.act(g1, model), model)) < 1e-13
        assert float(rel(gauge.control().act(gauge.control().sample(keys[3]), model), model)) > 1e-2
        both = gauge.act(gauge.compose(g1, g2), model)
        for a, b in zip(
            jax.tree.leaves(both), jax.tree.leaves(gauge.act(g2, gauge.act(g1, model))), strict=True
        ):
            np.testing.assert_array_equal(a, b)
        back = gauge.act(gauge.inverse(g1), gauge.act(g1, model))
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(model), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="`num_heads` must be an int >= 2"):
        gj.HeadPermutationGauge.from_model(gj.BlockAttention(D, 1, K, key=keys[0]))
    with pytest.raises(ValueError, match="the model has 6 and 3"):
        gj.HeadPermutationGauge(4, 2).check_model(models[2])
    with pytest.raises(ValueError, match="widths"):
        gj.UnitPermutationGauge.from_model(eqx.nn.MLP(D, D, 4, 0, key=keys[0]))
    with pytest.raises(TypeError, match="UnitPermutationGauge acts on a BlockMLP or an eqx.nn.MLP"):
        gj.UnitPermutationGauge((7,)).check_model(models[0])
    # from_model refuses a model of another kind itself (its docstring's Raises)
    with pytest.raises(TypeError, match="UnitPermutationGauge acts on .*; received BlockAttention"):
        gj.UnitPermutationGauge.from_model(models[0])
    with pytest.raises(TypeError, match="HeadPermutationGauge acts on .*; received MLP"):
        gj.HeadPermutationGauge.from_model(eqx.nn.MLP(D, D, 4, 1, key=keys[0]))


def test_bad_input_is_refused():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`head_dim` must be even"):
        gj.BlockAttention(D, 2, 3, rope="half", key=key)
    with pytest.raises(ValueError, match="multiple of `num_kv_heads`"):
        gj.BlockAttention(D, 3, K, num_kv_heads=2, key=key)
    with pytest.raises(ValueError, match="`rope` must be one of"):
        gj.BlockAttention(D, 2, K, rope="neox", key=key)
    model = gj.BlockAttention(D, 2, K, rope="half", biases=("k",), key=key)
    with pytest.raises(ValueError, match="key_shift"):
        gj.BlockAttentionGauge.from_model(model, key_shift=True)
    with pytest.raises(ValueError, match="rescale"):
        gj.BlockAttentionGauge.from_model(model, rescale=True)
    with pytest.raises(ValueError, match="rope="):
        gj.BlockAttentionGauge.from_model(model, rope="interleaved")
    with pytest.raises(TypeError, match="BlockAttention"):
        gj.BlockAttentionGauge.from_model(model).check_model(eqx.nn.Linear(2, 2, key=key))


@pytest.mark.parametrize(
    "blocks, mlp, gain", [(1, "swiglu", False), (2, "gelu", False), (1, "swiglu", True)],
)  # fmt: skip
def test_decoder_null_space_is_rotations_attention_and_swiglu(blocks, mlp, gain):
    """RMSNorm decoders (d = 6, 2 heads, k = v = 2, SwiGLU width 5; causal): the null space is
    O(d) on the residual stream (d(d-1)/2 = 15), each block's attention gauges (h(k^2 + v^2)
    = 16) and, for SwiGLU, one scale per hidden unit (5); `DecoderGauge`'s generators explain
    it (max angle < 1e-6 rad). With norm gains each gain is also traded against the reads it
    feeds (d per norm, 3 norms per block-and-final: 18), and the family explains that too."""
    d = 6
    model = gj.Decoder(d, d, d, blocks, 2, 2, 5, value_dim=2, mlp=mlp, norm_gain=gain,
                       key=jax.random.key(0))  # fmt: skip
    xs = jax.random.normal(jax.random.key(1), (40, 5, d))
    found = _census(model, xs)
    gains = (2 * blocks + 1) * d if gain else 0
    expected = d * (d - 1) // 2 + blocks * (16 + (5 if mlp == "swiglu" else 0))
    assert found.verdict == "clear" and found.dimension == expected + gains, found.reason
    cmp = gj.compare_symmetries(
        found, gj.gauge_generators(gj.DecoderGauge.from_model(model), model)
    )
    assert cmp.known_rank == expected + gains and cmp.max_angle < 1e-6, cmp.max_angle
    assert cmp.unexplained == 0


def test_layernorm_decoder_through_its_fused_form_and_the_control_breaks():
    """`fuse_layernorm` (every write centred, LayerNorm -> the RMSNorm it then equals) keeps a
    LayerNorm decoder's outputs to rounding, and the family acts on LayerNorm decoders through
    it: the sweep holds to rounding while a generic invertible residual map (the control)
    breaks. Negative cases: the same rotation on the unfused weights (LayerNorm kept)
    breaks, and a norm bias with nowhere to fold (before a SwiGLU MLP) or mixed norms are
    refused, naming the parameter (a bias before reads with biases is folded: the GPT-2 tests
    of test_huggingface.py)."""
    key = jax.random.key(0)
    model = gj.Decoder(4, 3, 4, 1, 2, 2, 3, key=key, norm="layer", norm_gain=True, mlp="gelu",
                       biases=("q", "v", "o"))  # fmt: skip
    xs = jax.random.normal(jax.random.key(1), (3, 5, 4))
    fused = gj.fuse_layernorm(model)
    assert isinstance(fused.norm, eqx.nn.RMSNorm)
    out = jax.vmap(model)(xs)
    # measured 1.7e-15 on outputs of size 2: the centred stream's mean is rounding
    np.testing.assert_allclose(jax.vmap(fused)(xs), out, rtol=0, atol=1e-14)
    gauge = gj.DecoderGauge.from_model(model)
    res = gj.sweep(model, gauge, xs, key=jax.random.key(2), num_samples=8, chunk_size=8)
    assert res.failures() == {} and res.verdict == "holds", res.verdict_reason
    # measured 2.3e-15 and 0.38
    assert res.max_rel.max() < 2e-14 and res.control_max_rel.min() > 0.05
    # unfused: the fused model's rotated weights with LayerNorm put back (LN(x Q) != LN(x) Q)
    g = gauge.sample(jax.random.key(3))
    moved = gauge.act(g, model)
    put_back = eqx.tree_at(
        lambda m: [m.norm] + [n for b in m.blocks for n in (b.norm1, b.norm2)],
        moved,
        [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)],
    )
    # measured 3.4e-15 and 2.1
    np.testing.assert_allclose(jax.vmap(moved)(xs), out, rtol=0, atol=3e-14)
    assert float(jnp.max(jnp.abs(jax.vmap(put_back)(xs) - out))) > 0.2
    biased = gj.Decoder(4, 3, 4, 1, 2, 2, 3, key=key, norm="layer", norm_bias=True)
    with pytest.raises(
        ValueError, match=r"`model.blocks\[0\].norm2` has a bias and feeds a swiglu"
    ):
        gj.DecoderGauge.from_model(biased)
    mixed = eqx.tree_at(lambda m: m.norm, model, eqx.nn.RMSNorm(4, dtype=xs.dtype))
    with pytest.raises(ValueError, match="mixes LayerNorm and RMSNorm"):
        gj.fuse_layernorm(mixed)


def test_layernorm_decoder_null_space_is_counted():
    """A LayerNorm decoder's own parameters (no family acts on them: `DecoderGauge` acts on the
    fused form): its output is mean-free, so the Jacobian null space is the rotations fixing
    the all-ones vector (d-1)(d-2)/2, the mean of each row written to the residual stream, the
    all-ones component of each column reading a norm, and the attention's per-group GL(k) x
    GL(v) (the census counts the same at d = 6). The RMSNorm form of the same weights has
    the full O(d) instead, and no free means: a different count (the negative case)."""
    d, k = 5, jax.random.key(4)
    model = gj.Decoder(d, 3, d, 1, 2, 2, 4, value_dim=2, norm="layer", mlp="gelu", key=k)
    xs = jax.random.normal(jax.random.key(5), (40, 5, d))
    writes = d + 2 * 2 + 4 + 1  # W_in rows, Wo rows (heads x v), W2 rows, b2
    reads = 2 * 2 * 3 + 4 + 3  # Wq, Wk, Wv columns (2 groups x 2), W1 columns, W_out columns
    expected = (d - 1) * (d - 2) // 2 + writes + reads + 2 * (2 * 2 + 2 * 2)
    found = gj.symmetry_dimension(*gj.module_function(model), xs)
    assert found.verdict == "clear" and found.dimension == expected == 55, found.reason
    assert gj.layernorm_null_dimension(model) == 55
    rms = gj.Decoder(d, 3, d, 1, 2, 2, 4, value_dim=2, norm="rms", mlp="gelu", key=k)
    assert gj.symmetry_dimension(*gj.module_function(rms), xs).dimension == d * (d - 1) // 2 + 16
    with pytest.raises(ValueError, match="LayerNorms without gains"):
        gj.layernorm_null_dimension(rms)
    biased = gj.Decoder(d, 3, d, 1, 2, 2, 4, norm="layer", biases=("v",), key=k)
    with pytest.raises(ValueError, match=r"`model.blocks\[0\].attn` has biases"):
        gj.layernorm_null_dimension(biased)
