"""Canonical forms: one representative per gauge orbit, so that models computing the same
function through a symmetry map to the same parameters.

Each family that has one says how (`AbstractGauge.canonical_element`): `RescalingGauge` the
balanced point (minimum norm, ENorm), `UnitPermutationGauge` hidden units sorted by norm,
`BlockAttentionGauge` an SVD split of every query-key and value-output product (RoPE: per
frequency pair a balanced modulus and a fixed phase), `DecoderGauge` gains 1, the residual
basis of the embedding's principal axes, balanced SwiGLU units and each block's attention
split, `HeadPermutationGauge` heads sorted by norm. `canonicalize` applies several families
one after the other, continuous ones first: the discrete families' sort keys are computed on
the continuous canonical form, and each family's canonical form is equivariant under the
others (a permutation of a balanced model is balanced; the SVD split of permuted heads is the
permuted split), so the composite result is the same for every element of the whole group.
"""

from collections.abc import Sequence
from typing import Any

from ..gauges.base import AbstractGauge
from ..gauges.block_attention import BlockAttentionGauge
from ..gauges.decoder import DecoderGauge
from ..gauges.permutation import HeadPermutationGauge, UnitPermutationGauge
from ..gauges.rescaling import RescalingGauge


# the default order: continuous families first, then the permutations that sort their result;
# each with the options of `from_model` it is built with (a decoder's heads and hidden units
# are sorted by its own family: no other family permutes them inside a decoder)
DEFAULT_FAMILIES = (
    (RescalingGauge, {}),
    (BlockAttentionGauge, {}),
    (DecoderGauge, {"permutations": True}),
    (UnitPermutationGauge, {}),
    (HeadPermutationGauge, {}),
)


def default_families(model: Any) -> tuple[AbstractGauge, ...]:
    """The families of `DEFAULT_FAMILIES`, built with their options, whose `from_model`
    accepts `model` (each family decides, no dispatch on the model's type here), in order.

    **Raises:** `TypeError` when none does.
    """
    found = []
    for family, options in DEFAULT_FAMILIES:
        try:
            gauge = family.from_model(model, **options)
            gauge.check_model(model)
        except (TypeError, ValueError):
            continue
        found.append(gauge)
    if not found:
        names = ", ".join(f.__name__ for f, _ in DEFAULT_FAMILIES)
        raise TypeError(
            f"`model` must be a model one of the families with a canonical form acts on "
            f"({names}: e.g. an eqx.nn.MLP or a BlockAttention); received "
            f"{type(model).__name__}."
        )
    return tuple(found)


def _families(model: Any, gauge: Any) -> tuple[AbstractGauge, ...]:
    if gauge is None:
        return default_families(model)
    families = tuple(gauge) if isinstance(gauge, Sequence) else (gauge,)
    if not families or not all(isinstance(f, AbstractGauge) for f in families):
        raise TypeError(
            "`gauge` must be a gauge family, a non-empty sequence of them (applied in order) "
            f"or None; received {gauge!r}."
        )
    for f in families:
        if type(f).canonical_element is AbstractGauge.canonical_element:
            f.canonical_element(model)  # the family's refusal, naming it
    return families


def canonicalize(model: Any, gauge: AbstractGauge | Sequence[AbstractGauge] | None = None) -> Any:
    """The canonical representative of the orbit of `model`: a model of the same structure (a
    LayerNorm `Decoder`: its fused RMSNorm form) computing the same function, equal (to
    rounding) for every model on that orbit.

    **Arguments:**

    - `model`: the model.
    - `gauge`: a family, or a sequence of families applied in order (each family's
      `canonical_element` of the model the previous ones produced). None: every family of
      `RescalingGauge`, `BlockAttentionGauge`, `DecoderGauge`, `UnitPermutationGauge`,
      `HeadPermutationGauge` (in that order) whose `from_model` accepts `model`: for a ReLU
      (positively homogeneous) `eqx.nn.MLP` balancing, then unit sorting; for any other MLP
      unit sorting only; for a `BlockAttention` the query-key / value-output split, then head
      sorting; for a `Decoder` (a LayerNorm one: its fused RMSNorm form, as `DecoderGauge`
      returns) the residual basis, gains, SwiGLU scales and attention splits, then its heads
      and hidden units sorted per block (`DecoderGauge.from_model(model, permutations=True)`).

    **Returns:** the canonical model.

    **Raises:** `TypeError` for a `gauge` that is not a family or a sequence of them, or (None)
    a model no family with a canonical form acts on; `NotImplementedError` for a family
    without a canonical form; as the families' `check_model` for a model one does not act on.
    All before any family's canonical element is computed.
    """
    families = _families(model, gauge)
    for family in families:
        family.check_model(model)
    for family in families:
        model = family.act(family.canonical_element(model), model)
    return model
