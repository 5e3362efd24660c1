"""A user's own LLaMA-style block (written here as a researcher would, in equinox, with
`eqx.nn.Linear` layouts, `rotate_half` RoPE, grouped-query heads, RMSNorm gains and SwiGLU)
through `gj.BlockSpec` / `gj.AttentionSpec`: read exactly, swept with its full family, the
control broken; a wrong pairing or layout caught by the probe, bad specs refused by name."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def rotate_half(x):
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-b, a], axis=-1)


class Attention(eqx.Module):
    wq: eqx.nn.Linear
    wk: eqx.nn.Linear
    wv: eqx.nn.Linear
    wo: eqx.nn.Linear
    heads: int = eqx.field(static=True)
    kv_heads: int = eqx.field(static=True)

    def __init__(self, dim, heads, kv_heads, head_dim, key):
        ks = jax.random.split(key, 4)
        self.wq = eqx.nn.Linear(dim, heads * head_dim, use_bias=False, key=ks[0])
        self.wk = eqx.nn.Linear(dim, kv_heads * head_dim, use_bias=False, key=ks[1])
        self.wv = eqx.nn.Linear(dim, kv_heads * head_dim, use_bias=False, key=ks[2])
        self.wo = eqx.nn.Linear(heads * head_dim, dim, use_bias=False, key=ks[3])
        self.heads, self.kv_heads = heads, kv_heads

    def __call__(self, x):
        n = x.shape[0]
        q = jax.vmap(self.wq)(x).reshape(n, self.heads, -1)
        k = jax.vmap(self.wk)(x).reshape(n, self.kv_heads, -1)
        v = jax.vmap(self.wv)(x).reshape(n, self.kv_heads, -1)
        hd = q.shape[-1]
        inv = 10000.0 ** (-jnp.arange(0, hd, 2) / hd)
        angle = jnp.arange(n, dtype=x.dtype)[:, None] * inv[None, :]
        cos, sin = (jnp.concatenate([f(angle)] * 2, axis=-1)[:, None] for f in (jnp.cos, jnp.sin))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)
        scores = jnp.einsum("nhd,mhd->hnm", q, k) / math.sqrt(hd)
        scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -jnp.inf)
        out = jnp.einsum("hnm,mhd->nhd", jax.nn.softmax(scores, axis=-1), v)
        return jax.vmap(self.wo)(out.reshape(n, -1))


class Block(eqx.Module):
    attn_norm: eqx.nn.RMSNorm
    attn: Attention
    ffn_norm: eqx.nn.RMSNorm
    w1: eqx.nn.Linear
    w2: eqx.nn.Linear
    w3: eqx.nn.Linear

    def __init__(self, dim, heads, kv_heads, head_dim, hidden, key):
        ks = jax.random.split(key, 6)
        gain = lambda k: 1.0 + 0.3 * jax.random.normal(k, (dim,))  # noqa: E731
        self.attn_norm = eqx.nn.RMSNorm(dim, eps=1e-5)
        self.attn_norm = eqx.tree_at(lambda n: n.weight, self.attn_norm, gain(ks[4]))
        self.ffn_norm = eqx.tree_at(lambda n: n.weight, eqx.nn.RMSNorm(dim, eps=1e-5), gain(ks[5]))
        self.attn = Attention(dim, heads, kv_heads, head_dim, ks[0])
        self.w1 = eqx.nn.Linear(dim, hidden, use_bias=False, key=ks[1])
        self.w2 = eqx.nn.Linear(hidden, dim, use_bias=False, key=ks[2])
        self.w3 = eqx.nn.Linear(dim, hidden, use_bias=False, key=ks[3])

    def __call__(self, x):
        h = x + self.attn(jax.vmap(self.attn_norm)(x))
        z = jax.vmap(self.ffn_norm)(h)
        return h + jax.vmap(self.w2)(jax.nn.silu(jax.vmap(self.w1)(z)) * jax.vmap(self.w3)(z))


ATTENTION = gj.AttentionSpec(query="attn.wq.weight", key="attn.wk.weight", value="attn.wv.weight",
                             output="attn.wo.weight", num_heads=4, num_kv_heads=2,
                             layout="out_in", rope="half", causal=True)  # fmt: skip
SPEC = gj.BlockSpec(ATTENTION, mlp_gate="w1.weight", mlp_up="w3.weight", mlp_down="w2.weight",
                    norm1_gain="attn_norm.weight", norm2_gain="ffn_norm.weight")  # fmt: skip


@pytest.fixture(scope="module")
def block():
    return Block(8, 4, 2, 4, 12, jax.random.key(0))


def test_a_users_block_is_read_exactly_and_its_family_holds(block):
    """The block read through the spec computes the user's block bit for bit (measured 0.0);
    written back, it is the user's parameters bit for bit; an element of its full family
    (attention GL maps within RoPE's commutant, grouped heads, SwiGLU scales, norm gains
    traded against the reads) moves the parameters and keeps the function (the family's
    contract and sweep: the `spec_block` case of tests/test_contract.py)."""
    x = jax.random.normal(jax.random.key(1), (6, 8))
    assert gj.spec_deviation(block, SPEC, x) < 1e-14
    written = SPEC.write(block, SPEC.extract(block))
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(block), strict=True):
        np.testing.assert_array_equal(a, b)
    gauge = gj.SpecGauge.from_model(block, SPEC, probe=x)
    moved = gauge.act(gauge.sample(jax.random.key(2)), block)
    assert type(moved) is Block and not np.allclose(moved.w3.weight, block.w3.weight)
    assert float(jnp.max(jnp.abs(moved(x) - block(x)))) < 1e-13


def test_the_probe_catches_a_wrong_pairing_and_bad_specs_are_refused(block):
    x = jax.random.normal(jax.random.key(1), (6, 8))
    wrong = eqx.tree_at(lambda s: s.attention.rope, SPEC, "interleaved")
    assert gj.spec_deviation(block, wrong, x) > 1e-2  # measured 3.9e-2 (the right one: 0.0)
    with pytest.raises(ValueError, match="the spec does not describe the model: on the probe"):
        gj.SpecGauge.from_model(block, wrong, probe=x)
    with pytest.raises(ValueError, match=r"the spec's `query` = 'attn.wq.weights' does not "
                       r"resolve in the model \(Block\): no 'weights'"):  # fmt: skip
        gj.SpecGauge.from_model(block, eqx.tree_at(lambda s: s.attention.query, SPEC,
                                                   "attn.wq.weights"))  # fmt: skip
    with pytest.raises(ValueError, match=r"the spec's `mlp_down` = 'w3.weight' must have shape "
                       r"\(12, 8\); received \(8, 12\)"):  # fmt: skip
        gj.SpecGauge.from_model(block, eqx.tree_at(lambda s: s.mlp_down, SPEC, "w3.weight"))
    with pytest.raises(ValueError, match=r"`num_heads` \(4\) must be a multiple of"):
        gj.AttentionSpec("q", "k", "v", "o", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="`rope` must be one of"):
        gj.AttentionSpec("q", "k", "v", "o", num_heads=4, rope="rotate_half")
    with pytest.raises(ValueError, match="`mlp_gate` is the SwiGLU gate"):
        gj.BlockSpec(ATTENTION, mlp_up="w3.weight", mlp_down="w2.weight")
