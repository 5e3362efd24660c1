"""Alignment of transformer decoders (`DecoderGauge.match`): a decoder moved by a random
element of the family is recovered (with `permutations=True` also one whose heads and hidden
units were permuted), two independent decoders come closer, the function is kept; the control
and families without `match` are refused."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


SIZES = dict(in_dim=5, out_dim=3, dim=8, num_blocks=2, num_heads=2, head_dim=4, hidden=16)
# grouped-query attention with RoPE: two key-value groups of two query heads each
GQA = dict(num_heads=4, head_dim=2, num_kv_heads=2, rope="half")


def _decoder(key, **kwargs):
    return gj.Decoder(**{**SIZES, **kwargs}, key=key)


# one compiled forward for every decoder of one structure (eager calls cost more here)
_logits = eqx.filter_jit(lambda model, x: model(x))


def _monotone(history):
    return all(b < a for a, b in zip(history, history[1:], strict=False))


def test_align_decoder_recovers_an_element_of_the_family(getkey):
    """B = act(g, A) for a sampled g (residual rotation, RoPE per-pair query-key factors in two
    key-value groups of two query heads, value-output maps, SwiGLU scales): aligning B to A
    brings the distance from 329 to 3.7e-17 in 15 rounds (measured) and keeps B's logits
    (1.2e-15, measured)."""
    A = _decoder(getkey(), **GQA)
    gauge = gj.DecoderGauge.from_model(A)
    B = gauge.act(gauge.sample(getkey()), A)
    res = gj.align(A, B, gauge)
    assert _monotone(res.history)
    assert 100.0 < res.history[0] < 1000.0  # measured 329
    assert res.history[-1] < 3.7e-16  # measured 3.7e-17
    x = jax.random.normal(getkey(), (6, 5))
    dev = float(jnp.max(jnp.abs(_logits(res.model, x) - _logits(B, x))))
    assert dev < 1.2e-14  # measured 1.2e-15 (A's own logits differ from B's by 8.9e-16)


def test_align_decoder_fits_permutations_of_heads_and_units(getkey):
    """B = act(g, A) for g sampled from `DecoderGauge(permutations=True)`: the continuous
    factors above and, per block, a permutation of the two key-value groups, of the two query
    heads inside each and of the 16 hidden units (drawn: block 0 swaps the heads of group 0,
    block 1 swaps the groups and the heads of one). Fitting the permutations too brings the
    distance from 307 to its rounding floor in 12 rounds, about 100x a round (measured 2.3e-19
    with the tests' compile flags, 1.16e-17 with XLA's default optimisations: the floor is how
    `act` rounds), with B's logits kept (8.5e-16, measured); the plain family stalls (215.5
    after 3 rounds, 215.4 after its 12: measured)."""
    A = _decoder(getkey(), **GQA)
    gauge = gj.DecoderGauge.from_model(A, permutations=True)
    g = gauge.sample(getkey())
    identity = gauge.identity()
    for h, p, h0, p0 in zip(g.heads, g.units, identity.heads, identity.units, strict=True):
        assert not np.array_equal(h.heads, h0.heads) and not np.array_equal(p, p0)
    pairs = zip(g.heads, identity.heads, strict=True)
    assert any(not np.array_equal(h.groups, h0.groups) for h, h0 in pairs)
    B = gauge.act(g, A)
    res = gj.align(A, B, gauge, max_rounds=12)
    assert _monotone(res.history)
    assert 100.0 < res.history[0] < 1000.0  # measured 307
    # linear convergence (rounds 4 to 10: measured 545x to 102x a round), then the floor
    rates = [a / b for a, b in zip(res.history[3:10], res.history[4:11], strict=True)]
    assert min(rates) > 50.0, rates
    assert res.history[-1] < 1e-16  # measured 2.3e-19 and 1.16e-17 (see above)
    plain = gj.align(A, B, gj.DecoderGauge.from_model(A), max_rounds=3)
    assert plain.history[0] == res.history[0] and plain.history[-1] > 150.0  # measured 215.5
    x = jax.random.normal(getkey(), (6, 5))
    dev = float(jnp.max(jnp.abs(_logits(res.model, x) - _logits(B, x))))
    assert dev < 8.5e-15  # measured 8.5e-16


def test_align_decoder_brings_independent_decoders_closer(getkey):
    """Two decoders initialised independently (RMSNorm gains, so the gains step runs too):
    the distance falls round on round (280 -> 195 in 9 rounds, 0.69 of its start: measured)
    with the function kept to rounding (2.0e-15, measured)."""
    A, C = (_decoder(getkey(), norm_gain=True) for _ in range(2))
    gauge = gj.DecoderGauge.from_model(A)
    res = gj.align(A, C, gauge)
    assert _monotone(res.history) and len(res.history) > 2
    assert 0.6 < res.history[-1] / res.history[0] < 0.8  # measured 0.694
    x = jax.random.normal(getkey(), (6, 5))
    dev = float(jnp.max(jnp.abs(_logits(res.model, x) - _logits(C, x))))
    assert dev < 2e-14  # measured 2.0e-15


def test_align_decoder_refuses_the_control_and_families_without_match(getkey):
    A = _decoder(getkey())
    gauge = gj.DecoderGauge.from_model(A)
    with pytest.raises(ValueError, match="control of DecoderGauge is no symmetry to align"):
        gj.align(A, A, gauge.control())
    mlp = eqx.nn.MLP(4, 3, 6, 1, activation=jax.nn.relu, key=getkey())
    attention = gauge.attention[0]
    with pytest.raises(ValueError, match="control of BlockAttentionGauge .* no symmetry to"):
        attention.control().match(A.blocks[0].attn, A.blocks[0].attn, attention.identity())
    with pytest.raises(
        NotImplementedError,
        match="RescalingGauge has no alignment .*UnitPermutationGauge, BlockAttentionGauge, "
        "DecoderGauge",
    ):
        gj.align(mlp, mlp, gj.RescalingGauge.from_model(mlp))
    with pytest.raises(ValueError, match="DecoderGauge is for d = 8 with 2 blocks; the model"):
        gauge.match(A, gj.Decoder(**{**SIZES, "num_blocks": 1}, key=getkey()), gauge.identity())
    # a LayerNorm decoder with norm biases moves in its fused form, another structure
    L = _decoder(getkey(), norm="layer", norm_bias=True, mlp="gelu")
    fused = gj.DecoderGauge.from_model(L)
    with pytest.raises(ValueError, match="align `fuse_layernorm\\(reference\\)`"):
        fused.match(L, L, fused.identity())


# linear (activation-free) scores, where each head's score scale is part of the family;
# measured with the keys below: distance, rounds, logits kept, an independent decoder's distance
LINEAR_SCORES = {
    "linear": (dict(activation="linear"), 9.2e-16, 45, 1.6e-15, 249.1),
    "linear_gqa_rope": (
        dict(activation="linear", num_heads=4, head_dim=2, num_kv_heads=2, rope="half"),
        1.7e-16, 50, 3.6e-15, 223.6,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LINEAR_SCORES))
def test_align_linear_score_decoder_to_rounding(case):
    """With linear scores the query-key candidates are compared modulo the score scales that
    each round fits last: a decoder moved by a sampled element is recovered to rounding
    (before, 437 -> 8.2 and 373 -> 2.4 here: the scales and the query-key map stalled each
    other), its logits kept; an independent decoder stays far (the distance is not small by
    construction)."""
    kwargs, distance, rounds, kept, apart = LINEAR_SCORES[case]
    k = jax.random.split(jax.random.key(0), 4)
    A = _decoder(k[0], **kwargs)
    gauge = gj.DecoderGauge.from_model(A)
    B = gauge.act(gauge.sample(k[1]), A)
    res = gj.align(A, B, gauge)
    assert _monotone(res.history) and res.history[0] > 300.0
    assert res.history[-1] < 10 * distance and len(res.history) - 1 <= 2 * rounds
    x = jax.random.normal(k[2], (6, 5))
    assert float(jnp.max(jnp.abs(_logits(res.model, x) - _logits(B, x)))) < 10 * kept
    other = gj.align(A, _decoder(k[3], **kwargs), gauge)
    assert 0.5 * apart < other.history[-1] < 2 * apart
