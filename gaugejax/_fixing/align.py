"""Alignment: the element of a gauge family that brings one model closest to another.

Two networks trained from different seeds compute similar functions in different coordinates:
hidden units in another order, residual streams in another basis. Alignment undoes that
freedom with the family's own elements, so the aligned model computes exactly what it did
(a gauge transformation) while its parameters come as close as the family allows to the
reference's. Git re-basin (Ainsworth et al., ICLR 2023) aligns ReLU MLPs by weight matching
and finds near-zero loss barriers on the straight line between them; `gj.align` runs the
family's `match` (one round of coordinate descent) until the distance stops falling.

Families with `match`: `UnitPermutationGauge` (weight matching of hidden units),
`BlockAttentionGauge` (query-key and value-output least squares per key-value group) and
`DecoderGauge` (a decoder's residual rotation by orthogonal Procrustes, norm gains, every
block's attention and SwiGLU unit scales; with `permutations=True` also every block's heads and
hidden units, by linear assignment).
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from ..gauges.base import AbstractGauge
from ..gauges.permutation import UnitPermutationGauge


@dataclasses.dataclass(frozen=True)
class AlignResult:
    """What `gj.align` found.

    **Fields:** `element` (the family's element), `model` (`gauge.act(element, model)`: the
    aligned model), `history` (the squared parameter distance to the reference before the
    first round and after each round), `gauge` (the family aligned along).
    """

    element: PyTree
    model: Any
    history: tuple[float, ...]
    gauge: AbstractGauge


def parameter_distance(a: Any, b: Any) -> float:
    """`sum |a - b|^2` over the inexact arrays of two models of one structure (host float)."""
    la, lb = (jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array)) for m in (a, b))
    pairs = zip(la, lb, strict=True)
    return float(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2) for x, y in pairs))


def _check_same_shapes(reference: Any, model: Any) -> None:
    ref, mod = (
        jax.tree_util.tree_flatten_with_path(eqx.filter(m, eqx.is_inexact_array))[0]
        for m in (reference, model)
    )
    ref_paths, mod_paths = ([jax.tree_util.keystr(p) for p, _ in leaves] for leaves in (ref, mod))
    if ref_paths != mod_paths:
        raise ValueError(
            f"`model` must have the structure of `reference` to be aligned to it (parameters "
            f"{ref_paths[:4]}...); received a {type(model).__name__} with parameters "
            f"{mod_paths[:4]}..."
        )
    for (path, x), (_, y) in zip(ref, mod, strict=True):
        if np.shape(x) != np.shape(y):
            raise ValueError(
                f"`model{jax.tree_util.keystr(path)}` must have the reference's shape "
                f"{np.shape(x)} to be aligned; received shape {np.shape(y)}."
            )


def align(
    reference: Any,
    model: Any,
    gauge: AbstractGauge | None = None,
    *,
    max_rounds: int = 100,
) -> AlignResult:
    """The element of `gauge` that brings `model` closest to `reference`, with the function
    of `model` unchanged: rounds of `gauge.match` from the identity until a round no longer
    lowers the squared parameter distance (or `max_rounds`).

    **Arguments:**

    - `reference`, `model`: two models of the same structure and shapes (e.g. two seeds).
    - `gauge`: the family to align along (one with `match`: `UnitPermutationGauge`,
      `BlockAttentionGauge`, `DecoderGauge`); None: `UnitPermutationGauge.from_model(model)`
      (an `eqx.nn.MLP` or a `BlockMLP`: weight matching of the hidden units).
    - `max_rounds`: at most this many rounds.

    **Returns:** an `AlignResult` (`.element`, `.model`, `.history`).

    **Raises:** `ValueError` for models of different structures or shapes (naming the first
    parameter that differs) or `max_rounds` < 1; `TypeError` for a model the family does not
    act on; `NotImplementedError` for a family without `match`.
    """
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"`max_rounds` must be an int >= 1; received {max_rounds!r}.")
    _check_same_shapes(reference, model)
    if gauge is None:
        gauge = UnitPermutationGauge.from_model(model)
    gauge.check_model(reference)
    gauge.check_model(model)
    g = gauge.identity()
    history = [parameter_distance(reference, model)]
    for _ in range(max_rounds):
        candidate = gauge.match(reference, model, g)
        distance = parameter_distance(reference, gauge.act(candidate, model))
        if not distance < history[-1]:
            break
        g = candidate
        history.append(distance)
    return AlignResult(element=g, model=gauge.act(g, model), history=tuple(history), gauge=gauge)
