"""The abstract gauge family: sample, act, identity, inverse, compose, tangent."""

import abc
from typing import Any

import equinox as eqx
from jaxtyping import PRNGKeyArray, PyTree


class AbstractGauge(eqx.Module):
    """A family of gauge transformations acting on a model.

    Group elements `g` are PyTrees (so they vmap); boundary conditions hold by construction.
    Convention: `act(compose(g1, g2), m) == act(g2, act(g1, m))` (g1 first, then g2).

    Subclasses set `infinitesimal`: True for families defined to first order only (the sweep
    then checks the first-order response of the observable, not a finite deviation).
    """

    infinitesimal: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray) -> PyTree:
        """A random group element."""

    @abc.abstractmethod
    def act(self, g: PyTree, model: Any) -> Any:
        """The transformed model (same function, other parameters)."""

    @abc.abstractmethod
    def identity(self) -> PyTree:
        """The identity element, with the structure of `sample`'s output."""

    @abc.abstractmethod
    def inverse(self, g: PyTree) -> PyTree:
        """The inverse element."""

    @abc.abstractmethod
    def compose(self, g1: PyTree, g2: PyTree) -> PyTree:
        """The element acting as `g1` then `g2`."""

    def tangent(self, model: Any, direction: PyTree) -> Any:
        """The infinitesimal generator: `d/da act(a * direction, model)` at the identity, by jvp.

        Returns a tangent with the structure of `act`'s output (a parameter PyTree). Families
        acting on neural-ODE fields return the field tangent instead (see `AbstractFieldGauge`).
        """
        # filter_jvp: models may hold non-array leaves (e.g. eqx.nn.MLP's activation function)
        return eqx.filter_jvp(lambda g: self.act(g, model), (self.identity(),), (direction,))[1]
