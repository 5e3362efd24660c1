"""The continuous gauge group of an RMSNorm `Decoder` (a LayerNorm one through its fused
form): rotations of the residual stream, every block's attention gauges, SwiGLU's per-unit
rescaling, and the norm gains traded against the reads they feed.

- Residual rotation `Q` in O(d): `W_in -> W_in Q` (and learned `positions`); every write into
  the stream (`Wo`, `bo`, `W2`, `b2`) `-> (.) Q`; every read after a norm with gain `g` (`Wq`,
  `Wk`, `Wv`, `W1`, `W3`, `W_out`) `-> D^-1 Q^T D (.)` with `D = diag(g)` (`D = 1` without a
  gain). Exact because `RMSNorm(x Q) = RMSNorm(x) Q` (an orthogonal map keeps `mean(x^2)`)
  and `D` is invertible: the exact condition is an RMSNorm (no mean subtraction) whose gain
  has no zero entry. LayerNorm subtracts the mean, so on a LayerNorm decoder only rotations
  fixing the all-ones vector survive; the family acts on its fused form instead
  (`fuse_layernorm`: every write centred, norm biases folded into the reads, LayerNorm
  replaced by the RMSNorm it then equals), a functionally equal RMSNorm decoder, so `act` on
  a LayerNorm decoder returns a rotated RMSNorm one. A read-out bias `b_out` does not move.
- Per block, `BlockAttentionGauge` on its attention (acting on the head side, so it commutes
  with `Q`), and for a SwiGLU MLP per hidden unit `c_j > 0`: `W3[:, j] -> c_j W3[:, j]`,
  `W2[j] -> W2[j] / c_j` (the gate `silu(x W1)` is untouched).
- Per norm with a gain, `s > 0` per channel: `g -> g s`, and each read after it `W -> diag(1/s)
  W` (`(n(x) g s) diag(1/s) W = (n(x) g) W`), applied after the rotation (whose reads use the
  original gain). d dimensions per norm with a gain.
- With `permutations=True`, the finite factors, applied after all of the above: per block a
  permutation of its attention heads (the key-value groups with their query heads, and the
  query heads inside each group, as `HeadPermutationGauge`) and of its MLP's hidden units
  (`W1`, `W3` columns, `b1`, `W2` rows, as `UnitPermutationGauge`). They have no directions:
  `tangent` moves the continuous factors only.

Group law: `Q = Q1 Q2`, the attention elements by their law, `c = c1 c2`, `s = s1 s2` (the
gain scales commute with the rotation's conjugated reads: `S2^-1 (D S1)^-1 Q2^T (D S1) S1^-1
D^-1 Q1^T D = (S1 S2)^-1 D^-1 (Q1 Q2)^T D`). With permutations, the permutations compose as
those families' do, and g2's per-group, per-head and per-unit factors are first re-indexed to
the labels before g1's permutation (`C2 P1 = P1 C2'`), then composed as above. `act` uses the
orthogonal polar factor of `Q` (Newton-Schulz iterations; a sampled `Q` is its own), so
`tangent` along any d x d direction is the rotation along its skew part.

Control: a generic invertible residual map (not orthogonal, applied as is), which RMSNorm does
not commute with.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._core._checks import check_value
from ..models.transformer import Decoder, fuse_layernorm
from .base import (
    AbstractParameterGauge,
    best_scale,
    cast_element,
    model_error,
    well_conditioned,
)
from .block_attention import BlockAttentionElement, BlockAttentionGauge
from .permutation import (
    HeadPermutation,
    HeadPermutationGauge,
    compose_head_permutations,
    invert_head_permutation,
)


class DecoderElement(eqx.Module):
    """`rotation` (d, d); `attention`: one `BlockAttentionElement` per block; `scales`: per
    block (f,) SwiGLU unit scales, or (0,) for a GELU MLP; `gains`: per norm (the final norm,
    then each block's two) (d,) channel scales, or (0,) for a norm without a gain. The finite
    factors (`DecoderGauge(permutations=True)`; empty tuples otherwise, no leaves): `heads`,
    per block a `HeadPermutation` of its key-value groups and of the query heads inside each;
    `units`, per block the old hidden unit of every new one (f,)."""

    rotation: Float[Array, "d d"]
    attention: tuple[BlockAttentionElement, ...]
    scales: tuple[Float[Array, " f"], ...]
    gains: tuple[Float[Array, " _g"], ...]  # sizes differ: d, or 0 without a gain
    heads: tuple[HeadPermutation, ...] = ()
    units: tuple[Int[Array, " _f"], ...] = ()  # f per block; (0,)-sized scales beside them


def _unit_order(mlp) -> Int[Array, " f"]:
    """The hidden units of a block's MLP by decreasing `|W1[:, j]|^2 + |W2[j]|^2 (+ |W3[:, j]|^2
    + b1_j^2)`, as `DecoderElement.units` holds them (the old unit of every new one)."""
    key = np.sum(np.asarray(mlp.W1) ** 2, axis=0) + np.sum(np.asarray(mlp.W2) ** 2, axis=1)
    if mlp.W3 is not None:
        key = key + np.sum(np.asarray(mlp.W3) ** 2, axis=0)
    if mlp.b1 is not None:
        key = key + np.asarray(mlp.b1) ** 2
    return jnp.asarray(np.argsort(-key, kind="stable"))


def _polar(X: Float[Array, "d d"], iterations: int = 6) -> Float[Array, "d d"]:
    """The orthogonal polar factor by Newton-Schulz (`X <- 1.5 X - 0.5 X X^T X`): a fixed point
    for orthogonal X, and at X = 1 + a E its derivative is the skew part of E."""
    for _ in range(iterations):
        X = 1.5 * X - 0.5 * X @ X.T @ X
    return X


def _gain(norm, d, dtype):
    if norm.weight is None:
        return jnp.ones((d,), dtype)
    # the reads need diag(g) invertible: a data condition, checked now or in the graph
    return check_value(
        norm.weight,
        lambda: jnp.any(norm.weight == 0),
        "DecoderGauge: an RMSNorm gain with a zero entry (fold the gain into the next weights).",
    )


class DecoderGauge(AbstractParameterGauge):
    """Residual rotations, attention gauges and SwiGLU scalings of an RMSNorm `Decoder`
    (a LayerNorm one through `fuse_layernorm`; module docstring). Build it with
    `DecoderGauge.from_model(model)`. `match` aligns one decoder to another (`gj.align`).

    **Fields:** `dim` d; `attention`: one `BlockAttentionGauge` per block; `hidden`: per block
    the SwiGLU width (0 for GELU); `gained`: per norm (final, then each block's two) whether it
    has a gain; `log_condition` of the control's residual maps; `breaking`; `permutations`:
    whether the family has the finite factors (module docstring), sampled and fitted by
    `match` (False: its elements have none); `widths`: per block the MLP's hidden width (what
    the unit permutations permute; `from_model` fills it).

    **Raises:** `ValueError` for `permutations` without one width per block.
    """

    dim: int = eqx.field(static=True)
    attention: tuple[BlockAttentionGauge, ...]
    hidden: tuple[int, ...] = eqx.field(static=True)
    gained: tuple[bool, ...] = eqx.field(static=True)
    log_condition: float = float(np.log(10.0))
    breaking: bool = eqx.field(static=True, default=False)
    permutations: bool = eqx.field(static=True, default=False)
    widths: tuple[int, ...] = eqx.field(static=True, default=(), converter=tuple)
    infinitesimal = False

    def __check_init__(self):
        if self.permutations and len(self.widths) != len(self.attention):
            raise ValueError(
                f"DecoderGauge(permutations=True) needs one hidden width per block "
                f"({len(self.attention)}); received `widths` {self.widths!r} (build it with "
                "`DecoderGauge.from_model(model, permutations=True)`)."
            )

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "DecoderGauge":
        """The family with `model`'s sizes and its attention families.

        **Raises:** as `check_model`.
        """
        if not isinstance(model, Decoder):
            raise model_error(cls.__name__, "a Decoder", model)
        # the fused form's attention: folding a LayerNorm bias can create query/key biases
        fused = fuse_layernorm(model)
        attention = tuple(BlockAttentionGauge.from_model(b.attn) for b in fused.blocks)
        hidden = tuple(b.mlp.W1.shape[1] if b.mlp.kind == "swiglu" else 0 for b in model.blocks)
        gained = tuple(n.weight is not None for n in _norms(model))
        widths = tuple(b.mlp.W1.shape[1] for b in model.blocks)
        kwargs = {"widths": widths, **kwargs}
        gauge = cls(model.W_in.shape[1], attention, hidden, gained, **kwargs)
        gauge.check_model(model)
        return gauge

    def check_model(self, model: Any) -> None:
        """**Raises:** `TypeError` for anything but a `Decoder`; `ValueError` for other sizes, or
        norms `fuse_layernorm` refuses (mixed kinds, a bias before a SwiGLU MLP). (An RMSNorm
        gain with a zero entry fails in `act`: a data condition, a `ValueError` for a concrete
        gain, a runtime error for a traced one.)"""
        if not isinstance(model, Decoder):
            raise model_error(self, "a Decoder", model, how="(build one with gj.Decoder)")
        if model.W_in.shape[1] != self.dim or len(model.blocks) != len(self.attention):
            raise ValueError(
                f"{type(self).__name__} is for d = {self.dim} with {len(self.attention)} blocks; "
                f"the model has d = {model.W_in.shape[1]} with {len(model.blocks)}."
            )
        fused = fuse_layernorm(model)  # a LayerNorm decoder: through its fused form
        norms = _norms(fused)
        for gauge, block in zip(self.attention, fused.blocks, strict=True):
            gauge.check_model(block.attn)
        if tuple(n.weight is not None for n in norms) != self.gained:
            raise ValueError(
                f"{type(self).__name__} has norm gains {self.gained} (final, then each "
                f"block's two); the model's are {tuple(n.weight is not None for n in norms)}."
            )
        widths = tuple(b.mlp.W1.shape[1] for b in model.blocks)
        if self.widths and widths != self.widths:
            raise ValueError(
                f"{type(self).__name__} has MLP widths {self.widths}; the model's are {widths}."
            )

    def identity(self) -> DecoderElement:
        heads, units = (), ()
        if self.permutations:
            heads = tuple(
                HeadPermutation(
                    jnp.arange(a.num_kv_heads),
                    jnp.broadcast_to(
                        jnp.arange(a.num_heads // a.num_kv_heads),
                        (a.num_kv_heads, a.num_heads // a.num_kv_heads),
                    ),
                )
                for a in self.attention
            )
            units = tuple(jnp.arange(f) for f in self.widths)
        return DecoderElement(
            jnp.eye(self.dim),
            tuple(g.identity() for g in self.attention),
            tuple(jnp.ones((f,)) for f in self.hidden),
            tuple(jnp.ones((self.dim if g else 0,)) for g in self.gained),
            heads,
            units,
        )

    def sample(self, key: PRNGKeyArray) -> DecoderElement:
        kq, ka, ks, kg = jax.random.split(key, 4)
        if self.breaking:
            rotation = well_conditioned(kq, (self.dim, self.dim), self.log_condition)
        else:
            S = 0.5 * jax.random.normal(kq, (self.dim, self.dim))
            rotation = jax.scipy.linalg.expm(S - S.T)
        keys = jax.random.split(ka, len(self.attention))
        skeys = jax.random.split(ks, len(self.hidden))
        heads, units = (), ()
        if self.permutations:  # their own key: the continuous draws are the plain family's
            kh, ku = jax.random.split(jax.random.fold_in(key, 1))
            hkeys = jax.random.split(kh, len(self.attention))
            heads = tuple(
                _sample_heads(k, a.num_kv_heads, a.num_heads // a.num_kv_heads)
                for a, k in zip(self.attention, hkeys, strict=True)
            )
            units = tuple(
                jax.random.permutation(k, f)
                for f, k in zip(self.widths, jax.random.split(ku, len(self.widths)), strict=True)
            )
        return DecoderElement(
            rotation,
            tuple(g.sample(k) for g, k in zip(self.attention, keys, strict=True)),
            tuple(
                jnp.exp(0.5 * jax.random.normal(k, (f,)))
                for f, k in zip(self.hidden, skeys, strict=True)
            ),
            tuple(
                jnp.exp(0.5 * jax.random.normal(k, (self.dim if g else 0,)))
                for g, k in zip(self.gained, jax.random.split(kg, len(self.gained)), strict=True)
            ),
            heads,
            units,
        )

    def inverse(self, g: DecoderElement) -> DecoderElement:
        rotation = jnp.linalg.inv(g.rotation) if self.breaking else g.rotation.T
        inverse = DecoderElement(
            rotation,
            tuple(a.inverse(e) for a, e in zip(self.attention, g.attention, strict=True)),
            tuple(1.0 / c for c in g.scales),
            tuple(1.0 / s for s in g.gains),
        )
        if not g.heads:
            return inverse
        # (P C)^-1 = C^-1 P^-1 = P^-1 C'': the continuous inverse re-indexed by P^-1
        heads = tuple(invert_head_permutation(h) for h in g.heads)
        units = tuple(jnp.argsort(p) for p in g.units)
        return _relabel(dataclasses.replace(inverse, heads=heads, units=units), heads, units)

    def compose(self, g1: DecoderElement, g2: DecoderElement) -> DecoderElement:
        heads, units = g1.heads or g2.heads, g1.units or g2.units
        if g1.heads and g2.heads:
            heads = tuple(
                compose_head_permutations(h1, h2) for h1, h2 in zip(g1.heads, g2.heads, strict=True)
            )
            units = tuple(p1[p2] for p1, p2 in zip(g1.units, g2.units, strict=True))
        if g1.heads:  # g2's continuous factors act on g1's labels: re-indexed to the old ones
            g2 = _relabel(g2, g1.heads, g1.units)
        return DecoderElement(
            g1.rotation @ g2.rotation,
            tuple(
                a.compose(e1, e2)
                for a, e1, e2 in zip(self.attention, g1.attention, g2.attention, strict=True)
            ),
            tuple(c1 * c2 for c1, c2 in zip(g1.scales, g2.scales, strict=True)),
            tuple(s1 * s2 for s1, s2 in zip(g1.gains, g2.gains, strict=True)),
            heads,
            units,
        )

    def control(self) -> "DecoderGauge":
        """A generic invertible (not orthogonal) residual map: RMSNorm breaks it."""
        return dataclasses.replace(self, breaking=True)

    def canonical_element(self, model: Decoder) -> DecoderElement:
        """The element taking `model` (a LayerNorm decoder: its fused form) to the canonical
        representative of its orbit (host numpy, in the model's dtype):

        - gains: `s = 1 / g` for every norm with a gain, so every gain becomes 1 and is carried
          by the reads after it;
        - residual basis: `Q` = the eigenvectors of the Gram matrix `W_in^T W_in` (plus
          `positions^T positions` with learned positions), by decreasing eigenvalue, each
          column's sign fixed by making the largest-magnitude entry of `W_in Q` stacked over
          the read-out `(Q^T diag(g) W_out)^T` positive (the embedding rotates as `W_in Q`, so
          its principal axes become the coordinate axes);
        - SwiGLU: `c_j = (|W2[j]| / |W3[:, j]|)^1/2` after the rotation, so every unit's linear
          branch and write have equal norms;
        - attention: each block's `BlockAttentionGauge.canonical_element`, computed on the
          block after the rotation and gains above (its sign rules read residual coordinates,
          which are canonical by then); head side and residual side commute, so the parts
          combine into one element.

        - with `permutations=True`, then per block on the model the factors above make: the
          heads sorted as `HeadPermutationGauge.canonical_element` sorts them, and the hidden
          units by `|W1[:, j]|^2 + |W2[j]|^2 + |W3[:, j]|^2 + b1_j^2`, largest first (each
          term unchanged by the rotation; after the SwiGLU scales above the last two are
          canonical too). Without it the heads and units keep their order.

        Unfixed: rotations inside eigenspaces of equal eigenvalues (e.g. `vocab < d`, where
        `W_in^T W_in` has a null space), signs where the deciding entry is not unique, what
        `BlockAttentionGauge.canonical_element` leaves, and heads or units whose sort keys
        agree to rounding (ordered arbitrarily).

        **Raises:** as `check_model`; `ValueError` for the control (no symmetry).
        """
        if self.breaking:
            raise ValueError(
                "the control of DecoderGauge is no symmetry: it has no canonical form."
            )
        self.check_model(model)
        fused = fuse_layernorm(model)
        W_in = np.asarray(fused.W_in)
        gram = W_in.T @ W_in
        if fused.positions is not None:
            gram = gram + np.asarray(fused.positions).T @ np.asarray(fused.positions)
        vectors = np.linalg.eigh(gram)[1][:, ::-1]
        # signs: the embedding and the read-out (with its gain, which the reads carry) in the
        # new basis, stacked: a fused LayerNorm decoder writes nothing along the all-ones
        # direction (a null vector of the Gram matrix), but its read-out reads it
        gain = 1.0 if fused.norm.weight is None else np.asarray(fused.norm.weight)[:, None]
        seen = np.concatenate([W_in, (gain * np.asarray(fused.W_out)).T]) @ vectors
        Q = vectors * np.sign(seen[np.argmax(np.abs(seen), axis=0), np.arange(self.dim)])
        gains = tuple(
            jnp.asarray(np.ones(0) if n.weight is None else 1.0 / np.asarray(n.weight))
            for n in _norms(fused)
        )
        identity = self.identity()
        rotated = self.act(
            DecoderElement(jnp.asarray(Q), identity.attention, identity.scales, gains), model
        )
        scales = tuple(
            np.ones(0)
            if b.mlp.W3 is None
            else np.sqrt(
                np.linalg.norm(np.asarray(b.mlp.W2), axis=1)
                / np.linalg.norm(np.asarray(b.mlp.W3), axis=0)
            )
            for b in rotated.blocks
        )
        attention = tuple(
            a.canonical_element(b.attn) for a, b in zip(self.attention, rotated.blocks, strict=True)
        )
        element = DecoderElement(
            jnp.asarray(Q),
            attention,
            tuple(jnp.asarray(c) for c in scales),
            gains,
            identity.heads,
            identity.units,
        )
        if self.permutations:  # applied after the continuous factors: sorted on their result
            continuous = self.act(element, model)
            heads = tuple(
                HeadPermutationGauge.from_model(b.attn).canonical_element(b.attn)
                for b in continuous.blocks
            )
            element = dataclasses.replace(
                element, heads=heads, units=tuple(_unit_order(b.mlp) for b in continuous.blocks)
            )
        return cast_element(element, fused.W_in.dtype)

    def match(self, reference: Decoder, model: Decoder, g: DecoderElement) -> DecoderElement:
        """One round of alignment (`gj.align`): coordinate descent over the family's factors,
        each fitted on host numpy with the others fixed, composed after `g`. In order, on the
        current model `act(g, model)`:

        - residual rotation: the orthogonal Procrustes fit (SVD) of every residual-facing
          weight stacked: the writes as rows (`W_in`, `positions`, every `Wo`, `bo`, `W2`,
          `b2`: `W Q`) and the reads as columns (`Wq`, `Wk`, `Wv`, `W1`, `W3`, `W_out`:
          `Q^T W`). The exact minimiser without norm gains; with gains a read moves as
          `D^-1 Q^T D W`, and the fit is made on the effective reads `D W` against the
          reference's `D_ref W_ref` (they move by `Q^T` alone, whatever the gains): a
          surrogate, kept only where it lowers the distance;
        - norm gains: per channel `s > 0` minimising `|g s - g_ref|^2` plus the distance of
          the reads' rows divided by `s` (of the quartic's positive roots, the one of least
          cost: exact, `best_scale`);
        - permutations (`permutations=True` only): per block, weight matching by linear
          assignment (`scipy.optimize.linear_sum_assignment`, maximising the summed inner
          products with the reference's) of the attention heads, on each query head's
          products `Wq_i Wk_g^T` and `Wv_g Wo_i` (d x d each: the head's parameters that move
          together, multiplied so that the attention's query-key and value-output maps drop
          out), every pair of key-value groups scored by the assignment of their query heads,
          then the groups assigned on those scores (whole groups move with their query
          heads); and of the hidden units, on `W1[:, j]` with `W3[:, j] W2[j]` (SwiGLU: the
          unit scale drops out) or `W1[:, j]`, `b1[j]`, `W2[j]` (GELU). The permuted model's
          attention and SwiGLU scales are refitted (the two steps below) before the step is
          judged: the features need the residual basis, not those factors, aligned;
        - attention: each block's `BlockAttentionGauge.match` (query-key and value-output
          least squares, per key-value group; what it leaves unfitted stays);
        - SwiGLU: per hidden unit `c > 0` minimising the distance of `W3[:, j] c` and
          `W2[j] / c` (a quartic, exact, `best_scale`).

        Each step is kept only if the squared parameter distance does not rise, so a round
        never raises it. Without `permutations` the heads and hidden units keep their order,
        and a decoder whose heads or units were permuted is not recovered (measured at d = 8,
        four RoPE heads in two key-value groups, 16 SwiGLU units per block, moved by a sample
        of `permutations=True`: 307 to 2.3e-19 in 12 rounds with the permutations fitted,
        215.4 without; a prototype matching the raw weights instead of the products stalled
        at 69 on another draw of these sizes). A GELU MLP has no unit scales. A LayerNorm
        `model` moves in its fused form (`act`), compared with `reference` as given: the two
        must then have the same parameter structure (true without norm biases; with them,
        align the fused forms), and the writes' means that fusing removed stay a floor
        (measured at d = 8: a LayerNorm decoder moved by a sampled element aligned back to
        6.29, its distance to its own fused form being 6.38).

        Coordinate descent, not a joint optimum: the factors are coupled (the rotation's
        reads are conjugated by the gains), so recovery can take many rounds (measured at
        d = 8 with gains: 583 to 2.6e-16 in 38 rounds; without gains, four RoPE heads in two
        key-value groups, 329 to 3.7e-17 in 15), and with linear scores the attention's
        candidates can stall (see `BlockAttentionGauge.match`).

        **Arguments:** `reference`, `model`: two `Decoder`s of this family's sizes; `g`: the
        current element.

        **Returns:** the next element.

        **Raises:** as `check_model` (both models); `ValueError` for the control (no symmetry
        to align along), or a fused `model` whose parameters differ in structure from
        `reference`'s.
        """
        if self.breaking or any(a.breaking is not None for a in self.attention):
            raise ValueError("the control of DecoderGauge is no symmetry to align along.")
        self.check_model(reference)
        self.check_model(model)
        if _paths(reference) != _paths(fuse_layernorm(model)):
            raise ValueError(
                "`model`'s fused form (`fuse_layernorm`, what DecoderGauge moves) has another "
                "parameter structure than `reference` (norm biases folded into the reads): "
                "align `fuse_layernorm(reference)` and `fuse_layernorm(model)`."
            )
        identity = self.identity()
        current = _act(self, g, model)
        distance = _distance(reference, current)
        steps = (self._fit_rotation, self._fit_gains, self._fit_attention, self._fit_scales)
        if self.permutations:
            steps = steps[:2] + (self._fit_permutations,) + steps[2:]
        for step in steps:
            delta = step(reference, current, identity)
            if delta is None:
                continue
            candidate = _compose(self, g, delta)
            moved = _act(self, candidate, model)
            after = _distance(reference, moved)
            if after <= distance:  # a step that would raise the distance is left out
                g, current, distance = candidate, moved, after
        return g

    def _fit_rotation(self, reference, current, identity):
        """The residual rotation of `match` (Procrustes), as an element moving `current`."""
        d = self.dim
        gains, gains_ref = (
            [np.ones(d) if n.weight is None else np.asarray(n.weight) for n in _norms(m)]
            for m in (current, reference)
        )
        rows, rows_ref = [], []
        for (write, read), (write_ref, read_ref) in zip(
            _residual_weights(current), _residual_weights(reference), strict=True
        ):
            rows += [np.asarray(w).reshape(-1, d) for w in write]
            rows_ref += [np.asarray(w).reshape(-1, d) for w in write_ref]
            for (i, W), (_, Wr) in zip(read, read_ref, strict=True):
                # the read's columns as rows, times the gain before them: `D W` moves as
                # `Q^T D W` whatever the gains (`(D S) S^-1 D^-1 Q^T D W`), so the effective
                # reads are compared, the gains step then splitting them
                rows.append(gains[i] * np.moveaxis(np.asarray(W), -2, -1).reshape(-1, d))
                rows_ref.append(gains_ref[i] * np.moveaxis(np.asarray(Wr), -2, -1).reshape(-1, d))
        U, _, Vt = np.linalg.svd(np.concatenate(rows).T @ np.concatenate(rows_ref))
        Q = jnp.asarray(U @ Vt)  # argmax tr(Q^T X^T X_ref) over O(d)
        return DecoderElement(Q, identity.attention, identity.scales, identity.gains)

    def _fit_gains(self, reference, current, identity):
        """The norm-gain scales of `match` (per channel), or None without gains."""
        if not any(self.gained):
            return None
        reads = [[] for _ in self.gained]
        for (_, read), (_, read_ref) in zip(
            _residual_weights(current), _residual_weights(reference), strict=True
        ):
            for (i, W), (_, Wr) in zip(read, read_ref, strict=True):
                reads[i].append(
                    (np.moveaxis(np.asarray(W), -2, 0), np.moveaxis(np.asarray(Wr), -2, 0))
                )
        gains = []
        for norm, norm_ref, pairs, has in zip(
            _norms(current), _norms(reference), reads, self.gained, strict=True
        ):
            if not has:
                gains.append(jnp.ones((0,)))
                continue
            gain, gain_ref = np.asarray(norm.weight), np.asarray(norm_ref.weight)
            c = sum(np.sum(W.reshape(self.dim, -1) ** 2, 1) for W, _ in pairs)
            e = sum(np.sum((W * Wr).reshape(self.dim, -1), 1) for W, Wr in pairs)
            gains.append(jnp.asarray(best_scale(gain**2, gain * gain_ref, c, e)))
        return DecoderElement(identity.rotation, identity.attention, identity.scales, tuple(gains))

    def _fit_attention(self, reference, current, identity):
        """Every block's `BlockAttentionGauge.match` from the identity, as one element."""
        attention = tuple(
            a.match(br.attn, bc.attn, e)
            for a, br, bc, e in zip(
                self.attention, reference.blocks, current.blocks, identity.attention, strict=True
            )
        )
        return DecoderElement(identity.rotation, attention, identity.scales, identity.gains)

    def _fit_permutations(self, reference, current, identity):
        """The permutations of `match` (weight matching, per block), followed by the attention
        and SwiGLU fits on the permuted model, as one element moving `current`."""
        pairs = list(zip(reference.blocks, current.blocks, strict=True))
        heads = tuple(
            _match_heads(r.attn, c.attn, h) for (r, c), h in zip(pairs, identity.heads, strict=True)
        )
        units = tuple(
            _match_units(r.mlp, c.mlp, p) for (r, c), p in zip(pairs, identity.units, strict=True)
        )
        permutation = dataclasses.replace(identity, heads=heads, units=units)
        moved = _act(self, permutation, current)
        # the features are blind to the attention's maps and the unit scales (what the match
        # fitted does not align yet): they are refitted before the step is judged
        refit = self._fit_attention(reference, moved, identity)
        scales = self._fit_scales(reference, moved, identity)
        if scales is not None:
            refit = dataclasses.replace(refit, scales=scales.scales)
        return _compose(self, permutation, refit)

    def _fit_scales(self, reference, current, identity):
        """The SwiGLU unit scales of `match`, or None without a SwiGLU MLP."""
        if not any(self.hidden):
            return None
        scales = []
        for block, block_ref, f in zip(current.blocks, reference.blocks, self.hidden, strict=True):
            if not f:
                scales.append(jnp.ones((0,)))
                continue
            mlp, mlp_ref = block.mlp, block_ref.mlp
            W3, W3r, W2, W2r = (np.asarray(x) for x in (mlp.W3, mlp_ref.W3, mlp.W2, mlp_ref.W2))
            scales.append(
                jnp.asarray(
                    best_scale(
                        np.sum(W3**2, 0),
                        np.sum(W3 * W3r, 0),
                        np.sum(W2**2, 1),
                        np.sum(W2 * W2r, 1),
                    )
                )
            )
        return DecoderElement(identity.rotation, identity.attention, tuple(scales), identity.gains)

    def act(self, g: DecoderElement, model: Decoder) -> Decoder:
        self.check_model(model)
        model = fuse_layernorm(model)  # unchanged for RMSNorm; LayerNorm: its fused form
        g = cast_element(g, model.W_in.dtype)
        Q = g.rotation if self.breaking else _polar(g.rotation)
        Qinv = jnp.linalg.inv(Q) if self.breaking else Q.T
        dtype = model.W_in.dtype

        norms = _norms(model)

        def read(i, W):  # W (..., d, n) read after norm i: S^-1 D^-1 Q^-1 D W
            D = _gain(norms[i], self.dim, dtype)
            s = g.gains[i]
            S = s if s.size else jnp.ones((self.dim,), dtype)  # empty: a norm without a gain
            # the d x d map first: a four-operand einsum may contract through an (i, j, n)
            # intermediate (measured: 16 GiB per lane at d = 768 with a 2048-wide MLP)
            M = Qinv * D[None, :] / (S * D)[:, None]
            return jnp.einsum("ij,...jn->...in", M, W)

        def gained(i):
            norm, s = norms[i], g.gains[i]
            return norm if not s.size else eqx.tree_at(lambda n: n.weight, norm, norm.weight * s)

        blocks = []
        for b, (block, gauge, elem, c) in enumerate(
            zip(model.blocks, self.attention, g.attention, g.scales, strict=True)
        ):
            n1, n2 = 1 + 2 * b, 2 + 2 * b  # this block's norms in `_norms` order
            attn = gauge.act(elem, block.attn)
            attn = eqx.tree_at(
                lambda a: (a.Wq, a.Wk, a.Wv, a.Wo, a.bo),
                attn,
                (
                    read(n1, attn.Wq),
                    read(n1, attn.Wk),
                    read(n1, attn.Wv),
                    attn.Wo @ Q,
                    None if attn.bo is None else attn.bo @ Q,
                ),
                is_leaf=lambda x: x is None,
            )
            mlp = block.mlp
            W3 = None if mlp.W3 is None else read(n2, mlp.W3) * c
            W2 = (mlp.W2 / c[:, None]) if c.size else mlp.W2
            mlp = eqx.tree_at(
                lambda m: (m.W1, m.W3, m.W2, m.b2),
                mlp,
                (read(n2, mlp.W1), W3, W2 @ Q, None if mlp.b2 is None else mlp.b2 @ Q),
                is_leaf=lambda x: x is None,
            )
            if g.heads:  # the finite factors, last: relabel heads and hidden units
                attn, mlp = _permute(attn, mlp, g.heads[b], g.units[b])
            blocks.append(
                eqx.tree_at(
                    lambda b: (b.attn, b.mlp, b.norm1, b.norm2),
                    block,
                    (attn, mlp, gained(n1), gained(n2)),
                )
            )
        # learned positions are written into the stream like W_in; the read-out bias `b_out`
        # is added after the read-out and does not move
        return eqx.tree_at(
            lambda m: (m.W_in, m.positions, m.blocks, m.W_out, m.norm),
            model,
            (
                model.W_in @ Q,
                None if model.positions is None else model.positions @ Q,
                tuple(blocks),
                read(0, model.W_out),
                gained(0),
            ),
            is_leaf=lambda x: x is None,
        )


def _sample_heads(key: PRNGKeyArray, G: int, r: int) -> HeadPermutation:
    """A uniform permutation of G key-value groups and of the r query heads inside each."""
    kg, kh = jax.random.split(key)
    heads = jax.vmap(lambda k: jax.random.permutation(k, r))(jax.random.split(kh, G))
    return HeadPermutation(jax.random.permutation(kg, G), heads)


def _old_heads(h: HeadPermutation) -> Int[Array, " H"]:
    """The old query head of every new one."""
    return (h.groups[:, None] * h.heads.shape[1] + h.heads).reshape(-1)


def _relabel(g: DecoderElement, heads: tuple, units: tuple) -> DecoderElement:
    """`g` with its per-group, per-head and per-unit factors re-indexed from the labels after
    the permutations `(heads, units)` to those before: `C P = P C'` (`C` acting on the
    permuted model, `C'` on the model before it); the residual factors carry no labels."""

    def attention(e: BlockAttentionElement, h: HeadPermutation) -> BlockAttentionElement:
        groups = jnp.argsort(h.groups)  # new group j is old group h.groups[j]
        alpha = e.alpha[jnp.argsort(_old_heads(h))] if e.alpha.size else e.alpha
        return BlockAttentionElement(
            e.qk[groups], e.key_shift[groups], e.vo[groups], e.value_shift[groups], alpha
        )

    return dataclasses.replace(
        g,
        attention=tuple(attention(e, h) for e, h in zip(g.attention, heads, strict=True)),
        scales=tuple(
            c[jnp.argsort(p)] if c.size else c for c, p in zip(g.scales, units, strict=True)
        ),
    )


def _permute(attn, mlp, h: HeadPermutation, p: Int[Array, " f"]):
    """A block's attention with its heads and its MLP with its hidden units in the new order
    (new query head `j r + l` is old head `(h.groups[j], h.heads[j, l])`, new unit `j` old
    unit `p[j]`): what moves with them moves along, `bo` and `b2` stay."""

    def take(a, index, axis=0):
        return None if a is None else jnp.take(a, index, axis=axis)

    old = _old_heads(h)
    attn = eqx.tree_at(
        lambda m: (m.Wq, m.bq, m.Wo, m.Wk, m.bk, m.Wv, m.bv),
        attn,
        tuple(take(a, i) for a, i in zip(
            (attn.Wq, attn.bq, attn.Wo, attn.Wk, attn.bk, attn.Wv, attn.bv),
            (old, old, old, h.groups, h.groups, h.groups, h.groups),
            strict=True,
        )),
        is_leaf=lambda x: x is None,
    )  # fmt: skip
    mlp = eqx.tree_at(
        lambda m: (m.W1, m.W3, m.b1, m.W2),
        mlp,
        (take(mlp.W1, p, 1), take(mlp.W3, p, 1), take(mlp.b1, p), take(mlp.W2, p)),
        is_leaf=lambda x: x is None,
    )
    return attn, mlp


def _match_heads(reference, current, identity: HeadPermutation) -> HeadPermutation:
    """The key-value groups and the query heads inside each that bring `current`'s heads
    closest to `reference`'s (host numpy): per query head i of group g the products `Wq_i
    Wk_g^T` and `Wv_g Wo_i` (d x d each, which every element of `BlockAttentionGauge` but the
    score scale keeps), stacked as its features; every pair of groups scored by the linear
    assignment of their heads (`<features_ref, features>` summed), then the groups assigned on
    those scores: the exact maximiser of the summed inner products over the permutations."""

    def features(a):
        group = np.asarray(a.group)
        Wq, Wk, Wv, Wo = (np.asarray(x) for x in (a.Wq, a.Wk, a.Wv, a.Wo))
        qk = np.einsum("hdk,hek->hde", Wq, Wk[group])
        vo = np.einsum("hdv,hve->hde", Wv[group], Wo)
        return np.concatenate([qk.reshape(len(group), -1), vo.reshape(len(group), -1)], 1)

    G, r = identity.heads.shape
    similarity = (features(reference) @ features(current).T).reshape(G, r, G, r)
    score, inner = np.empty((G, G)), np.empty((G, G, r), int)
    for a in range(G):
        for b in range(G):
            _, inner[a, b] = scipy.optimize.linear_sum_assignment(
                similarity[a, :, b], maximize=True
            )
            score[a, b] = similarity[a, np.arange(r), b, inner[a, b]].sum()
    _, groups = scipy.optimize.linear_sum_assignment(score, maximize=True)
    dtype = identity.groups.dtype
    return HeadPermutation(
        jnp.asarray(groups, dtype), jnp.asarray(inner[np.arange(G), groups], dtype)
    )


def _match_units(reference, current, identity: Int[Array, " f"]) -> Int[Array, " f"]:
    """The hidden units' order that brings `current`'s MLP closest to `reference`'s (host
    numpy): the linear assignment of the units' features, for SwiGLU the gate column `W1[:, j]`
    and the product `W3[:, j] W2[j]` (d x d, which the unit scale keeps), for GELU `W1[:, j]`,
    `b1[j]` and `W2[j]` (weight matching)."""

    def features(mlp):
        W1, W2 = np.asarray(mlp.W1), np.asarray(mlp.W2)
        if mlp.W3 is None:
            return np.concatenate([W1.T, np.asarray(mlp.b1)[:, None], W2], 1)
        product = np.einsum("dj,je->jde", np.asarray(mlp.W3), W2).reshape(len(W2), -1)
        return np.concatenate([W1.T, product], 1)

    similarity = features(reference) @ features(current).T
    _, units = scipy.optimize.linear_sum_assignment(similarity, maximize=True)
    return jnp.asarray(units, identity.dtype)


def _norms(model: Decoder) -> list:
    """The final norm, then each block's two (the order of `DecoderElement.gains`)."""
    return [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]


def _residual_weights(model: Decoder) -> list:
    """Per part (the read-in and read-out, then each block) `(writes, reads)`: the arrays
    written into the residual stream (last axis d: `W Q`) and `(norm index, W)` for those
    read after norm `i` of `_norms` (axis -2 is d: `D^-1 Q^T D W`)."""
    parts = [
        (
            [w for w in (model.W_in, model.positions) if w is not None],
            [(0, model.W_out)],
        )
    ]
    for b, block in enumerate(model.blocks):
        a, mlp = block.attn, block.mlp
        writes = [w for w in (a.Wo, a.bo, mlp.W2, mlp.b2) if w is not None]
        reads = [(1 + 2 * b, W) for W in (a.Wq, a.Wk, a.Wv)]
        reads += [(2 + 2 * b, W) for W in (mlp.W1, mlp.W3) if W is not None]
        parts.append((writes, reads))
    return parts


# `match` acts and composes several times a round on models of one structure: compiled once,
# these take milliseconds where the eager ones took 0.14 s (d = 8, RoPE: measured)
@eqx.filter_jit
def _act(gauge: DecoderGauge, g: DecoderElement, model: Decoder) -> Decoder:
    return gauge.act(g, model)


@eqx.filter_jit
def _compose(gauge: DecoderGauge, g1: DecoderElement, g2: DecoderElement) -> DecoderElement:
    return gauge.compose(g1, g2)


def _paths(model) -> list[str]:
    """The paths of `model`'s inexact arrays (a fused LayerNorm decoder has RMSNorms: the
    same paths, another tree structure)."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_inexact_array))[0]
    return [jax.tree_util.keystr(p) for p, _ in leaves]


def _distance(a, b) -> float:
    """`sum |a - b|^2` over the inexact arrays of two models of one structure (host)."""
    la, lb = (jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array)) for m in (a, b))
    pairs = zip(la, lb, strict=True)
    return float(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2) for x, y in pairs))


def layernorm_null_dimension(model: Decoder) -> int:
    """The dimension of a LayerNorm `Decoder`'s parameter symmetries (its Jacobian null space
    for generic inputs), counted on its own parameters; `DecoderGauge` acts on its fused
    RMSNorm form instead, a model of another structure.

    LayerNorm's output is mean-free, so of the residual rotations only those fixing the
    all-ones vector survive ((d-1)(d-2)/2), and the mean of every row written to the stream
    (`W_in`, `Wo`, `W2`, a GELU MLP's `b2`) and the all-ones component of every column
    reading a norm (`Wq`, `Wk`, `Wv`, `W1`, `W3`, `W_out`) are free; plus per block the
    attention's GL(k) x GL(v) per key-value group and SwiGLU's unit scales. The symmetry
    census checks it against `symmetry_dimension` (74 = 74 at d = 6).

    **Arguments:** `model`: a `Decoder` with LayerNorms, without norm gains or attention
    biases (whose own directions this count leaves out).

    **Returns:** the predicted null-space dimension.

    **Raises:** `TypeError` for anything but a `Decoder`; `ValueError` for RMSNorms, norm
    gains or attention biases.
    """
    if not isinstance(model, Decoder):
        raise model_error("layernorm_null_dimension", "a Decoder", model)
    norms = _norms(model)
    if not all(isinstance(n, eqx.nn.LayerNorm) and n.weight is None for n in norms):
        raise ValueError(
            "`model` of layernorm_null_dimension must have LayerNorms without gains; received "
            f"norms {[type(n).__name__ for n in norms]} with gains "
            f"{[n.weight is not None for n in norms]}."
        )
    if any(n.bias is not None for n in norms) or model.positions is not None:
        raise ValueError(
            "`model` of layernorm_null_dimension must have no norm biases and no learned "
            "positions (this count leaves their directions out)."
        )
    d = model.W_in.shape[1]
    count = (d - 1) * (d - 2) // 2 + model.W_in.shape[0] + model.W_out.shape[1]
    for i, b in enumerate(model.blocks):
        a, mlp = b.attn, b.mlp
        if any(x is not None for x in (a.bq, a.bk, a.bv, a.bo)):
            raise ValueError(
                f"`model.blocks[{i}].attn` has biases; layernorm_null_dimension counts "
                "attention without biases."
            )
        count += a.Wo.shape[0] * a.Wo.shape[1] + mlp.W2.shape[0] + (mlp.b2 is not None)  # writes
        count += sum(w.shape[0] * w.shape[2] for w in (a.Wq, a.Wk, a.Wv))  # read columns
        count += mlp.W1.shape[1] * (1 if mlp.W3 is None else 2)
        count += a.Wk.shape[0] * (a.Wk.shape[2] ** 2 + a.Wv.shape[2] ** 2)  # GL(k) x GL(v)
        count += 0 if mlp.W3 is None else mlp.W1.shape[1]  # SwiGLU unit scales
    return count
