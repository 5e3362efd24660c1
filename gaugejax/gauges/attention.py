"""Attention gauge symmetries (Eq. 36-37) for single- and multi-head self-attention.

`attention_gauge(Wq, Wk, Wv, A, alpha)` maps `Wq -> Wq A`, `Wk -> Wk B`, `Wv -> Wv / alpha`.
The scores become `x Wq A B^T Wk^T x^T`, so the symmetry needs `A B^T = alpha I`, i.e.
`B = alpha A^-T` (`condition="derived"`, the default). The printed Eq. 36, `A B = alpha I`
(`condition="printed"`, `B = alpha A^-1`), leaves Eq. 35 invariant only when A is orthogonal
(up to scale); it is kept to measure that (see the README and `experiments/attention_symmetry`).
The alpha part needs a positively homogeneous activation (ReLU, identity): softmax keeps only
alpha = 1, the GL(d) part.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..models.attention import MultiHeadAttention, SelfAttention
from .base import AbstractGauge


CONDITIONS = ("derived", "printed")


def _b_matrix(A, alpha, condition: str):
    if condition == "derived":
        return alpha * jnp.linalg.inv(A).T
    return alpha * jnp.linalg.inv(A)


def _check_gauge_input(A, alpha, head_dim: int):
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] != head_dim:
        raise ValueError(
            f"`A` must be a square ({head_dim}, {head_dim}) matrix; received shape {A.shape}."
        )
    if isinstance(A, jax.core.Tracer) or isinstance(alpha, jax.core.Tracer):
        return
    cond = float(np.linalg.cond(np.asarray(A)))
    if not np.isfinite(cond) or cond > 1e12:
        raise ValueError(f"`A` must be invertible; received a matrix with condition {cond:.2e}.")
    if not float(alpha) > 0:
        raise ValueError(f"`alpha` must be > 0; received {float(alpha)}.")


def attention_gauge(
    Wq: Float[Array, "d e"],
    Wk: Float[Array, "d e"],
    Wv: Float[Array, "d f"],
    A: Float[Array, "e e"],
    alpha,
    *,
    condition: str = "derived",
) -> tuple[Float[Array, "d e"], Float[Array, "d e"], Float[Array, "d f"]]:
    """Eq. 37: `(Wq A, Wk B, Wv / alpha)` with `B = alpha A^-T` (`"derived"`: `A B^T = alpha I`)
    or `B = alpha A^-1` (`"printed"` Eq. 36: `A B = alpha I`).

    **Raises:** `ValueError` for a non-square or singular `A`, `alpha <= 0`, or an unknown
    condition.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"`condition` must be one of {CONDITIONS}; received {condition!r}.")
    _check_gauge_input(jnp.asarray(A), alpha, Wq.shape[1])
    return Wq @ A, Wk @ _b_matrix(A, alpha, condition), Wv / alpha


class AttentionGaugeElement(eqx.Module):
    """`A` (H, e, e), `alpha` (H,), and the value/output mixing `M` (H, e, e) (multi-head)."""

    A: Float[Array, "H e e"]
    alpha: Float[Array, " H"]
    M: Float[Array, "H e e"]


def _well_conditioned(key, shape, log_cond: float):
    """Random matrices `U diag(s) V^T` with singular values in [cond^-1/2, cond^1/2]."""
    ku, kv, ks = jax.random.split(key, 3)
    U = jnp.linalg.qr(jax.random.normal(ku, shape))[0]
    V = jnp.linalg.qr(jax.random.normal(kv, shape))[0]
    s = jnp.exp(jax.random.uniform(ks, shape[:-1], minval=-0.5, maxval=0.5) * log_cond)
    return jnp.einsum("...ij,...j,...kj->...ik", U, s, V)


class AttentionGauge(AbstractGauge):
    """Attention gauges of `SelfAttention` (H = 1) and `MultiHeadAttention` (one `A_h` and
    `alpha_h` per head, and with `value_output=True` the mixing `Wv_h -> Wv_h M_h`,
    `Wo_h -> M_h^-1 Wo_h`).

    **Arguments:**

    - `head_dim` e, `num_heads` H (1 for `SelfAttention`).
    - `rescale`: sample `alpha = exp(0.5 z)` (needs ReLU or identity); False keeps alpha = 1.
    - `value_output`: sample M (multi-head only).
    - `log_condition`: log of the condition number bound of sampled A and M (default log 10).
    - `condition`: `"derived"` (`A B^T = alpha I`) or `"printed"` (Eq. 36 as printed).
    - `require_symmetry`: raise when alpha != 1 meets softmax (no such symmetry), or when the
      printed condition is asked for; False measures the breaking instead.
    """

    head_dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True, default=1)
    rescale: bool = eqx.field(static=True, default=True)
    value_output: bool = eqx.field(static=True, default=False)
    log_condition: float = float(np.log(10.0))
    condition: str = eqx.field(static=True, default="derived")
    require_symmetry: bool = eqx.field(static=True, default=True)
    infinitesimal = False

    def __check_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(
                f"`condition` must be one of {CONDITIONS}; received {self.condition!r}."
            )

    def sample(self, key: PRNGKeyArray) -> AttentionGaugeElement:
        ka, kb, km = jax.random.split(key, 3)
        H, e = self.num_heads, self.head_dim
        A = _well_conditioned(ka, (H, e, e), self.log_condition)
        alpha = jnp.exp(0.5 * jax.random.normal(kb, (H,))) if self.rescale else jnp.ones((H,))
        M = (
            _well_conditioned(km, (H, e, e), self.log_condition)
            if self.value_output
            else jnp.tile(jnp.eye(e), (H, 1, 1))
        )
        return AttentionGaugeElement(A, alpha, M)

    def identity(self) -> AttentionGaugeElement:
        H, e = self.num_heads, self.head_dim
        eye = jnp.tile(jnp.eye(e), (H, 1, 1))
        return AttentionGaugeElement(eye, jnp.ones((H,)), eye)

    def inverse(self, g):
        return AttentionGaugeElement(jnp.linalg.inv(g.A), 1.0 / g.alpha, jnp.linalg.inv(g.M))

    def compose(self, g1, g2):
        return AttentionGaugeElement(g1.A @ g2.A, g1.alpha * g2.alpha, g1.M @ g2.M)

    def _check(self, model, g):
        if self.require_symmetry and self.condition == "printed":
            raise ValueError(
                "the printed Eq. 36 (A B = alpha I) is not a symmetry of Eq. 35 for general A; "
                "use condition='derived' (A B^T = alpha I) or require_symmetry=False to measure."
            )
        if self.require_symmetry and self.rescale and model.activation == "softmax":
            raise ValueError(
                "alpha != 1 is not a symmetry of softmax attention (softmax(alpha s) != "
                "alpha softmax(s)); use rescale=False (the GL(d) part) or require_symmetry=False."
            )

    def act(self, g: AttentionGaugeElement, model):
        if isinstance(model, SelfAttention):
            if self.num_heads != 1 or self.value_output:
                raise ValueError("SelfAttention takes num_heads=1 and value_output=False.")
            self._check(model, g)
            Wq, Wk, Wv = attention_gauge(
                model.Wq, model.Wk, model.Wv, g.A[0], g.alpha[0], condition=self.condition
            )
            return eqx.tree_at(lambda m: (m.Wq, m.Wk, m.Wv), model, (Wq, Wk, Wv))
        if isinstance(model, MultiHeadAttention):
            if model.Wq.shape[0] != self.num_heads or model.Wq.shape[2] != self.head_dim:
                raise ValueError(
                    f"gauge has {self.num_heads} heads of dim {self.head_dim}; the model has "
                    f"{model.Wq.shape[0]} of dim {model.Wq.shape[2]}."
                )
            self._check(model, g)
            Wq, Wk, Wv = jax.vmap(
                lambda q, k, v, A, a: attention_gauge(q, k, v, A, a, condition=self.condition)
            )(model.Wq, model.Wk, model.Wv, g.A, g.alpha)
            Wv = Wv @ g.M
            Wo = jnp.linalg.solve(g.M, model.Wo)
            return eqx.tree_at(lambda m: (m.Wq, m.Wk, m.Wv, m.Wo), model, (Wq, Wk, Wv, Wo))
        raise TypeError(
            "AttentionGauge acts on SelfAttention or MultiHeadAttention; received "
            f"{type(model).__name__}."
        )
