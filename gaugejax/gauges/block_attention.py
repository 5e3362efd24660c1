"""The continuous gauge group of `BlockAttention`: biases, RoPE, grouped-query heads.

Per key-value group g (shared by its query heads `i` with `g(i) = g`), in the row-vector
convention of the module (`q = x Wq + bq`):

- query-key `M_g`: `Wq_i -> alpha_i Wq_i M_g^T`, `bq_i -> alpha_i bq_i M_g^T`, `Wk_g -> Wk_g
  M_g^-1`, `bk_g -> bk_g M_g^-1 + s_g`. Scores `<M q, M^-T k>` are unchanged. Without RoPE
  `M_g` is any invertible k x k matrix (GL(k), k^2 dimensions). With RoPE the scores are
  `<R_p q, R_r k>` with rotations R of each frequency pair, and only maps commuting with every
  rotation survive: per pair a rotation-scaling, i.e. multiplication by a complex number z
  (GL(1, C)^(k/2), k dimensions). The element then holds `(Re z, Im z)` per pair.
- key-bias shift `s_g` (softmax, no RoPE, a key bias): adds `q . s` to every score of a query,
  a constant over the keys, which softmax removes (causal masks included). Under RoPE the
  shift is rotated by the key's position and no longer constant: not a symmetry there.
- value-output `C_g` (GL(v)): `Wv_g -> Wv_g C_g`, `bv_g -> bv_g C_g + delta_g`, `Wo_i -> C_g^-1
  Wo_i / alpha_i`, and with the value-bias shift `delta_g` (softmax, value and output biases)
  `bo -> bo - sum_i delta_g(i) Wo_i'`: softmax rows sum to 1, so constant values pass through.
- score scale `alpha_i > 0` per query head (activation-free scores only): `Wq_i, bq_i` times
  `alpha_i`, `Wo_i` divided by it.

Group law (g1 then g2): `M = M2 M1`, `s = s1 M2^-1 + s2`, `C = C1 C2`, `delta = delta1 C2 +
delta2`, `alpha = alpha1 alpha2`. Exact for every element this family samples: alpha (linear
scores) and delta (softmax) never meet.

Symmetry-breaking controls (`control()`): with RoPE a generic GL(k) query-key element (a
symmetry without RoPE); with softmax an alpha != 1; with linear scores a one-sided query map
(`Wq M^T`, keys unchanged).
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..models.transformer import BlockAttention, rope_pairs
from .base import (
    AbstractParameterGauge,
    best_scale,
    cast_element,
    model_error,
    well_conditioned,
)


BREAKINGS = (None, "generic_qk", "alpha", "one_sided")


class BlockAttentionElement(eqx.Module):
    """`qk`: (G, k, k) matrices, or with RoPE (G, k/2, 2) complex factors `(Re, Im)`;
    `key_shift` (G, k) or (G, 0); `vo` (G, v, v); `value_shift` (G, v) or (G, 0); `alpha`
    (H,) or (0,). Empty arrays: parts this family does not move."""

    qk: Float[Array, "..."]
    key_shift: Float[Array, "G ks"]
    vo: Float[Array, "G v v"]
    value_shift: Float[Array, "G vs"]
    alpha: Float[Array, " a"]


def _pair_matrix(z: Float[Array, "G p 2"], pairing: str) -> Float[Array, "G k k"]:
    """The k x k matrices of per-pair complex multiplications (`rope_pairs` layout)."""
    G, p, _ = z.shape
    first, second = rope_pairs(2 * p, pairing)
    M = jnp.zeros((G, 2 * p, 2 * p), z.dtype)
    re, im = z[..., 0], z[..., 1]
    M = M.at[:, first, first].set(re).at[:, second, second].set(re)
    return M.at[:, first, second].set(-im).at[:, second, first].set(im)


def _complex_mul(a, b):
    return jnp.stack(
        [
            a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1],
            a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0],
        ],
        axis=-1,
    )


def _split(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The invertible `R` (n x n) with `A R = U S^1/2` for the SVD `A B^T = U S V^T` (rank n
    kept), signs fixed by the largest-magnitude entry of every column of `V` (positive); then
    `B R^-T = V S^1/2`. `A` (a, n) and `B` (b, n) of full column rank n."""
    n = A.shape[1]
    U, s, Vt = np.linalg.svd(A @ B.T, full_matrices=False)
    U, s, Vk = U[:, :n], s[:n], Vt[:n].T
    sign = np.sign(Vk[np.argmax(np.abs(Vk), axis=0), np.arange(n)])
    return np.linalg.lstsq(A, U * (sign * np.sqrt(s)), rcond=None)[0]


def _inverse(X: np.ndarray, transpose: bool) -> np.ndarray:
    """`X^-1` (`X^-T` if `transpose`), or NaNs for a singular `X` (a candidate then loses)."""
    try:
        inverse = np.linalg.inv(X)
    except np.linalg.LinAlgError:
        return np.full_like(X, np.nan)
    return inverse.T if transpose else inverse


def _best(candidates: list, cost) -> np.ndarray:
    """The candidate of least finite `cost` (the first, the current element, on ties)."""
    costs = [cost(c) for c in candidates]
    costs = [c if np.isfinite(c) else np.inf for c in costs]
    return candidates[int(np.argmin(costs))]


class BlockAttentionGauge(AbstractParameterGauge):
    """The continuous gauges of a `BlockAttention` (module docstring). Build it with
    `BlockAttentionGauge.from_model(model)`. `match` aligns one attention to another
    (`gj.align`).

    **Fields:** `num_heads` H, `num_kv_heads` G, `head_dim` k, `value_dim` v; `rope` (None or
    the model's pairing); `rescale` (alpha, activation-free scores), `key_shift`, `value_shift`;
    `log_condition` of sampled matrices; `breaking`: None (the symmetry) or the control kind.
    """

    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    value_dim: int = eqx.field(static=True)
    rope: str | None = eqx.field(static=True, default=None)
    rescale: bool = eqx.field(static=True, default=False)
    key_shift: bool = eqx.field(static=True, default=False)
    value_shift: bool = eqx.field(static=True, default=False)
    log_condition: float = float(np.log(10.0))
    breaking: str | None = eqx.field(static=True, default=None)
    infinitesimal = False

    def __check_init__(self):
        if self.breaking not in BREAKINGS:
            raise ValueError(f"`breaking` must be one of {BREAKINGS}; received {self.breaking!r}.")
        if self.rescale and self.value_shift:
            raise ValueError(
                "`rescale` (activation-free scores) and `value_shift` (softmax) exclude each "
                "other: no attention has both symmetries."
            )
        if self.rope is not None and self.key_shift:
            raise ValueError(
                "`key_shift` with RoPE: the rotated key bias is not constant over keys, so it "
                "is no symmetry; pass key_shift=False."
            )

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "BlockAttentionGauge":
        """The family with `model`'s sizes and every symmetry it has (overridable by
        `kwargs`).

        **Raises:** as `check_model`.
        """
        if not isinstance(model, BlockAttention):
            raise model_error(cls.__name__, "a BlockAttention", model)
        softmax = model.activation == "softmax"
        fields = dict(
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.Wq.shape[2],
            value_dim=model.Wv.shape[2],
            rope=model.rope,
            rescale=not softmax,
            key_shift=softmax and model.rope is None and model.bk is not None,
            value_shift=softmax and model.bv is not None and model.bo is not None,
        )
        gauge = cls(**{**fields, **kwargs})
        gauge.check_model(model)
        return gauge

    def check_model(self, model: Any) -> None:
        """Raise unless this family acts on `model`; nothing is traced.

        **Raises:** `TypeError` for anything but a `BlockAttention`; `ValueError` for other
        sizes or RoPE pairing, `rescale` on softmax scores, a shift without the biases it
        needs or on scores that are not softmax.
        """
        if not isinstance(model, BlockAttention):
            raise model_error(
                self, "a BlockAttention", model, how="(build one with gj.BlockAttention)"
            )
        sizes = (model.num_heads, model.num_kv_heads, model.Wq.shape[2], model.Wv.shape[2])
        mine = (self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim)
        if sizes != mine:
            raise ValueError(
                f"{type(self).__name__} has (heads, kv heads, head_dim, value_dim) = {mine}; the "
                f"model has {sizes}."
            )
        if model.rope != self.rope:
            raise ValueError(
                f"{type(self).__name__}(rope={self.rope!r}) on a model with rope={model.rope!r}."
            )
        softmax = model.activation == "softmax"
        symmetric = self.breaking is None
        if symmetric and self.rescale and softmax:
            raise ValueError("`rescale=True` on softmax scores: alpha != 1 is no symmetry there.")
        if self.key_shift and (model.bk is None or not softmax):
            raise ValueError("`key_shift` needs a key bias (`biases` with 'k') and softmax.")
        if self.value_shift and (model.bv is None or model.bo is None or not softmax):
            raise ValueError(
                "`value_shift` needs value and output biases (`biases` with 'v' and 'o') and "
                "softmax scores (rows summing to 1)."
            )

    def _pairs(self) -> bool:
        return self.rope is not None and self.breaking != "generic_qk"

    def identity(self) -> BlockAttentionElement:
        G, H, k, v = self.num_kv_heads, self.num_heads, self.head_dim, self.value_dim
        if self._pairs():
            qk = jnp.zeros((G, k // 2, 2)).at[..., 0].set(1.0)
        else:
            qk = jnp.broadcast_to(jnp.eye(k), (G, k, k))
        return BlockAttentionElement(
            qk,
            jnp.zeros((G, k if self.key_shift else 0)),
            jnp.broadcast_to(jnp.eye(v), (G, v, v)),
            jnp.zeros((G, v if self.value_shift else 0)),
            jnp.ones((H if self.rescale or self.breaking == "alpha" else 0,)),
        )

    def sample(self, key: PRNGKeyArray) -> BlockAttentionElement:
        kq, kv, ks, kd, ka, kp = jax.random.split(key, 6)
        base = self.identity()
        G, k, v = self.num_kv_heads, self.head_dim, self.value_dim
        if self._pairs():
            r = jnp.exp(jax.random.uniform(kq, (G, k // 2), minval=-0.5, maxval=0.5))
            phi = jax.random.uniform(kp, (G, k // 2), minval=-np.pi, maxval=np.pi)
            qk = jnp.stack([r * jnp.cos(phi), r * jnp.sin(phi)], axis=-1)
        else:
            qk = well_conditioned(kq, (G, k, k), self.log_condition)
        alpha = jnp.exp(0.5 * jax.random.normal(ka, base.alpha.shape))
        return BlockAttentionElement(
            qk,
            jax.random.normal(ks, base.key_shift.shape),
            well_conditioned(kv, (G, v, v), self.log_condition),
            jax.random.normal(kd, base.value_shift.shape),
            alpha,
        )

    def _qk_matrix(self, g: BlockAttentionElement) -> Array:
        return _pair_matrix(g.qk, self.rope) if self._pairs() else g.qk

    def inverse(self, g: BlockAttentionElement) -> BlockAttentionElement:
        if self._pairs():
            norm = jnp.sum(g.qk**2, axis=-1, keepdims=True)
            qk = jnp.stack([g.qk[..., 0], -g.qk[..., 1]], axis=-1) / norm
        else:
            qk = jnp.linalg.inv(g.qk)
        M = self._qk_matrix(g)
        key_shift = -jnp.einsum("gk,gkl->gl", g.key_shift, M) if g.key_shift.size else g.key_shift
        Cinv = jnp.linalg.inv(g.vo)
        value_shift = (
            -jnp.einsum("gv,gvw->gw", g.value_shift, Cinv) if g.value_shift.size else g.value_shift
        )
        return BlockAttentionElement(qk, key_shift, Cinv, value_shift, 1.0 / g.alpha)

    def compose(self, g1: BlockAttentionElement, g2: BlockAttentionElement):
        qk = _complex_mul(g2.qk, g1.qk) if self._pairs() else g2.qk @ g1.qk
        M2inv = jnp.linalg.inv(self._qk_matrix(g2))
        key_shift = g2.key_shift
        if g1.key_shift.size:
            key_shift = jnp.einsum("gk,gkl->gl", g1.key_shift, M2inv) + g2.key_shift
        value_shift = g2.value_shift
        if g1.value_shift.size:
            value_shift = jnp.einsum("gv,gvw->gw", g1.value_shift, g2.vo) + g2.value_shift
        return BlockAttentionElement(qk, key_shift, g1.vo @ g2.vo, value_shift, g1.alpha * g2.alpha)

    def control(self) -> "BlockAttentionGauge":
        """The symmetry-breaking family: a generic GL(k) query-key map under RoPE, alpha != 1
        under softmax, a one-sided query map for activation-free scores."""
        if self.rope is not None:
            kind = "generic_qk"
        elif self.rescale:
            kind = "one_sided"
        else:
            kind = "alpha"
        return dataclasses.replace(self, breaking=kind, key_shift=False, value_shift=False)

    def canonical_element(self, model: BlockAttention) -> BlockAttentionElement:
        """The element taking `model` to the canonical representative of its orbit, per
        key-value group g (host numpy, in the model's dtype):

        - score scale (activation-free scores): `alpha_i = (|VO_i| / |QK_i|)^1/2`, so that
          every head's query-key product `QK_i = [Wq_i; bq_i] [Wk_g; bk_g]^T` and
          value-output product `VO_i = [Wv_g; bv_g] Wo_i` have equal Frobenius norms;
        - query-key without RoPE: the SVD `P = U S V^T` of the product of the group's stacked
          query heads `A` and its keys `B` (`A B^T`, the key bias left out when `key_shift`
          removes it) gives `M^T = A^+ U S^1/2`, so that `A M^T = U S^1/2`, `B M^-1 = V S^1/2`,
          each column's sign fixed by making the largest-magnitude entry of `V` positive;
        - query-key with RoPE (only per-pair complex factors z commute with the rotations):
          per frequency pair, with `q`, `k` the pair's query and key columns read as complex
          vectors, `|z|^2 = |k| / |q|` (equal norms after) and `arg z` such that the key's
          largest-magnitude entry becomes real and positive;
        - value-output: `C = V_g^+ U S^1/2` from the SVD of `[Wv_g; bv_g] [Wo_i / alpha_i]_i`
          (the value bias left out when `value_shift` removes it), signs fixed on the output
          side;
        - shifts (softmax): `key_shift` and `value_shift` set the key and value biases to 0
          (they are pure gauge there).

        Unfixed: rotations inside subspaces of equal singular values, and signs or phases
        where the entry that fixes them is not unique (both non-generic); with rank-deficient
        stacks (`d < k`, or fewer value directions than `v`) the split is not invertible and
        the result is not a canonical form.

        **Raises:** as `check_model`; `ValueError` for a control family (no symmetry).
        """
        if self.breaking is not None:
            raise ValueError(
                f"the control of BlockAttentionGauge (breaking={self.breaking!r}) is no "
                "symmetry: it has no canonical form."
            )
        self.check_model(model)
        dtype = model.Wq.dtype
        G, H, k, v = self.num_kv_heads, self.num_heads, self.head_dim, self.value_dim
        group = np.asarray(model.group)
        Wq, Wk, Wv, Wo = (np.asarray(a) for a in (model.Wq, model.Wk, model.Wv, model.Wo))

        def augment(W, b, drop):  # the bias as one more input row, unless it is pure gauge
            return W if b is None or drop else np.concatenate([W, np.asarray(b)[:, None]], 1)

        Q = augment(Wq, model.bq, False)
        K = augment(Wk, model.bk, self.key_shift)
        V = augment(Wv, model.bv, self.value_shift)
        alpha = np.ones(H, Wq.dtype)
        if self.rescale:
            qk = np.linalg.norm(np.einsum("hdk,hek->hde", Q, K[group]), axis=(1, 2))
            vo = np.linalg.norm(np.einsum("hdv,hve->hde", V[group], Wo), axis=(1, 2))
            alpha = np.sqrt(vo / qk)
        Q = alpha[:, None, None] * Q
        Wo = Wo / alpha[:, None, None]
        qk_element, vo_element = [], []
        for g in range(G):
            A = Q[group == g].reshape(-1, k)  # the group's query heads stacked
            if self._pairs():
                first, second = (np.asarray(i) for i in rope_pairs(k, self.rope))
                q = A[:, first] + 1j * A[:, second]
                kc = K[g][:, first] + 1j * K[g][:, second]
                top = kc[np.argmax(np.abs(kc), axis=0), np.arange(k // 2)]
                ratio = np.linalg.norm(kc, axis=0) / np.linalg.norm(q, axis=0)
                z = np.sqrt(ratio) * np.conj(top / np.abs(top))
                qk_element.append(np.stack([z.real, z.imag], axis=-1))
            else:
                qk_element.append(_split(A, K[g]).T)
            outputs = Wo[group == g].transpose(1, 0, 2).reshape(v, -1)  # (v, r d)
            vo_element.append(_split(V[g], outputs.T))
        qk = np.stack(qk_element)
        vo = np.stack(vo_element)
        key_shift = np.zeros((G, 0))
        if self.key_shift:
            # (no RoPE with a key shift: `qk` holds the matrices M); bk M^-1 + s = 0
            key_shift = -np.einsum("gk,gkl->gl", np.asarray(model.bk), np.linalg.inv(qk))
        value_shift = np.zeros((G, 0))
        if self.value_shift:
            value_shift = -np.einsum("gv,gvw->gw", np.asarray(model.bv), vo)
        return cast_element(
            BlockAttentionElement(
                jnp.asarray(qk),
                jnp.asarray(key_shift),
                jnp.asarray(vo),
                jnp.asarray(value_shift),
                jnp.asarray(alpha if self.rescale else np.ones(0)),
            ),
            dtype,
        )

    def match(
        self, reference: BlockAttention, model: BlockAttention, g: BlockAttentionElement
    ) -> BlockAttentionElement:
        """One round of alignment (`gj.align`): per key-value group, the query-key and
        value-output elements that bring `act(g, model)`'s factors closest to `reference`'s
        (host numpy), composed after `g`.

        Per group, with `A` the group's query heads stacked (query bias as one more row) and
        `B` its keys (key bias likewise), the query-key delta `X = M^T` moves them to `A X`
        and `B X^-T`; the cost `|A X - A_ref|^2 + |B X^-T - B_ref|^2` has no closed-form
        minimiser, so of three candidates the cheapest is kept: the current element (`X = 1`),
        the queries' least-squares fit `X = A^+ A_ref`, and the keys' (`X^-T = B^+ B_ref`).
        Each is exact when `model` is `reference` moved by an element of the family. With RoPE
        the same three per frequency pair, in the family's per-pair complex factors `z`
        (queries `z q`, keys `k / conj(z)`). Value-output likewise: `V C` against the group's
        outputs `C^-1 O`, candidates 1, `V^+ V_ref`, `(O_ref O^+)^-1`. Then, with softmax and
        the biases they need, the key and value shifts (linear least squares, exact); for
        activation-free scores, each head's score scale `alpha` (queries times `alpha`,
        outputs divided by it: the exact minimiser, `best_scale`), and the query-key
        candidates are compared modulo those scales (`_query_cost`). So a round never raises
        the attention's distance. The candidates are not the joint optimum, but a moved model
        is recovered to rounding (the fits are exact there; with linear scores in 16 to 55
        rounds, measured on 8 decoders at d = 8, with and without RoPE and GQA).

        **Arguments:** `reference`, `model`: two `BlockAttention`s of this family's sizes;
        `g`: the current element.

        **Returns:** the next element.

        **Raises:** as `check_model` (both models); `ValueError` for a control family (no
        symmetry to align along).
        """
        if self.breaking is not None:
            raise ValueError(
                f"the control of BlockAttentionGauge (breaking={self.breaking!r}) is no "
                "symmetry to align along."
            )
        self.check_model(reference)
        self.check_model(model)
        current = _act(self, g, model)
        G, k = self.num_kv_heads, self.head_dim
        group = np.asarray(current.group)

        def factors(m):  # biases as one more input row: they move with their weights
            def augment(W, b):
                W = np.asarray(W)
                return W if b is None else np.concatenate([W, np.asarray(b)[:, None]], 1)

            return (
                augment(m.Wq, m.bq),
                augment(m.Wk, m.bk),
                augment(m.Wv, m.bv),
                np.asarray(m.Wo),
            )

        (Q, K, V, Wo), (Qr, Kr, Vr, Wor) = factors(current), factors(reference)
        qk_delta, vo_delta = [], []
        for gi in range(G):
            A, Ar = (x[group == gi].reshape(-1, k) for x in (Q, Qr))
            heads = int(np.sum(group == gi))
            B, Br = K[gi], Kr[gi]
            if self._pairs():
                first, second = (np.asarray(i) for i in rope_pairs(k, self.rope))
                q, qr, kc, kr = (x[:, first] + 1j * x[:, second] for x in (A, Ar, B, Br))
                z_query = np.sum(np.conj(q) * qr, 0) / np.sum(np.abs(q) ** 2, 0)
                w_key = np.sum(np.conj(kc) * kr, 0) / np.sum(np.abs(kc) ** 2, 0)
                candidates = np.stack([np.ones_like(z_query), z_query, 1.0 / np.conj(w_key)])

                def pair_cost(z, q=q, qr=qr, kc=kc, kr=kr, n=heads):  # pairs are independent
                    return self._query_cost(z * q, qr, n, True) + np.sum(
                        np.abs(kc / np.conj(z) - kr) ** 2, 0
                    )

                costs = np.stack([pair_cost(z) for z in candidates])
                costs[~np.isfinite(costs)] = np.inf
                z = candidates[np.argmin(costs, axis=0), np.arange(k // 2)]
                qk_delta.append(np.stack([z.real, z.imag], axis=-1))
            else:
                X = _best(
                    [np.eye(k), np.linalg.pinv(A) @ Ar, _inverse(np.linalg.pinv(B) @ Br, True)],
                    lambda X, A=A, Ar=Ar, B=B, Br=Br, n=heads: (
                        self._query_cost(A @ X, Ar, n, False)
                        + np.sum((B @ _inverse(X, True) - Br) ** 2)
                    ),
                )
                qk_delta.append(X.T)  # M = X^T: queries `Wq M^T`, keys `Wk M^-1`
            # the group's outputs side by side: C^-1 acts on their rows
            Og, Ogr = (x[group == gi].transpose(1, 0, 2).reshape(x.shape[1], -1) for x in (Wo, Wor))
            vo_delta.append(
                _best(
                    [
                        np.eye(V.shape[2]),
                        np.linalg.pinv(V[gi]) @ Vr[gi],
                        _inverse(Ogr @ np.linalg.pinv(Og), False),
                    ],
                    lambda C, Vg=V[gi], Vgr=Vr[gi], Og=Og, Ogr=Ogr: (
                        np.sum((Vg @ C - Vgr) ** 2) + np.sum((_inverse(C, False) @ Og - Ogr) ** 2)
                    ),
                )
            )
        identity = self.identity()
        delta = BlockAttentionElement(
            jnp.asarray(np.stack(qk_delta)),
            identity.key_shift,
            jnp.asarray(np.stack(vo_delta)),
            identity.value_shift,
            identity.alpha,
        )
        g = _compose(self, g, cast_element(delta, np.asarray(g.vo).dtype))
        if self.key_shift or self.value_shift:
            g = self._match_shifts(reference, model, g)
        if not self.rescale:
            return g
        # the score scales after: per head `alpha` on its queries (and query bias), `1 / alpha`
        # on its outputs, the exact minimiser given the rest (`best_scale`)
        current = _act(self, g, model)
        Q, Wo = factors(current)[::3]
        alpha = best_scale(
            np.sum(Q**2, (1, 2)),
            np.sum(Q * Qr, (1, 2)),
            np.sum(Wo**2, (1, 2)),
            np.sum(Wo * Wor, (1, 2)),
        )
        step = BlockAttentionElement(
            identity.qk, identity.key_shift, identity.vo, identity.value_shift, jnp.asarray(alpha)
        )
        return _compose(self, g, cast_element(step, np.asarray(g.vo).dtype))

    def _query_cost(self, moved, target, heads: int, per_pair: bool):
        """`|moved - target|^2` of a group's stacked query rows (`heads` heads): the total, or
        per column (`per_pair`: a RoPE pair's complex column, whose candidates are compared
        pair by pair). With score scales (`rescale`) each head, or each head's pair, is first
        scaled by its best real factor: the round's last step fits the scales exactly, so a
        candidate is judged modulo them. (Judged with the scales as they stood, the key side's
        fit, exact for a moved model, lost to a query fit that absorbed the scales, and
        alignment stalled: a decoder at d = 8 moved by a sampled element, 481 to 0.60.)"""
        moved = moved.reshape(heads, -1, moved.shape[-1])
        target = target.reshape(heads, -1, target.shape[-1])
        if not self.rescale:
            return np.sum(np.abs(moved - target) ** 2, axis=(0, 1) if per_pair else None)
        shared = (1,) if per_pair else (1, 2)  # the rows (and columns) one factor scales
        dot = np.sum(np.real(np.conj(moved) * target), axis=shared)
        norm = np.sum(np.abs(moved) ** 2, axis=shared)
        rest = np.sum(np.abs(target) ** 2, axis=shared) - dot**2 / np.where(norm > 0, norm, 1.0)
        return np.sum(rest, axis=0) if per_pair else np.sum(rest)

    def _match_shifts(self, reference, model, g):
        """`g` followed by the shifts of least squares given the rest (softmax biases): the
        key shift `s = bk_ref - bk` (only the key bias moves with it), and the value shift
        `delta` solving `bv + delta ~ bv_ref`, `bo - sum_i delta_g(i) Wo_i ~ bo_ref` jointly
        (linear)."""
        current = _act(self, g, model)
        identity = self.identity()
        key_shift, value_shift = identity.key_shift, identity.value_shift
        if self.key_shift:
            key_shift = jnp.asarray(np.asarray(reference.bk) - np.asarray(current.bk))
        if self.value_shift:
            G, v = self.num_kv_heads, self.value_dim
            group = np.asarray(current.group)
            Wo = np.asarray(current.Wo)  # (H, v, d): delta_g reaches bo through its heads' Wo
            J = np.stack([Wo[group == gi].sum(0) for gi in range(G)])  # (G, v, d)
            system = np.concatenate([np.eye(G * v), J.reshape(G * v, -1).T])
            target = np.concatenate(
                [
                    (np.asarray(reference.bv) - np.asarray(current.bv)).ravel(),
                    np.asarray(current.bo) - np.asarray(reference.bo),
                ]
            )
            solution = np.linalg.lstsq(system, target, rcond=None)[0]
            value_shift = jnp.asarray(solution.reshape(G, v))
        step = BlockAttentionElement(
            identity.qk, key_shift, identity.vo, value_shift, identity.alpha
        )
        return _compose(self, g, cast_element(step, np.asarray(g.vo).dtype))

    def act(self, g: BlockAttentionElement, model: BlockAttention) -> BlockAttention:
        self.check_model(model)
        g = cast_element(g, model.Wq.dtype)
        group = model.group
        M = self._qk_matrix(g)  # (G, k, k)
        Mq = M[group]  # per query head
        alpha = g.alpha if g.alpha.size else jnp.ones((self.num_heads,), M.dtype)
        Wq = alpha[:, None, None] * jnp.einsum("hdk,hlk->hdl", model.Wq, Mq)
        bq = model.bq
        if bq is not None:
            bq = alpha[:, None] * jnp.einsum("hk,hlk->hl", bq, Mq)
        Wk, bk = model.Wk, model.bk
        if self.breaking != "one_sided":
            Minv = jnp.linalg.inv(M)
            Wk = jnp.einsum("gdk,gkl->gdl", Wk, Minv)
            if bk is not None:
                bk = jnp.einsum("gk,gkl->gl", bk, Minv)
        if bk is not None and g.key_shift.size:
            bk = bk + g.key_shift
        C = g.vo
        Wv = jnp.einsum("gdv,gvw->gdw", model.Wv, C)
        bv = model.bv
        if bv is not None:
            bv = jnp.einsum("gv,gvw->gw", bv, C)
            if g.value_shift.size:
                bv = bv + g.value_shift
        Cinv = jnp.linalg.inv(C)[group]
        # under softmax (the "alpha" control) dividing the output cannot undo the scaled scores
        Wo = jnp.einsum("hvw,hwd->hvd", Cinv, model.Wo) / alpha[:, None, None]
        bo = model.bo
        if bo is not None and g.value_shift.size:
            bo = bo - jnp.einsum("hv,hvd->d", g.value_shift[group], Wo)
        return eqx.tree_at(
            lambda m: (m.Wq, m.bq, m.Wk, m.bk, m.Wv, m.bv, m.Wo, m.bo),
            model,
            (Wq, bq, Wk, bk, Wv, bv, Wo, bo),
            is_leaf=lambda x: x is None,
        )


# `match` (run every round of `gj.align`, per block) acts and composes on elements of one
# structure: compiled once, not op by op (the RoPE pair matrices alone are a dozen scatters)
@eqx.filter_jit
def _act(
    gauge: BlockAttentionGauge, g: BlockAttentionElement, model: BlockAttention
) -> BlockAttention:
    return gauge.act(g, model)


@eqx.filter_jit
def _compose(
    gauge: BlockAttentionGauge, g1: BlockAttentionElement, g2: BlockAttentionElement
) -> BlockAttentionElement:
    return gauge.compose(g1, g2)
