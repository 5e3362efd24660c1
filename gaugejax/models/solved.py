"""What a sweep asks a model about its solves, answered by the model itself.

A model whose outputs come from ODE solves is an `AbstractSolvedModel`: it says what its
observable is (with the solver's statistics), how that observable changes to first order along
a path of models, how it is solved inside a sweep, how it is solved much more accurately (the
solver floor's re-solve) and what accuracy it asks for. The functions below put the same
questions to any model: a model without solves of its own (an `eqx.nn.MLP`, a user's module)
answers them as a plain function does. They are the one place that tells the two apart, so the
sweep engine never looks at model classes.
"""

import abc
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree

from .._core._types import SpacetimeGenerator
from .._core.solve import SolveStats


Observation = tuple[PyTree, SolveStats | None]


class AbstractSolvedModel(eqx.Module):
    """A model whose outputs come from ODE solves, and which owns what a sweep asks about them.

    Concrete subclasses are final. `AbstractNeuralODE` implements the methods once from its
    `SolveOptions`; `AttentionNODE` from its one tolerance. Engines call these methods (through
    the functions of this module, which also answer for models without solves) and never
    look at the model's class.
    """

    @abc.abstractmethod
    def observe(self, inputs: PyTree) -> Observation:
        """`(outputs, stats)` on a batch of inputs (leading axis); stats may be None.

        **Arguments:** `inputs`: a batch of inputs with a leading axis.

        **Returns:** the outputs (leading axis) and the per-input `SolveStats`, or None for a
        model that does not report them.
        """

    @abc.abstractmethod
    def observe_tangent(
        self,
        moved: Callable[[PyTree], Any],
        p: PyTree,
        dp: PyTree,
        inputs: PyTree,
        generator: SpacetimeGenerator | None = None,
    ) -> Observation:
        """`(d/da observe(moved(p + a dp)) at a = 0, stats)`: the first-order change of the
        outputs along a path of models, `moved(p)` being this model (e.g. `p` a gauge's
        identity, `moved(a) = gauge.act(a, model)`).

        **Arguments:** `moved`: parameters to a model; `p`: where the path passes through this
        model; `dp`: the direction; `inputs`: a batch of inputs (leading axis); `generator`:
        None, or a spacetime generator eps saying that the path moves this model's vector
        field as `deform(field, eps, a)` to first order (a gauge's `first_order_generator`):
        a model with such a field may solve that cheaper system, any other ignores it.

        **Returns:** the tangent of the outputs (leading axis) and the stats of the solves
        that computed it (or None).
        """

    @abc.abstractmethod
    def for_sweep(self, dtype: Any, *, differentiated: bool) -> "AbstractSolvedModel":
        """The copy a sweep vmaps: solver failures reported per lane, not raised, and the
        tolerances traced (so `tightened` copies share its compiled programs).

        **Arguments:** `dtype`: the inputs' floating dtype; `differentiated`: whether the sweep
        takes a jvp through `observe` (a custom observable in first-order mode).

        **Raises:** `ValueError` for tolerances no solve in `dtype` can meet.
        """

    @abc.abstractmethod
    def tightened(self, dtype: Any) -> tuple["AbstractSolvedModel | None", str]:
        """The same model solved much more accurately, with the same structure (the re-solve
        that measures the solver's own error), and how it was tightened; or `(None, why not)`.

        **Arguments:** `dtype`: the floating dtype of the solves (bounds the tolerances).
        """

    @abc.abstractmethod
    def requested_accuracy(self, scale: float) -> float:
        """The relative accuracy the model asks of its solver for outputs of size `scale`
        (0.0 where it asks for a step, not an accuracy).

        **Arguments:** `scale`: the size of the outputs (`max |reference|`, > 0).
        """

    @abc.abstractmethod
    def expected_shrink(self) -> float:
        """How much solver error shrinks from this model's solves to its `tightened` ones:
        `inf` under error control (the tight solve's requested accuracy bounds it), the
        truncation ratio (e.g. `8 ** order`) for a fixed step."""


def tangent_by_jvp(
    observe: Callable[[Any, PyTree], Observation],
    moved: Callable[[PyTree], Any],
    p: PyTree,
    dp: PyTree,
    inputs: PyTree,
) -> Observation:
    """`observe_tangent` as a jvp through `observe(moved(a), inputs)`: differentiates the
    outputs only (the stats are auxiliary)."""
    _, tangent, stats = jax.jvp(lambda a: observe(moved(a), inputs), (p,), (dp,), has_aux=True)
    return tangent, stats


def _solved(model: Any) -> bool:
    return isinstance(model, AbstractSolvedModel)


def observe(model: Any, inputs: PyTree) -> Observation:
    """`model.observe(inputs)`; for a model without solves `(vmap(model)(inputs), None)`, a
    tuple of arrays passed as positional arguments (e.g. `(query, key, value)`)."""
    if _solved(model):
        return model.observe(inputs)
    if isinstance(inputs, tuple):
        return jax.vmap(model)(*inputs), None
    return jax.vmap(model)(inputs), None


def observe_tangent(
    model: Any,
    moved: Callable[[PyTree], Any],
    p: PyTree,
    dp: PyTree,
    inputs: PyTree,
    generator: SpacetimeGenerator | None = None,
) -> Observation:
    """`model.observe_tangent(...)`; for a model without solves a jvp through `observe` (it has
    no vector field for a `generator` to deform)."""
    if _solved(model):
        if generator is None:  # a model written before `generator` existed still answers
            return model.observe_tangent(moved, p, dp, inputs)
        return model.observe_tangent(moved, p, dp, inputs, generator)
    return tangent_by_jvp(observe, moved, p, dp, inputs)


def for_sweep(model: Any, dtype: Any, *, differentiated: bool) -> Any:
    """`model.for_sweep(...)`; a model without solves is swept as it is."""
    return model.for_sweep(dtype, differentiated=differentiated) if _solved(model) else model


def tightened(model: Any, dtype: Any) -> tuple[Any, str]:
    """`model.tightened(dtype)`; `(None, "no solver")` for a model without solves."""
    return model.tightened(dtype) if _solved(model) else (None, "no solver")


def expected_shrink(model: Any) -> float:
    """`model.expected_shrink()`; `inf` for a model without solves (it has no re-solve)."""
    return model.expected_shrink() if _solved(model) else math.inf


def requested_accuracy(model: Any, scale: float) -> float:
    """`model.requested_accuracy(scale)`; 0.0 for a model without solves."""
    return model.requested_accuracy(scale) if _solved(model) else 0.0
