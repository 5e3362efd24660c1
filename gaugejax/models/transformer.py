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
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


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


MLP_KINDS = ("swiglu", "gelu", "gelu_tanh")
NORMS = ("rms", "layer")


class BlockMLP(eqx.Module):
    """The MLP of a block. `kind="swiglu"`: `(silu(x W1) * (x W3)) W2` (LLaMA; no biases);
    `kind="gelu"`: `gelu(x W1 + b1) W2 + b2` with the exact (erf) GELU; `kind="gelu_tanh"`: the
    same with GELU's tanh approximation (GPT-2's `gelu_new`). `W1`, `W3` (d, f), `W2` (f, d)."""

    W1: Float[Array, "d f"]
    W2: Float[Array, "f d"]
    W3: Float[Array, "d f"] | None
    b1: Float[Array, " f"] | None
    b2: Float[Array, " d"] | None
    kind: str = eqx.field(static=True)

    def __init__(
        self, dim: int, hidden: int, kind: str = "swiglu", *, key: PRNGKeyArray, dtype=None
    ):
        if kind not in MLP_KINDS:
            raise ValueError(f"`kind` must be one of {MLP_KINDS}; received {kind!r}.")
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        self.W1 = jax.random.normal(k1, (dim, hidden), dtype) / math.sqrt(dim)
        self.W2 = jax.random.normal(k2, (hidden, dim), dtype) / math.sqrt(hidden)
        gated = kind == "swiglu"
        self.W3 = jax.random.normal(k3, (dim, hidden), dtype) / math.sqrt(dim) if gated else None
        self.b1 = None if gated else 0.5 * jax.random.normal(k4, (hidden,), dtype)
        self.b2 = None if gated else 0.5 * jax.random.normal(k5, (dim,), dtype)
        self.kind = kind

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        if self.kind == "swiglu":
            return (jax.nn.silu(x @ self.W1) * (x @ self.W3)) @ self.W2
        tanh = self.kind == "gelu_tanh"
        return jax.nn.gelu(x @ self.W1 + self.b1, approximate=tanh) @ self.W2 + self.b2


class TransformerBlock(eqx.Module):
    """A pre-norm block: `x + attn(norm1(x))`, then `+ mlp(norm2(x))`.

    **Arguments:** `dim`, `num_heads`, `head_dim`, `hidden` (MLP width); `norm`: `"rms"`
    (`eqx.nn.RMSNorm`) or `"layer"` (`eqx.nn.LayerNorm`); `norm_gain`: whether the norms
    have a gain (False: folded into the next weights, as rotation-based methods do);
    `norm_bias`: whether they have a bias (GPT-2's LayerNorms do); `mlp`: `"swiglu"`, `"gelu"`
    or `"gelu_tanh"`; the other keywords go to `BlockAttention`.
    """

    norm1: eqx.nn.RMSNorm | eqx.nn.LayerNorm
    attn: BlockAttention
    norm2: eqx.nn.RMSNorm | eqx.nn.LayerNorm
    mlp: BlockMLP

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        hidden: int,
        *,
        key: PRNGKeyArray,
        norm: str = "rms",
        norm_gain: bool = False,
        norm_bias: bool = False,
        mlp: str = "swiglu",
        dtype=None,
        **attention: Any,
    ):
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}; received {norm!r}.")
        ka, km = jax.random.split(key)
        make = eqx.nn.RMSNorm if norm == "rms" else eqx.nn.LayerNorm
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        self.norm1 = make(dim, use_weight=norm_gain, use_bias=norm_bias, dtype=dtype)
        self.norm2 = make(dim, use_weight=norm_gain, use_bias=norm_bias, dtype=dtype)
        self.attn = BlockAttention(dim, num_heads, head_dim, key=ka, dtype=dtype, **attention)
        self.mlp = BlockMLP(dim, hidden, mlp, key=km, dtype=dtype)

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        x = x + self.attn(jax.vmap(self.norm1)(x))
        return x + self.mlp(jax.vmap(self.norm2)(x))


class Decoder(eqx.Module):
    """A small decoder: `W_in` (in, d) into the residual stream, `TransformerBlock`s (causal
    attention by default), a final norm and `W_out` (d, out).

    The input is either continuous, `x (n, in)` read in as `x W_in`, or token ids, an integer
    `(n,)` array whose rows of `W_in` (then the token embedding, `in` the vocabulary) are
    looked up: the same map on one-hot rows. Optional learned `positions` (n_max, d) are
    added to the read-in (GPT-2's `wpe`; row p at position p), and an optional read-out bias
    `b_out` (out,) to the output (where `fuse_layernorm` folds a final norm's bias). Both are
    None as built: set them with `eqx.tree_at` (`gj.from_huggingface` does).

    **Arguments:** `in_dim`, `out_dim`, `dim`, `num_blocks`, and `TransformerBlock`'s
    arguments (`num_heads`, `head_dim`, `hidden`, `norm`, `norm_gain`, `norm_bias`, `mlp`,
    attention keywords; `causal` defaults to True here).
    """

    W_in: Float[Array, "i d"]
    blocks: tuple[TransformerBlock, ...]
    norm: eqx.nn.RMSNorm | eqx.nn.LayerNorm
    W_out: Float[Array, "d o"]
    positions: Float[Array, "m d"] | None
    b_out: Float[Array, " o"] | None

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        dim: int,
        num_blocks: int,
        num_heads: int,
        head_dim: int,
        hidden: int,
        *,
        key: PRNGKeyArray,
        norm: str = "rms",
        norm_gain: bool = False,
        norm_bias: bool = False,
        dtype=None,
        **block: Any,
    ):
        block.setdefault("causal", True)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        keys = jax.random.split(key, num_blocks + 2)
        self.W_in = jax.random.normal(keys[0], (in_dim, dim), dtype) / math.sqrt(in_dim)
        self.blocks = tuple(
            TransformerBlock(dim, num_heads, head_dim, hidden, key=k, norm=norm,
                             norm_gain=norm_gain, norm_bias=norm_bias, dtype=dtype, **block)
            for k in keys[2:]
        )  # fmt: skip
        make = eqx.nn.RMSNorm if norm == "rms" else eqx.nn.LayerNorm
        self.norm = make(dim, use_weight=norm_gain, use_bias=norm_bias, dtype=dtype)
        self.W_out = jax.random.normal(keys[1], (dim, out_dim), dtype) / math.sqrt(dim)
        self.positions = None
        self.b_out = None

    def __call__(self, x: Float[Array, "n i"] | Int[Array, " n"]) -> Float[Array, "n o"]:
        return _decoder_forward(self, x)

    def _forward(self, x: Float[Array, "n i"] | Int[Array, " n"]) -> Float[Array, "n o"]:
        # token ids: a row lookup, the one-hot product without the (n, vocab) one-hot
        h = self.W_in[x] if jnp.issubdtype(x.dtype, jnp.integer) else x @ self.W_in
        if self.positions is not None:
            if h.shape[0] > self.positions.shape[0]:
                raise ValueError(
                    f"Decoder has learned positions for {self.positions.shape[0]} tokens; "
                    f"received {h.shape[0]}."
                )
            h = h + self.positions[: h.shape[0]]
        for b in self.blocks:
            h = b(h)
        out = jax.vmap(self.norm)(h) @ self.W_out
        return out if self.b_out is None else out + self.b_out


# the forward pass compiled once per decoder structure and input shape: called eagerly (or
# under an eager `vmap`) it ran as one small program per operation and shape; under an outer
# transformation it is traced into the caller's program as before
@eqx.filter_jit
def _decoder_forward(model: Decoder, x: Array) -> Array:
    return model._forward(x)


def _centred(W: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """`W C` with `C = 1 - 11^T / d`: each row's mean over the residual channels removed."""
    return W - jnp.mean(W, axis=-1, keepdims=True)


def fuse_layernorm(model: Decoder) -> Decoder:
    """The RMSNorm form of a LayerNorm `Decoder`, functionally equal (SliceGPT's fusion), with
    every norm bias folded into the reads it feeds.

    Every read of the residual stream goes through a norm (pre-norm blocks, a final norm), and
    LayerNorm removes the stream's mean before anything reads it, so the mean of every write
    is invisible. Centring every write (`W_in`, learned `positions`, each attention's `Wo` and
    `bo`, each MLP's `W2` and `b2`: `W -> W (1 - 11^T/d)`) keeps the stream mean-free, where
    LayerNorm equals an RMSNorm with the same gain and `eps` (its variance is then
    `mean(x^2)`). A norm's bias `beta` is a constant the next affine reads add: it moves into
    their biases (`bq_i += beta Wq_i`, likewise `bk`, `bv`, created where missing; a GELU
    MLP's `b1 += beta W1`; the final norm's into the read-out bias `b_out += beta W_out`).
    On the fused model an orthogonal residual map is an exact symmetry (`DecoderGauge`),
    which LayerNorm itself breaks. An RMSNorm decoder has only its norm biases folded (none:
    returned as it is).

    **Arguments:** `model`: a `Decoder` whose norms are all LayerNorms (or all RMSNorms).

    **Returns:** a `Decoder` with RMSNorms without biases whose outputs equal `model`'s to
    rounding.

    **Raises:** `TypeError` for anything but a `Decoder`; `ValueError` for a bias on a norm
    feeding a SwiGLU MLP (which has no bias to take it) or a decoder mixing the two norms (an
    RMSNorm would read the centred stream differently).
    """
    if not isinstance(model, Decoder):
        raise TypeError(
            f"`model` of fuse_layernorm must be a gaugejax Decoder; received "
            f"{type(model).__name__}."
        )
    norms = [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
    layer = [isinstance(n, eqx.nn.LayerNorm) for n in norms]
    if not any(layer) and not any(n.use_bias for n in norms):
        return model
    if any(layer) and not all(layer):
        raise ValueError(
            "`model` of fuse_layernorm mixes LayerNorm and RMSNorm; expected one kind of norm "
            f"(received LayerNorm at {sum(layer)} of {len(layer)} norms)."
        )
    for i, b in enumerate(model.blocks):
        if b.norm2.use_bias and b.mlp.b1 is None:
            raise ValueError(
                f"`model.blocks[{i}].norm2` has a bias and feeds a {b.mlp.kind} MLP without a "
                "first bias `b1`: fuse_layernorm has nowhere to fold it."
            )
    centre = _centred if all(layer) else (lambda x: x)
    dtype = model.W_in.dtype

    def rms(norm) -> eqx.nn.RMSNorm:
        (d,) = norm.shape
        fused = eqx.nn.RMSNorm(d, eps=norm.eps, use_weight=norm.use_weight, use_bias=False,
                               dtype=dtype)  # fmt: skip
        return fused if not norm.use_weight else eqx.tree_at(lambda n: n.weight, fused, norm.weight)

    def fold(norm, W, b, spec):  # the read bias after the norm's bias moved into it
        if not norm.use_bias:
            return b
        moved = jnp.einsum(spec, norm.bias, W)
        return moved if b is None else b + moved

    def maybe(f, x):
        return None if x is None else f(x)

    blocks = []
    for b in model.blocks:
        a, n1 = b.attn, b.norm1
        blocks.append(
            eqx.tree_at(
                lambda b: (
                    b.norm1,
                    b.norm2,
                    b.attn.bq,
                    b.attn.bk,
                    b.attn.bv,
                    b.attn.Wo,
                    b.attn.bo,
                    b.mlp.b1,
                    b.mlp.W2,
                    b.mlp.b2,
                ),
                b,
                (
                    rms(n1),
                    rms(b.norm2),
                    fold(n1, a.Wq, a.bq, "d,hdk->hk"),
                    fold(n1, a.Wk, a.bk, "d,gdk->gk"),
                    fold(n1, a.Wv, a.bv, "d,gdv->gv"),
                    centre(a.Wo),
                    maybe(centre, a.bo),
                    fold(b.norm2, b.mlp.W1, b.mlp.b1, "d,df->f"),
                    centre(b.mlp.W2),
                    maybe(centre, b.mlp.b2),
                ),
                is_leaf=lambda x: x is None,
            )  # fmt: skip
        )
    return eqx.tree_at(
        lambda m: (m.W_in, m.positions, m.blocks, m.norm, m.b_out),
        model,
        (
            centre(model.W_in),
            maybe(centre, model.positions),
            tuple(blocks),
            rms(model.norm),
            fold(model.norm, model.W_out, model.b_out, "d,do->o"),
        ),
        is_leaf=lambda x: x is None,
    )
