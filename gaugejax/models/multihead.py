"""Self-attention (Eq. 35): functional core and equinox modules."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


ATTENTION_ACTIVATIONS = ("relu", "softmax", "identity")


def _check_activation(activation: str) -> str:
    if activation not in ATTENTION_ACTIVATIONS:
        raise ValueError(
            f"`activation` must be one of {ATTENTION_ACTIVATIONS}; received {activation!r}."
        )
    return activation


def attention(
    x: Float[Array, "n d"],
    Wq: Float[Array, "d e"],
    Wk: Float[Array, "d e"],
    Wv: Float[Array, "d f"],
    activation: str = "softmax",
    *,
    scaled: bool = False,
) -> Float[Array, "n f"]:
    """`h_I = sum_J phi((x_I Wq)(x_J Wk)^T) (x_J Wv)` (Eq. 35).

    **Arguments:**

    - `x`: n tokens of dimension d; `Wq`, `Wk` (d, e); `Wv` (d, f).
    - `activation`: `"relu"`, `"softmax"` (row-normalised over J) or `"identity"`.
    - `scaled`: divide the scores by sqrt(e) (the usual transformer scaling).

    **Returns:** (n, f).
    """
    _check_activation(activation)
    if Wq.shape != Wk.shape or Wq.shape[0] != x.shape[-1] or Wv.shape[0] != x.shape[-1]:
        raise ValueError(
            f"`Wq` and `Wk` must both be (d, e) and `Wv` (d, f) with d = {x.shape[-1]}; received "
            f"Wq {Wq.shape}, Wk {Wk.shape}, Wv {Wv.shape}."
        )
    scores = (x @ Wq) @ (x @ Wk).T
    if scaled:
        scores = scores / math.sqrt(Wq.shape[1])
    if activation == "relu":
        weights = jax.nn.relu(scores)
    elif activation == "softmax":
        weights = jax.nn.softmax(scores, axis=-1)
    else:
        weights = scores
    return weights @ (x @ Wv)


class SelfAttention(eqx.Module):
    """Single-head self-attention `x -> attention(x, Wq, Wk, Wv, activation)` (Eq. 35)."""

    Wq: Float[Array, "d e"]
    Wk: Float[Array, "d e"]
    Wv: Float[Array, "d f"]
    activation: str = eqx.field(static=True, default="softmax")
    scaled: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        _check_activation(self.activation)

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n f"]:
        return attention(x, self.Wq, self.Wk, self.Wv, self.activation, scaled=self.scaled)


class MultiHeadAttention(eqx.Module):
    """Multi-head self-attention with an output projection, optional residual and LayerNorm:
    `y = LN(x + concat_h(attention(x, Wq_h, Wk_h, Wv_h)) Wo)` (LN and the residual optional).

    **Arguments:** `dim` d, `num_heads` H, `head_dim`; `activation`; `residual`; `layer_norm`
    (and its `norm_eps`); `scaled` (scores / sqrt(head_dim)); `key`.
    Weights: `Wq`, `Wk`, `Wv` (H, d, head_dim), `Wo` (H, head_dim, d).
    """

    Wq: Float[Array, "H d e"]
    Wk: Float[Array, "H d e"]
    Wv: Float[Array, "H d e"]
    Wo: Float[Array, "H e d"]
    norm: eqx.nn.LayerNorm | None
    activation: str = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    scaled: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        key: PRNGKeyArray,
        activation: str = "softmax",
        residual: bool = False,
        layer_norm: bool = False,
        norm_eps: float = 1e-5,
        scaled: bool = True,
    ):
        self.activation = _check_activation(activation)
        kq, kk, kv, ko = jax.random.split(key, 4)
        shape = (num_heads, dim, head_dim)
        self.Wq = jax.random.normal(kq, shape) / math.sqrt(dim)
        self.Wk = jax.random.normal(kk, shape) / math.sqrt(dim)
        self.Wv = jax.random.normal(kv, shape) / math.sqrt(dim)
        self.Wo = jax.random.normal(ko, (num_heads, head_dim, dim)) / math.sqrt(
            num_heads * head_dim
        )
        self.norm = eqx.nn.LayerNorm(dim, eps=norm_eps) if layer_norm else None
        self.residual, self.scaled = residual, scaled

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        heads = jax.vmap(
            lambda q, k, v: attention(x, q, k, v, self.activation, scaled=self.scaled)
        )(self.Wq, self.Wk, self.Wv)
        y = jnp.einsum("hne,hed->nd", heads, self.Wo)
        if self.residual:
            y = x + y
        if self.norm is not None:
            y = jax.vmap(self.norm)(y)
        return y


class MergedAttention(eqx.Module):
    """Attention parametrised by `W_qk = Wq Wk^T` (footnote 10): the scores are `x W_qk x^T`.
    Invariant under the GL(d) part of the attention gauge, so it fixes that gauge."""

    Wqk: Float[Array, "d d"]
    Wv: Float[Array, "d f"]
    activation: str = eqx.field(static=True, default="softmax")
    scaled_by: float = eqx.field(static=True, default=1.0)

    @classmethod
    def from_attention(cls, model: SelfAttention) -> "MergedAttention":
        scale = math.sqrt(model.Wq.shape[1]) if model.scaled else 1.0
        return cls(model.Wq @ model.Wk.T, model.Wv, model.activation, scale)

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n f"]:
        eye = jnp.eye(self.Wqk.shape[0], dtype=self.Wqk.dtype)
        return attention(x, self.Wqk / self.scaled_by, eye, self.Wv, self.activation)
