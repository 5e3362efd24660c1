"""Modern attention: biases, rotary position embeddings, grouped-query attention, causal masks.

`BlockAttention` is the attention of GPT-2 / LLaMA-style blocks, written to expose every
parameter a symmetry can move: per query head `Wq_i (d, k)`, `bq_i (k,)`; per key-value head
(group) `Wk_g (d, k)`, `bk_g`, `Wv_g (d, v)`, `bv_g`; per query head `Wo_i (v, d)` and one
`bo (d,)`. Query head i reads key-value head `g(i) = i // (H / G)`: G = H is multi-head, 1 < G
< H grouped-query, G = 1 multi-query attention.

Rotary embeddings rotate query and key pairs by position p at frequencies
`theta_j = base^(-2j/k)`. Two pairings are in common use, both offered:

- `rope="interleaved"`: pairs `(2j, 2j + 1)`, the RoFormer paper's and Meta's original LLaMA
  code's (the complex view of adjacent entries);
- `rope="half"`: pairs `(j, j + k/2)`, GPT-NeoX's and Hugging Face LLaMA's `rotate_half`.

Scores are `<R_p q_p, R_r k_r> / sqrt(k)`; `activation="softmax"` normalises them over keys,
`"linear"` uses them as they are (activation-free, "lightning" attention). `causal=True` masks
keys after the query.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


ROPE_PAIRINGS = (None, "interleaved", "half")
BLOCK_ACTIVATIONS = ("softmax", "linear")
BIASES = ("q", "k", "v", "o")


def rope_pairs(head_dim: int, pairing: str) -> tuple[Array, Array]:
    """The index pairs a rotary embedding rotates together: `(first, second)`, each
    `(head_dim // 2,)`, pair j at frequency `base^(-2j/head_dim)` (module docstring)."""
    j = jnp.arange(head_dim // 2)
    if pairing == "interleaved":
        return 2 * j, 2 * j + 1
    return j, j + head_dim // 2


def apply_rope(
    x: Float[Array, "n k"], pairing: str, base: float, offset: int = 0
) -> Float[Array, "n k"]:
    """Rotate each pair of `x`'s last axis by angle `position * theta_j` (positions
    `offset, offset + 1, ...` along the first axis)."""
    n, k = x.shape
    first, second = rope_pairs(k, pairing)
    theta = base ** (-2.0 * jnp.arange(k // 2, dtype=x.dtype) / k)
    angle = (offset + jnp.arange(n, dtype=x.dtype))[:, None] * theta[None, :]
    c, s = jnp.cos(angle), jnp.sin(angle)
    a, b = x[:, first], x[:, second]
    return x.at[:, first].set(c * a - s * b).at[:, second].set(s * a + c * b)


class BlockAttention(eqx.Module):
    """Attention with optional biases, RoPE and grouped-query heads (module docstring).

    **Arguments:** `dim` d, `num_heads` H, `head_dim` k; `num_kv_heads` G (default H; must
    divide H); `value_dim` v (default k); `biases`: which of `"q"`, `"k"`, `"v"`, `"o"` exist;
    `rope`: None, `"interleaved"` or `"half"` (needs an even k); `rope_base`; `activation`:
    `"softmax"` or `"linear"`; `causal`; `key`; `dtype`.

    **Raises:** `ValueError` for an odd `head_dim` with RoPE, `num_heads` not divisible by
    `num_kv_heads`, an unknown activation, pairing or bias name.
    """

    Wq: Float[Array, "H d k"]
    Wk: Float[Array, "G d k"]
    Wv: Float[Array, "G d v"]
    Wo: Float[Array, "H v d"]
    bq: Float[Array, "H k"] | None
    bk: Float[Array, "G k"] | None
    bv: Float[Array, "G v"] | None
    bo: Float[Array, " d"] | None
    rope: str | None = eqx.field(static=True)
    rope_base: float = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    causal: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        key: PRNGKeyArray,
        num_kv_heads: int | None = None,
        value_dim: int | None = None,
        biases: tuple[str, ...] = (),
        rope: str | None = None,
        rope_base: float = 10000.0,
        activation: str = "softmax",
        causal: bool = False,
        dtype=None,
    ):
        G = num_heads if num_kv_heads is None else num_kv_heads
        v = head_dim if value_dim is None else value_dim
        for name, value in (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim),
                            ("num_kv_heads", G), ("value_dim", v)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int; received {value!r}.")
        if num_heads % G:
            raise ValueError(
                f"`num_heads` ({num_heads}) must be a multiple of `num_kv_heads` ({G}): each "
                "key-value head serves the same number of query heads."
            )
        if rope not in ROPE_PAIRINGS:
            raise ValueError(f"`rope` must be one of {ROPE_PAIRINGS}; received {rope!r}.")
        if rope is not None and head_dim % 2:
            raise ValueError(
                f"`rope={rope!r}` rotates pairs of query/key entries: `head_dim` must be even; "
                f"received {head_dim}."
            )
        if activation not in BLOCK_ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {BLOCK_ACTIVATIONS}; received {activation!r}."
            )
        if any(b not in BIASES for b in biases):
            raise ValueError(f"`biases` must be a subset of {BIASES}; received {biases!r}.")
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        ks = jax.random.split(key, 8)

        def normal(k, shape, fan_in):
            return jax.random.normal(k, shape, dtype) / math.sqrt(fan_in)

        self.Wq = normal(ks[0], (num_heads, dim, head_dim), dim)
        self.Wk = normal(ks[1], (G, dim, head_dim), dim)
        self.Wv = normal(ks[2], (G, dim, v), dim)
        self.Wo = normal(ks[3], (num_heads, v, dim), num_heads * v)
        self.bq = normal(ks[4], (num_heads, head_dim), 4.0) if "q" in biases else None
        self.bk = normal(ks[5], (G, head_dim), 4.0) if "k" in biases else None
        self.bv = normal(ks[6], (G, v), 4.0) if "v" in biases else None
        self.bo = normal(ks[7], (dim,), 4.0) if "o" in biases else None
        self.rope, self.rope_base = rope, rope_base
        self.activation, self.causal = activation, causal

    @property
    def num_heads(self) -> int:
        return self.Wq.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.Wk.shape[0]

    @property
    def group(self) -> Array:
        """`g(i)`: the key-value head each query head reads."""
        return jnp.arange(self.num_heads) // (self.num_heads // self.num_kv_heads)

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        H, _, k = self.Wq.shape
        g = self.group
        q = jnp.einsum("nd,hdk->hnk", x, self.Wq)
        kk = jnp.einsum("nd,gdk->gnk", x, self.Wk)
        vv = jnp.einsum("nd,gdv->gnv", x, self.Wv)
        if self.bq is not None:
            q = q + self.bq[:, None]
        if self.bk is not None:
            kk = kk + self.bk[:, None]
        if self.bv is not None:
            vv = vv + self.bv[:, None]
        if self.rope is not None:
            rot = jax.vmap(lambda a: apply_rope(a, self.rope, self.rope_base))
            q, kk = rot(q), rot(kk)
        scores = jnp.einsum("hnk,hmk->hnm", q, kk[g]) / math.sqrt(k)
        n = x.shape[0]
        mask = jnp.tril(jnp.ones((n, n), bool)) if self.causal else jnp.ones((n, n), bool)
        if self.activation == "softmax":
            weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        else:
            weights = jnp.where(mask, scores, 0.0)
        heads = jnp.einsum("hnm,hmv->hnv", weights, vv[g])
        y = jnp.einsum("hnv,hvd->nd", heads, self.Wo)
        return y if self.bo is None else y + self.bo
