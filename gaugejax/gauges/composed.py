"""The composition of two finite field families: `ComposedGauge(first, then)` acts by an element
of `first`, then by one of `then` (e.g. a spatial diffeomorphism, then a time reparametrisation).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray, PyTree

from ..models import AbstractNeuralODE
from .base import AbstractGauge
from .maps import AbstractFieldGauge, Compose, Inverse, invert_word


class ComposedElement(eqx.Module):
    """A base element of a `ComposedGauge`: `first` (an element of the first family), then
    `then` (an element of the second)."""

    first: PyTree
    then: PyTree


class SummedGenerator(eqx.Module):
    """`(t, y) -> first(t, y) + then(t, y)`: the generator of two first-order actions one after
    the other (the deformation of Eq. 9 is linear in the generator)."""

    first: Callable
    then: Callable

    def __call__(self, t, y):
        (a0, ay), (b0, by) = self.first(t, y), self.then(t, y)
        return a0 + b0, jax.tree.map(jnp.add, ay, by)


class ComposedGauge(AbstractFieldGauge):
    """The family of compositions `g = (a, b)`: act by `a` of `first`, then by `b` of `then`.

    Both families must be finite `AbstractFieldGauge`s acting on any `AbstractNeuralODE` over
    the same `[0, t1]`; each keeps the function (with its boundary conditions), so their
    composition does. Base elements are `ComposedElement`s; products and inverses are words
    (`gaugejax.gauges.Compose`, `gaugejax.gauges.Inverse`), as for the map families: the
    inverse of `(a, b)` acts by `then.inverse(b)` first and `first.inverse(a)` after it.

    `control()` composes the two families' controls (a family without one enters as itself):
    boundary-free elements that change the output.

    **Arguments:** `first`, `then` (the two families).

    **Raises:** `TypeError` unless both are finite field families acting on any neural ODE
    (`acts_on` is `AbstractNeuralODE`); `ValueError` unless both are defined on the same
    `[0, t1]`.
    """

    first: AbstractFieldGauge
    then: AbstractFieldGauge
    t1: float
    infinitesimal = False
    acts_on = AbstractNeuralODE

    def __init__(self, first: AbstractGauge, then: AbstractGauge):
        for name, family in (("first", first), ("then", then)):
            if not isinstance(family, AbstractFieldGauge):
                raise TypeError(
                    f"`{name}` must be a field gauge family (an AbstractFieldGauge such as "
                    f"SpatialDiffeoGauge or TimeReparamGauge); received {type(family).__name__}."
                )
            if family.infinitesimal:
                raise TypeError(
                    f"`{name}` must be a finite family; received {type(family).__name__}, "
                    "which is defined to first order only (its elements do not compose as maps)."
                )
            if family.acts_on is not AbstractNeuralODE:
                raise TypeError(
                    f"`{name}` must act on any neural ODE (acts_on AbstractNeuralODE), so that "
                    f"it accepts the other family's transformed model; received "
                    f"{type(family).__name__}, which acts on {family.acts_on.__name__} only."
                )
        if abs(float(first.t1) - float(then.t1)) > 1e-12 * max(1.0, abs(float(first.t1))):
            raise ValueError(
                f"`first` and `then` must be defined on the same [0, t1]; received t1 = "
                f"{float(first.t1)} ({type(first).__name__}) and t1 = {float(then.t1)} "
                f"({type(then).__name__})."
            )
        self.first = first
        self.then = then
        self.t1 = float(first.t1)

    def sample(self, key: PRNGKeyArray) -> ComposedElement:
        ka, kb = jax.random.split(key)
        return ComposedElement(self.first.sample(ka), self.then.sample(kb))

    def identity(self) -> ComposedElement:
        return ComposedElement(self.first.identity(), self.then.identity())

    def act(self, g: PyTree, model: Any) -> AbstractNeuralODE:
        self.check_model(model)
        if isinstance(g, Compose):
            return self.act(g.then, self.act(g.first, model))
        if isinstance(g, Inverse):
            a, b = g.of.first, g.of.then
            undone = self.then.act(self.then.inverse(b), model)
            return self.first.act(self.first.inverse(a), undone)
        return self.then.act(g.then, self.first.act(g.first, model))

    def first_order_generator(self, direction: ComposedElement) -> SummedGenerator | None:
        """The sum of the two families' generators (both first-order actions add), or None when
        either family has none."""
        first = self.first.first_order_generator(direction.first)
        then = self.then.first_order_generator(direction.then)
        if first is None or then is None:
            return None
        return SummedGenerator(first, then)

    def inverse(self, g: PyTree) -> PyTree:
        return invert_word(g)

    def compose(self, g1: PyTree, g2: PyTree) -> Compose:
        return Compose(g1, g2)

    def control(self) -> "ComposedGauge | None":
        """The composition of the families' controls (boundary-free: the output changes), a
        family without a control entering as itself; None when neither has one."""
        first, then = self.first.control(), self.then.control()
        if first is None and then is None:
            return None
        return ComposedGauge(
            self.first if first is None else first, self.then if then is None else then
        )
