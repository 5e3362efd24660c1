"""Finite gauge groups: permutations of attention heads and of MLP hidden units.

Both are discrete: their Lie algebra is {0}, so `tangent` is zero and the Jacobian null space
(`gj.symmetry_dimension`) never sees them; a sweep checks them as finite transformations.

- `HeadPermutationGauge` (`BlockAttention`): the output `sum_i head_i Wo_i (+ bo)` is a sum
  over query heads, so relabelling heads, each with its query, key, value and output
  parameters, leaves it unchanged. Under grouped-query attention a query head must keep its
  key-value head: an element permutes the G key-value groups (`sigma`, moving each group's
  query heads along) and the r = H / G query heads inside every group (`tau`). New query head
  `(j, l)` (head `j r + l`) is old head `(sigma_j, tau_jl)`. (The control's elements hold the
old query head of every new one in `heads`, `groups` unused.) RoPE and causal masks act the same
  on every head: no restriction.
- `UnitPermutationGauge` (`BlockMLP`, `eqx.nn.MLP`): an elementwise activation commutes with
  permutations, so permuting a hidden layer's units (the columns that write them, the rows
  that read them) leaves the function unchanged; for SwiGLU the gate `W1` and the linear branch
  `W3` move together. An element is one permutation per hidden layer; new unit `j` is old unit
  `p_j`.

Group law (g1 then g2): `p = p1[p2]`; for heads `sigma = sigma1[sigma2]` and `tau_jl =
tau1[sigma2_j, tau2_jl]`. Inverse: `argsort`.

Symmetry-breaking controls (`control()`): the permutation applied to one side only (query
heads without their keys, values and outputs; a hidden layer's writing weights without the
reading ones), by a cyclic shift of at least one place, so that no control sample is the
identity.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jaxtyping import Array, Int, PRNGKeyArray

from ..models.transformer import BlockAttention, BlockMLP
from .base import AbstractGauge, model_error


class AbstractPermutationGauge(AbstractGauge):
    """A finite family of permutations. Its Lie algebra is {0}: `tangent` is zero."""

    infinitesimal = False
    rescales_parameters = False  # a permutation keeps every norm

    def tangent(self, model: Any, direction: Any) -> Any:
        """Zeros shaped like the model's inexact arrays (a finite group has no directions).

        **Raises:** as `check_model`.
        """
        self.check_model(model)
        return jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))


def _unit_layers(mlp: Any) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """`(weight (out, in), bias or None)` of every layer, host arrays; a `BlockMLP` as its two
    layers (gate and linear branch stacked as one writing weight)."""
    if isinstance(mlp, BlockMLP):
        write = np.asarray(mlp.W1).T
        if mlp.W3 is not None:
            write = np.concatenate([write, np.asarray(mlp.W3).T], axis=1)
        bias = None if mlp.b1 is None else np.asarray(mlp.b1)
        return [(write, bias), (np.asarray(mlp.W2).T, None)]
    return [
        (np.asarray(lin.weight), None if lin.bias is None else np.asarray(lin.bias))
        for lin in mlp.layers
    ]


def _unit_features(layers, i: int, prev, nxt) -> np.ndarray:
    """Hidden layer i's units as rows: the weights writing them (inputs permuted by `prev`),
    their bias, the weights reading them (outputs permuted by `nxt`)."""
    write, bias = layers[i]
    write = write if prev is None else write[:, prev]
    read = layers[i + 1][0]
    read = read if nxt is None else read[nxt]
    parts = [write] + ([] if bias is None else [bias[:, None]]) + [read.T]
    return np.concatenate(parts, axis=1)


def _shift(key: PRNGKeyArray, n: int) -> Int[Array, " n"]:
    """A cyclic shift of `n` >= 2 places by 1..n-1: never the identity."""
    s = jax.random.randint(key, (), 1, n)
    return (jnp.arange(n) + s) % n


class HeadPermutation(eqx.Module):
    """`groups` (G,): the old key-value group of each new group; `heads` (G, r): the old query
    head (within its group) of each new query head."""

    groups: Int[Array, " G"]
    heads: Int[Array, "G r"]


def invert_head_permutation(g: HeadPermutation) -> HeadPermutation:
    """The inverse of a permutation of key-value groups and of the query heads inside each
    (the group law of `HeadPermutationGauge`, also `DecoderGauge`'s per-block heads)."""
    groups = jnp.argsort(g.groups)
    return HeadPermutation(groups, jnp.argsort(g.heads[groups], axis=1))


def compose_head_permutations(g1: HeadPermutation, g2: HeadPermutation) -> HeadPermutation:
    """`g1` then `g2`, for permutations of key-value groups and of the query heads inside
    each (the group law of `HeadPermutationGauge`, also `DecoderGauge`'s per-block heads)."""
    heads = jnp.take_along_axis(g1.heads[g2.groups], g2.heads, axis=1)
    return HeadPermutation(g1.groups[g2.groups], heads)


class HeadPermutationGauge(AbstractPermutationGauge):
    """Permutations of the heads of a `BlockAttention` (module docstring). Build it with
    `HeadPermutationGauge.from_model(attention)`.

    **Arguments:** `num_heads` H (at least 2), `num_kv_heads` G (dividing H); `one_sided`: the
    control (query heads moved alone).

    **Raises:** `ValueError` for fewer than 2 heads (no permutation but the identity) or G not
    dividing H.
    """

    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    one_sided: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        H, G = self.num_heads, self.num_kv_heads
        if isinstance(H, bool) or not isinstance(H, int) or H < 2:
            raise ValueError(f"`num_heads` must be an int >= 2 to permute; received {H!r}.")
        if isinstance(G, bool) or not isinstance(G, int) or G <= 0 or H % G:
            raise ValueError(
                f"`num_kv_heads` must be a positive int dividing `num_heads` ({H}); received {G!r}."
            )

    @classmethod
    def from_model(cls, attention: Any) -> "HeadPermutationGauge":
        """The family with the head counts of `attention`.

        **Raises:** `TypeError` naming the family and the model's type when `attention` is not
        a `BlockAttention`; `ValueError` (the constructor's) for head counts that make no
        family, e.g. a single query head.
        """
        if not isinstance(attention, BlockAttention):
            raise model_error(cls.__name__, "a BlockAttention", attention)
        return cls(attention.num_heads, attention.num_kv_heads)

    @property
    def _per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_model(self, model: Any) -> None:
        if not isinstance(model, BlockAttention):
            raise model_error(
                self, "a BlockAttention", model, "Use HeadPermutationGauge.from_model(model)."
            )
        if (model.num_heads, model.num_kv_heads) != (self.num_heads, self.num_kv_heads):
            raise ValueError(
                f"HeadPermutationGauge has {self.num_heads} query and {self.num_kv_heads} "
                f"key-value heads; the model has {model.num_heads} and {model.num_kv_heads}."
            )

    def sample(self, key: PRNGKeyArray) -> HeadPermutation:
        kg, kh = jax.random.split(key)
        G, r = self.num_kv_heads, self._per_group
        if self.one_sided:  # the control: query heads shifted, never the identity
            return HeadPermutation(jnp.arange(G), _shift(kh, self.num_heads).reshape(G, r))
        groups = jax.random.permutation(kg, G)
        heads = jax.vmap(lambda k: jax.random.permutation(k, r))(jax.random.split(kh, G))
        return HeadPermutation(groups, heads)

    def identity(self) -> HeadPermutation:
        G, r = self.num_kv_heads, self._per_group
        if self.one_sided:
            return HeadPermutation(jnp.arange(G), jnp.arange(self.num_heads).reshape(G, r))
        return HeadPermutation(jnp.arange(G), jnp.broadcast_to(jnp.arange(r), (G, r)))

    def inverse(self, g: HeadPermutation) -> HeadPermutation:
        if self.one_sided:  # `heads` holds the old query head of every new one
            return HeadPermutation(
                g.groups, jnp.argsort(g.heads.reshape(-1)).reshape(g.heads.shape)
            )
        return invert_head_permutation(g)

    def compose(self, g1: HeadPermutation, g2: HeadPermutation) -> HeadPermutation:
        if self.one_sided:
            flat = g1.heads.reshape(-1)[g2.heads.reshape(-1)]
            return HeadPermutation(g1.groups, flat.reshape(g1.heads.shape))
        return compose_head_permutations(g1, g2)

    def act(self, g: HeadPermutation, model: Any) -> BlockAttention:
        self.check_model(model)
        if self.one_sided:  # query heads reordered, keys, values and outputs in place
            return _take_heads(model, g.heads.reshape(-1), None, query_only=True)
        old = (g.groups[:, None] * self._per_group + g.heads).reshape(-1)  # per new head
        return _take_heads(model, old, g.groups, query_only=False)

    def canonical_element(self, model: Any) -> HeadPermutation:
        """The heads sorted by a key that the continuous gauges of `BlockAttentionGauge` (bar
        the score scale) do not change: per query head i of key-value group g,
        `|Wq_i Wk_g^T|^2 + |Wv_g Wo_i|^2` (Frobenius), largest first; the groups by the sum of
        their heads' keys, the heads inside a group by their own. Heads (or groups) whose keys
        agree to rounding are ordered arbitrarily (unfixed).

        **Raises:** as `check_model`; `ValueError` for the control (it is no symmetry).
        """
        if self.one_sided:
            raise ValueError(
                "the control of HeadPermutationGauge is no symmetry: it has no canonical form."
            )
        self.check_model(model)
        group = np.asarray(model.group)
        Wq, Wk, Wv, Wo = (np.asarray(a) for a in (model.Wq, model.Wk, model.Wv, model.Wo))
        qk = np.einsum("hdk,hek->hde", Wq, Wk[group])
        vo = np.einsum("hdv,hve->hde", Wv[group], Wo)
        key = np.sum(qk**2, axis=(1, 2)) + np.sum(vo**2, axis=(1, 2))
        key = key.reshape(self.num_kv_heads, self._per_group)
        groups = np.argsort(-np.sum(key, axis=1), kind="stable")
        heads = np.argsort(-key[groups], axis=1, kind="stable")
        return HeadPermutation(jnp.asarray(groups), jnp.asarray(heads))

    def control(self) -> "HeadPermutationGauge":
        """Query heads shifted without their keys, values and outputs."""
        return HeadPermutationGauge(self.num_heads, self.num_kv_heads, one_sided=True)


def _take_heads(model: BlockAttention, heads, groups, query_only: bool) -> BlockAttention:
    """`model` with query heads `heads` (and key-value groups `groups`) in the new order."""

    def take(a, index):
        return None if a is None else a[index]

    if query_only:
        return eqx.tree_at(
            lambda m: (m.Wq, m.bq), model, (model.Wq[heads], take(model.bq, heads)),
            is_leaf=lambda x: x is None,
        )  # fmt: skip
    return eqx.tree_at(
        lambda m: (m.Wq, m.bq, m.Wo, m.Wk, m.bk, m.Wv, m.bv),
        model,
        (
            model.Wq[heads],
            take(model.bq, heads),
            model.Wo[heads],
            model.Wk[groups],
            take(model.bk, groups),
            model.Wv[groups],
            take(model.bv, groups),
        ),
        is_leaf=lambda x: x is None,
    )


class UnitPermutationGauge(AbstractPermutationGauge):
    """Permutations of the hidden units of a `BlockMLP` (one hidden layer) or an
    `eqx.nn.MLP` (one permutation per hidden layer), module docstring. Build it with
    `UnitPermutationGauge.from_model(mlp)`.

    **Arguments:** `widths`: the hidden layers' widths (each at least 2); `one_sided`: the
    control (the first hidden layer's writing weights permuted alone).

    **Raises:** `ValueError` for no hidden layer or a width below 2.
    """

    widths: tuple[int, ...] = eqx.field(static=True, converter=tuple)
    one_sided: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not self.widths or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 2 for w in self.widths
        ):
            raise ValueError(
                f"`widths` must be a non-empty tuple of ints >= 2 (hidden layers to permute); "
                f"received {self.widths!r}."
            )

    @classmethod
    def from_model(cls, mlp: Any) -> "UnitPermutationGauge":
        """The family with the hidden widths of `mlp`.

        **Raises:** `TypeError` naming the family and the model's type when `mlp` is neither a
        `BlockMLP` nor an `eqx.nn.MLP`; `ValueError` (the constructor's) for widths that make
        no family, e.g. an MLP without hidden layers.
        """
        if isinstance(mlp, BlockMLP):
            return cls((mlp.W1.shape[1],))
        if isinstance(mlp, eqx.nn.MLP):
            return cls(tuple(layer.out_features for layer in mlp.layers[:-1]))
        raise model_error(cls.__name__, "a BlockMLP or an eqx.nn.MLP", mlp)

    def check_model(self, model: Any) -> None:
        if isinstance(model, BlockMLP):
            widths = (model.W1.shape[1],)
        elif isinstance(model, eqx.nn.MLP):
            widths = tuple(layer.out_features for layer in model.layers[:-1])
        else:
            raise model_error(
                self, "a BlockMLP or an eqx.nn.MLP", model,
                "Use UnitPermutationGauge.from_model(model).",
            )  # fmt: skip
        if widths != self.widths:
            raise ValueError(
                f"UnitPermutationGauge permutes hidden layers of widths {self.widths}; the "
                f"model's are {widths}."
            )

    def sample(self, key: PRNGKeyArray) -> tuple[Int[Array, " w"], ...]:
        keys = jax.random.split(key, len(self.widths))
        if self.one_sided:
            return tuple(_shift(k, w) for k, w in zip(keys, self.widths, strict=True))
        return tuple(jax.random.permutation(k, w) for k, w in zip(keys, self.widths, strict=True))

    def identity(self) -> tuple[Int[Array, " w"], ...]:
        return tuple(jnp.arange(w) for w in self.widths)

    def inverse(self, g: tuple) -> tuple:
        return tuple(jnp.argsort(p) for p in g)

    def compose(self, g1: tuple, g2: tuple) -> tuple:
        return tuple(p1[p2] for p1, p2 in zip(g1, g2, strict=True))

    def act(self, g: tuple, model: Any) -> Any:
        self.check_model(model)
        if isinstance(model, BlockMLP):
            (p,) = g
            reads = model.W2 if self.one_sided else model.W2[p]
            return eqx.tree_at(
                lambda m: (m.W1, m.W3, m.b1, m.W2),
                model,
                (
                    model.W1[:, p],
                    None if model.W3 is None else model.W3[:, p],
                    None if model.b1 is None else model.b1[p],
                    reads,
                ),
                is_leaf=lambda x: x is None,
            )
        layers = list(model.layers)
        for i, p in enumerate(g):
            if self.one_sided and i > 0:
                break
            write = layers[i]
            write = eqx.tree_at(lambda lin: lin.weight, write, write.weight[p])
            if write.bias is not None:
                write = eqx.tree_at(lambda lin: lin.bias, write, write.bias[p])
            layers[i] = write
            if not self.one_sided:
                read = layers[i + 1]
                layers[i + 1] = eqx.tree_at(lambda lin: lin.weight, read, read.weight[:, p])
        return eqx.tree_at(lambda m: m.layers, model, tuple(layers))

    def match(self, reference: Any, model: Any, g: tuple) -> tuple:
        """Weight matching (Ainsworth et al., ICLR 2023): one sweep over the hidden layers,
        each layer's permutation the linear assignment (`scipy.optimize.linear_sum_assignment`)
        that maximises `<theta_ref, theta(g)>` over the weights writing and reading its units
        (and its bias), the other layers' permutations fixed. Each step can only lower the
        distance `|theta_ref - theta(g)|^2` (a permutation keeps `|theta|`).

        **Raises:** as `check_model` (both models); `ValueError` for the control (it is no
        symmetry to align along).
        """
        if self.one_sided:
            raise ValueError("the control of UnitPermutationGauge is no symmetry to align along.")
        self.check_model(reference)
        self.check_model(model)
        ref, mod = (_unit_layers(m) for m in (reference, model))
        g = [np.asarray(p) for p in g]
        for i in range(len(g)):
            prev = g[i - 1] if i > 0 else None
            nxt = g[i + 1] if i + 1 < len(g) else None
            features_ref = _unit_features(ref, i, None, None)
            features = _unit_features(mod, i, prev, nxt)
            _, g[i] = scipy.optimize.linear_sum_assignment(features_ref @ features.T, maximize=True)
        return tuple(jnp.asarray(p) for p in g)

    def canonical_element(self, model: Any) -> tuple[Int[Array, " w"], ...]:
        """Every hidden layer's units sorted by a key that no permutation of the other layers
        changes: the squared norm of the weights (and bias) writing the unit, largest first;
        ties by the squared norm of the weights reading it, then by the writing weights'
        sorted entries. On a balanced ReLU MLP the two norms agree, so rescaling the model
        first (`gj.canonicalize`'s default) leaves a key that no rescaling changes either.
        Units whose keys agree to rounding are ordered arbitrarily (their order stays unfixed).

        **Raises:** as `check_model`; `ValueError` for the control (it is no symmetry).
        """
        if self.one_sided:
            raise ValueError(
                "the control of UnitPermutationGauge is no symmetry: it has no canonical form."
            )
        self.check_model(model)
        layers = _unit_layers(model)
        order = []
        for i in range(len(self.widths)):
            write, bias = layers[i]
            incoming = np.sum(write**2, axis=1) + (0.0 if bias is None else bias**2)
            outgoing = np.sum(layers[i + 1][0] ** 2, axis=0)
            ties = np.sort(write, axis=1).T[::-1]  # lexsort: the last key is the primary one
            order.append(jnp.asarray(np.lexsort((*ties, -outgoing, -incoming))))
        return tuple(order)

    def control(self) -> "UnitPermutationGauge":
        """The first hidden layer's units permuted in the weights that write them only."""
        return UnitPermutationGauge(self.widths, one_sided=True)
