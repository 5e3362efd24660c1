"""Attention gauge symmetries (Eq. 36-37) for single- and multi-head attention.

`attention_gauge(Wq, Wk, Wv, A, alpha)` maps `Wq -> Wq A`, `Wk -> Wk B`, `Wv -> Wv / alpha`.
The scores become `x Wq A B^T Wk^T x^T`, so the symmetry needs `A B^T = alpha I`, i.e.
`B = alpha A^-T` (`condition="derived"`, the default). The printed Eq. 36, `A B = alpha I`
(`condition="printed"`, `B = alpha A^-1`), leaves Eq. 35 invariant only when A is orthogonal
(up to scale); it is kept to measure that (see the README and `experiments/attention_symmetry`).
The alpha part needs a positively homogeneous activation (ReLU, identity): softmax keeps only
alpha = 1, the GL(d) part.

`AttentionGauge` acts on `SelfAttention`, gaugejax `MultiHeadAttention` and
`eqx.nn.MultiheadAttention` (with its biases: the softmax-only key and value shifts below).
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._core._checks import check_value
from ..models.multihead import MultiHeadAttention, SelfAttention
from .base import AbstractParameterGauge, model_error, well_conditioned


CONDITIONS = ("derived", "printed")
# a matrix whose condition number exceeds this is refused as singular (its inverse would carry
# no correct digit in float32 and few in float64)
_MAX_CONDITION = 1e12
_EXPECTED = "SelfAttention, MultiHeadAttention (gaugejax) or eqx.nn.MultiheadAttention"
_HOW = (
    "Put the projection weights of another attention layer into gaugejax.SelfAttention or "
    "gaugejax.MultiHeadAttention (or use eqx.nn.MultiheadAttention)."
)


# ----------------------------------------------------------------------------------------------
# Value checks (`check_value`): a ValueError now for concrete values, a runtime error for traced
# ones, with one message; the checked value is returned and used, so no check is ever skipped.


def _checked_matrix(name: str, A):
    """`A` (..., n, n), unchanged, after checking it is finite and invertible."""

    def failed():
        a = jax.lax.stop_gradient(jnp.asarray(A))
        cond = jnp.linalg.cond(a) if a.size else jnp.ones(())  # NaN for a singular matrix
        return ~jnp.all(jnp.isfinite(a)) | ~jnp.all(cond <= _MAX_CONDITION)

    def received():  # on the host, where numpy reports a singular matrix's condition as inf
        a = np.asarray(A)
        if not np.all(np.isfinite(a)):
            return "Received a matrix with non-finite entries."
        return f"Received a matrix with condition {float(np.max(np.linalg.cond(a))):.2e}."

    message = f"`{name}` must be finite and invertible (condition <= {_MAX_CONDITION:g})."
    return check_value(A, failed, message, received=received)


def _checked_alpha(name: str, alpha):
    """`alpha`, unchanged, after checking every entry is finite and > 0."""

    def failed():
        a = jax.lax.stop_gradient(jnp.asarray(alpha))
        return ~jnp.all(jnp.isfinite(a) & (a > 0))

    return check_value(
        alpha,
        failed,
        f"`{name}` must be finite and > 0.",
        received=lambda: f"Received {np.asarray(alpha)}.",
    )


def _checked_finite(name: str, x):
    """`x`, unchanged, after checking it is finite."""
    return check_value(
        x,
        lambda: ~jnp.all(jnp.isfinite(jax.lax.stop_gradient(jnp.asarray(x)))),
        f"`{name}` must be finite.",
        received=lambda: "Received non-finite entries.",
    )


def _as_fixed_alpha(alpha):
    """Converter of `AttentionGauge.fixed_alpha`: None, or a checked array (never a float, so
    different alphas share one compiled program)."""
    if alpha is None:
        return None
    return _checked_alpha("fixed_alpha", jnp.asarray(alpha))


# ----------------------------------------------------------------------------------------------
# The transformation itself.


def _b_matrix(A, alpha, condition: str):
    """`B` per `condition` for `A` (..., e, e) and `alpha` (...)."""
    a = jnp.asarray(alpha)[..., None, None]
    inv = jnp.linalg.inv(A)
    if condition == "derived":
        return a * jnp.swapaxes(inv, -1, -2)
    return a * inv


def _gauge_weights(Wq, Wk, Wv, A, alpha, condition: str):
    return Wq @ A, Wk @ _b_matrix(A, alpha, condition), Wv / alpha


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

    **Arguments:**

    - `Wq`, `Wk` (d, e), `Wv` (d, f): the weights of `SelfAttention` (row convention, `x Wq`).
    - `A` (e, e): invertible; `alpha`: a finite positive scalar.
    - `condition`: `"derived"` (default) or `"printed"`.

    **Returns:** the transformed `(Wq, Wk, Wv)`.

    **Raises:** `ValueError` for a non-square `A`, an unknown condition, and (for concrete
    values) a non-finite or singular `A` (condition number > 1e12) or a non-finite or
    non-positive `alpha`, naming the argument. Traced values (under `jit`) are checked by
    `eqx.error_if`: the same defects raise when the program runs.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"`condition` must be one of {CONDITIONS}; received {condition!r}.")
    A = jnp.asarray(A)
    e = Wq.shape[1]
    if A.ndim != 2 or A.shape != (e, e):
        raise ValueError(f"`A` must be a square ({e}, {e}) matrix; received shape {A.shape}.")
    A = _checked_matrix("A", A)
    alpha = _checked_alpha("alpha", alpha)
    return _gauge_weights(Wq, Wk, Wv, A, alpha, condition)


class AttentionGaugeElement(eqx.Module):
    """An element of `AttentionGauge`: per head h,

    - `A` (H, qk, qk): queries `q_h -> A_h^T q_h`, keys `k_h -> B_h^T k_h + key_shift_h` with
      `B_h = alpha_h A_h^-T` (so `q . k -> alpha_h q . k + q . A_h key_shift_h`);
    - `alpha` (H,): the score scale (values `/ alpha_h` in the gaugejax models);
    - `M` (H, vo, vo): values `v_h -> M_h^T v_h + value_shift_h`, output columns of head h
      `-> W_o,h M_h^-T`, output bias `-> b_o - sum_h W_o,h M_h^-T value_shift_h`;
    - `value_shift` (H, vo), `key_shift` (H, qk): bias shifts (`eqx.nn.MultiheadAttention`).

    Group law (`compose(g1, g2)` acts as g1 then g2), exact on every supported model:
    `A = A1 A2`, `alpha = alpha1 alpha2`, `M = M1 M2`, `value_shift = M2^T s1 + s2`,
    `key_shift = alpha2 A2^-1 t1 + t2`; inverse: `A^-1`, `1/alpha`, `M^-1`, `-M^-T s`,
    `-(1/alpha) A t`. (Keys and values are affine maps `k -> L k + t`; the laws are those of
    the affine group.)
    """

    A: Float[Array, "H qk qk"]
    alpha: Float[Array, " H"]
    M: Float[Array, "H vo vo"]
    value_shift: Float[Array, "H vo"]
    key_shift: Float[Array, "H qk"]


def _model_sizes(model) -> tuple[str, int, int, int | None, bool, bool, bool]:
    """`(kind, heads, qk, vo, has_key_bias, has_value_shift_biases, softmax)` or TypeError."""
    if isinstance(model, SelfAttention):
        return ("SelfAttention", 1, model.Wq.shape[1], None, False, False, _softmax(model))
    if isinstance(model, MultiHeadAttention):
        H, _, e = model.Wq.shape
        return ("MultiHeadAttention", H, e, model.Wv.shape[2], False, False, _softmax(model))
    if isinstance(model, eqx.nn.MultiheadAttention):
        return (
            "eqx.nn.MultiheadAttention",
            model.num_heads,
            model.qk_size,
            model.vo_size,
            model.use_key_bias,
            model.use_value_bias and model.use_output_bias,
            True,
        )
    raise model_error("AttentionGauge", _EXPECTED, model, how=_HOW)


def _softmax(model) -> bool:
    return model.activation == "softmax"


class AttentionGauge(AbstractParameterGauge):
    """Attention gauges of `SelfAttention` (H = 1), gaugejax `MultiHeadAttention` and
    `eqx.nn.MultiheadAttention`: per head h an invertible `A_h` (queries `A_h^T q`, keys
    `B_h^T k`, `A_h B_h^T = alpha_h I`), a score scale `alpha_h`, with `value_output=True` the
    value/output mixing `M_h`, and on `eqx.nn.MultiheadAttention` with biases the softmax-only
    bias shifts. Elements are `AttentionGaugeElement`s (see its group law).

    **Arguments:**

    - `head_dim`: the query/key dimension per head (qk); `num_heads` H (1 for `SelfAttention`).
    - `rescale`: sample `alpha = exp(0.5 z)` (needs ReLU or identity scores); False keeps
      alpha = 1. Softmax (every `eqx.nn.MultiheadAttention`) admits only alpha = 1.
    - `value_output`: sample M (models with an output projection only).
    - `log_condition`: log of the condition number bound of sampled A and M (default log 10).
    - `condition`: `"derived"` (`A B^T = alpha I`) or `"printed"` (Eq. 36 as printed).
    - `require_symmetry`: raise when alpha != 1 meets softmax (no such symmetry), or when the
      printed condition is asked for; False measures the breaking instead.
    - `value_dim`: the value/output dimension per head (vo; None: `head_dim`).
    - `value_shift`: sample a value-bias shift (H, vo) moved into the output bias:
      `b_v -> b_v + s`, `b_o -> b_o - W_o s`. Exact because every row of softmax weights sums
      to 1 (attention of constant values is that constant). Needs both a value and an output
      bias. It breaks wherever rows do not sum to 1: dropout in training mode; an attention
      that zeroes the weights of a fully masked row (a key-padding mask hiding every key of a
      query). Equinox itself gives such a row uniform weights, so the shift stays exact there.
    - `key_shift`: sample a key-bias shift (H, qk): `b_k -> b_k + t` adds `q . A t` to every
      score of query q, a constant over the keys, which softmax removes (masks included:
      equinox masks after the scores). Needs a key bias.
    - `fixed_alpha`: None (sample alpha per `rescale`), or an array (scalar or (H,)): use that
      alpha for every sample (needs `rescale=True`). An array, not a float, so gauges with
      different alphas share one compiled sweep program.

    On `eqx.nn.MultiheadAttention` (always softmax) alpha scales the keys only (the scores by
    alpha; never a symmetry there, so only with `require_symmetry=False`); dividing the values
    as well would not compensate softmax and would make the value shift's law not closed.
    Neither `process_heads` (e.g. rotary embeddings) nor an attention other than equinox's
    softmax is covered: the gauge acts on the parameters as listed above.
    """

    head_dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True, default=1)
    rescale: bool = eqx.field(static=True, default=True)
    value_output: bool = eqx.field(static=True, default=False)
    log_condition: float = float(np.log(10.0))
    condition: str = eqx.field(static=True, default="derived")
    require_symmetry: bool = eqx.field(static=True, default=True)
    value_dim: int | None = eqx.field(static=True, default=None)
    value_shift: bool = eqx.field(static=True, default=False)
    key_shift: bool = eqx.field(static=True, default=False)
    fixed_alpha: Float[Array, "*heads"] | None = eqx.field(default=None, converter=_as_fixed_alpha)
    infinitesimal = False

    def __check_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(
                f"`condition` must be one of {CONDITIONS}; received {self.condition!r}."
            )
        if self.fixed_alpha is not None:
            if not self.rescale:
                raise ValueError(
                    "`fixed_alpha` sets alpha, which `rescale=False` keeps at 1; pass "
                    "rescale=True with fixed_alpha (or fixed_alpha=None)."
                )
            if self.fixed_alpha.shape not in ((), (self.num_heads,)):
                raise ValueError(
                    f"`fixed_alpha` must be a scalar or ({self.num_heads},) array; received "
                    f"shape {self.fixed_alpha.shape}."
                )

    @property
    def vo_dim(self) -> int:
        """The value/output dimension per head (`value_dim`, or `head_dim` when None)."""
        return self.head_dim if self.value_dim is None else self.value_dim

    @classmethod
    def from_model(
        cls,
        model: Any,
        *,
        rescale: bool | None = None,
        value_output: bool | None = None,
        value_shift: bool | None = None,
        key_shift: bool | None = None,
        **kwargs: Any,
    ) -> "AttentionGauge":
        """The gauge with the head count and sizes of `model`.

        **Arguments:**

        - `model`: a `SelfAttention`, gaugejax `MultiHeadAttention` or
          `eqx.nn.MultiheadAttention`.
        - `rescale`: None: True for ReLU/identity scores, False for softmax (always for
          `eqx.nn.MultiheadAttention`).
        - `value_output`: None: True where the model has an output projection (not
          `SelfAttention`).
        - `value_shift`, `key_shift`: None: True where the model has the biases they need.
        - `**kwargs`: the other fields (`log_condition`, `condition`, `require_symmetry`,
          `fixed_alpha`).

        **Raises:** as `check_model` (e.g. `rescale=True` on softmax attention, `ValueError`).
        """
        kind, H, qk, vo, key_bias, value_biases, softmax = _model_sizes(model)
        has_output = kind != "SelfAttention"
        gauge = cls(
            qk,
            H,
            rescale=(not softmax) if rescale is None else rescale,
            value_output=has_output if value_output is None else value_output,
            value_dim=vo,
            value_shift=value_biases if value_shift is None else value_shift,
            key_shift=key_bias if key_shift is None else key_shift,
            **kwargs,
        )
        gauge.check_model(model)
        return gauge

    def check_model(self, model: Any) -> None:
        """Raise unless this family acts on `model`; nothing is traced.

        **Raises:** `TypeError` for a model other than `SelfAttention`, gaugejax
        `MultiHeadAttention` or `eqx.nn.MultiheadAttention`. `ValueError` when the head count or
        head dims differ from the model's (both named), for `value_output` on `SelfAttention`,
        for a shift whose biases the model lacks, and, with `require_symmetry`, for `rescale`
        on softmax attention or the printed condition.
        """
        kind, H, qk, vo, key_bias, value_biases, softmax = _model_sizes(model)
        if H != self.num_heads or qk != self.head_dim or (vo is not None and vo != self.vo_dim):
            theirs = f"{H} heads of query/key dim {qk}" + (
                "" if vo is None else f" and value dim {vo}"
            )
            raise ValueError(
                f"AttentionGauge has {self.num_heads} heads of query/key dim {self.head_dim} and "
                f"value dim {self.vo_dim}; the {kind} has {theirs}. Use "
                "AttentionGauge.from_model(model)."
            )
        if self.value_output and kind == "SelfAttention":
            raise ValueError(
                "SelfAttention has no output projection: the value/output mixing needs "
                "value_output=False (use MultiHeadAttention)."
            )
        if self.value_shift and not value_biases:
            raise ValueError(
                f"`value_shift` moves the value bias into the output bias; the {kind} lacks one "
                "of them (eqx.nn.MultiheadAttention with use_value_bias and use_output_bias)."
            )
        if self.key_shift and not key_bias:
            raise ValueError(
                f"`key_shift` shifts the key bias; the {kind} has none "
                "(eqx.nn.MultiheadAttention with use_key_bias)."
            )
        if self.require_symmetry and self.condition == "printed":
            raise ValueError(
                "the printed Eq. 36 (A B = alpha I) is not a symmetry of Eq. 35 for general A; "
                "use condition='derived' (A B^T = alpha I) or require_symmetry=False to measure."
            )
        if self.require_symmetry and self.rescale and softmax:
            raise ValueError(
                f"alpha != 1 is not a symmetry of softmax attention ({kind}; softmax(alpha s) "
                "!= alpha softmax(s)); use rescale=False (the GL(d) part) or "
                "require_symmetry=False."
            )

    def sample(self, key: PRNGKeyArray) -> AttentionGaugeElement:
        ka, kb, km = jax.random.split(key, 3)
        ks, kt = jax.random.split(jax.random.fold_in(key, 3))
        H, e, vo = self.num_heads, self.head_dim, self.vo_dim
        A = well_conditioned(ka, (H, e, e), self.log_condition)
        if self.fixed_alpha is not None:
            alpha = jnp.broadcast_to(self.fixed_alpha, (H,)).astype(A.dtype)
        elif self.rescale:
            alpha = jnp.exp(0.5 * jax.random.normal(kb, (H,)))
        else:
            alpha = jnp.ones((H,))
        M = (
            well_conditioned(km, (H, vo, vo), self.log_condition)
            if self.value_output
            else jnp.tile(jnp.eye(vo), (H, 1, 1))
        )
        s = jax.random.normal(ks, (H, vo)) if self.value_shift else jnp.zeros((H, vo))
        t = jax.random.normal(kt, (H, e)) if self.key_shift else jnp.zeros((H, e))
        return AttentionGaugeElement(A, alpha, M, s, t)

    def identity(self) -> AttentionGaugeElement:
        H, e, vo = self.num_heads, self.head_dim, self.vo_dim
        return AttentionGaugeElement(
            jnp.tile(jnp.eye(e), (H, 1, 1)),
            jnp.ones((H,)),
            jnp.tile(jnp.eye(vo), (H, 1, 1)),
            jnp.zeros((H, vo)),
            jnp.zeros((H, e)),
        )

    def inverse(self, g: AttentionGaugeElement) -> AttentionGaugeElement:
        Minv = jnp.linalg.inv(g.M)
        return AttentionGaugeElement(
            jnp.linalg.inv(g.A),
            1.0 / g.alpha,
            Minv,
            -jnp.einsum("hji,hj->hi", Minv, g.value_shift),
            -jnp.einsum("hij,hj->hi", g.A, g.key_shift) / g.alpha[:, None],
        )

    def compose(self, g1: AttentionGaugeElement, g2: AttentionGaugeElement):
        key_shift = g2.alpha[:, None] * jnp.linalg.solve(g2.A, g1.key_shift[..., None])[..., 0]
        return AttentionGaugeElement(
            g1.A @ g2.A,
            g1.alpha * g2.alpha,
            g1.M @ g2.M,
            jnp.einsum("hji,hj->hi", g2.M, g1.value_shift) + g2.value_shift,
            key_shift + g2.key_shift,
        )

    def control(self) -> "AttentionGauge":
        """The same family with `condition="printed"` and `require_symmetry=False`: keys map by
        `alpha A^-T` instead of `alpha A^-1`, so `A B^T != alpha I` and the scores change by
        O(1) for general A (the negative control). Not a group action (the printed `B` does not
        compose with `A`)."""
        return dataclasses.replace(self, condition="printed", require_symmetry=False)

    def act(self, g: AttentionGaugeElement, model: Any) -> Any:
        """The transformed model (see `AttentionGaugeElement` for the action per head).

        **Raises:** as `check_model`; for a concrete element, `ValueError` for a non-finite or
        singular `A` or `M`, a non-finite or non-positive `alpha` or non-finite shifts (a traced
        element raises the same at run time, by `eqx.error_if`). Parts the model lacks are
        ignored: M and the shifts on `SelfAttention`, the shifts on gaugejax
        `MultiHeadAttention`, a shift whose biases an `eqx.nn.MultiheadAttention` lacks.
        """
        self.check_model(model)
        A = _checked_matrix("g.A", g.A)
        alpha = _checked_alpha("g.alpha", g.alpha)
        M = _checked_matrix("g.M", g.M)
        s = _checked_finite("g.value_shift", g.value_shift)
        t = _checked_finite("g.key_shift", g.key_shift)
        if isinstance(model, SelfAttention):
            Wq, Wk, Wv = _gauge_weights(
                model.Wq, model.Wk, model.Wv, A[0], alpha[0], self.condition
            )
            return eqx.tree_at(lambda m: (m.Wq, m.Wk, m.Wv), model, (Wq, Wk, Wv))
        if isinstance(model, MultiHeadAttention):
            Wq, Wk, Wv = jax.vmap(
                lambda q, k, v, A, a: _gauge_weights(q, k, v, A, a, self.condition)
            )(model.Wq, model.Wk, model.Wv, A, alpha)
            Wv = Wv @ M
            Wo = jnp.linalg.solve(M, model.Wo)
            return eqx.tree_at(lambda m: (m.Wq, m.Wk, m.Wv, m.Wo), model, (Wq, Wk, Wv, Wo))
        return self._act_eqx(A, alpha, M, s, t, model)

    def _act_eqx(self, A, alpha, M, s, t, model: eqx.nn.MultiheadAttention):
        """Equinox's layout: `Linear.weight` (out, in); head h owns rows h*n:(h+1)*n of the
        query/key (n = qk) and value (n = vo) projections and those columns of the output."""
        H, e, vo = self.num_heads, self.head_dim, self.vo_dim
        Kt = jnp.swapaxes(_b_matrix(A, alpha, self.condition), -1, -2)  # keys k -> B^T k

        def left(L, W, n):  # per head: W_h -> L_h W_h, for weights (H*n, in) or biases (H*n,)
            Wh = W.reshape(H, n, -1)
            return jnp.einsum("hij,hjk->hik", L, Wh).reshape(W.shape)

        At, Mt = jnp.swapaxes(A, -1, -2), jnp.swapaxes(M, -1, -2)
        q, k, v, o = model.query_proj, model.key_proj, model.value_proj, model.output_proj
        where = [lambda m: m.query_proj.weight, lambda m: m.key_proj.weight]
        new = [left(At, q.weight, e), left(Kt, k.weight, e)]
        where += [lambda m: m.value_proj.weight, lambda m: m.output_proj.weight]
        # output columns of head h: C_h -> C_h M_h^-T, i.e. C_h^T -> M_h^-1 C_h^T
        Ct = jnp.linalg.solve(M, o.weight.reshape(-1, H, vo).transpose(1, 2, 0))  # (H, vo, out)
        new += [left(Mt, v.weight, vo), Ct.transpose(2, 0, 1).reshape(o.weight.shape)]
        if q.bias is not None:
            where.append(lambda m: m.query_proj.bias)
            new.append(left(At, q.bias, e))
        if k.bias is not None:
            where.append(lambda m: m.key_proj.bias)
            new.append(left(Kt, k.bias, e) + t.reshape(-1))
        shift = v.bias is not None and o.bias is not None
        if v.bias is not None:
            where.append(lambda m: m.value_proj.bias)
            new.append(left(Mt, v.bias, vo) + (s.reshape(-1) if shift else 0.0))
        if shift:
            where.append(lambda m: m.output_proj.bias)
            new.append(o.bias - jnp.einsum("hvo,hv->o", Ct, s))
        return eqx.tree_at(lambda m: tuple(w(m) for w in where), model, tuple(new))
