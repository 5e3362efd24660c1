"""Finite near-identity maps and the group algebra of the finite neural-ODE gauge families.

A base element realises a map `z -> z + h(*lead, z)` with `Lip_z(h) <= rho < 1`; such a map is a
bi-Lipschitz bijection (Banach fixed point), its inverse is the limit of the contraction
`z <- w - h(*lead, z)`, and its Jacobian `I + Dh` has singular values >= 1 - rho > 0.
Compositions are kept symbolic (`Compose`), and inverses are pushed down to base elements
(`Inverse`) so that the fixed-point iteration always runs on a contraction.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._core._types import VectorField
from .._core.options import state_dtype
from ..models import AbstractNeuralODE
from .base import AbstractGauge, model_error


class Compose(eqx.Module):
    """The element acting as `first`, then `then`."""

    first: PyTree
    then: PyTree


class Inverse(eqx.Module):
    """The inverse of a base element."""

    of: PyTree


def invert_word(g: PyTree) -> PyTree:
    """The inverse of an element written as a word of base elements (`Compose`, `Inverse`):
    `(a then b)^-1 = b^-1 then a^-1`, with inverses pushed down to the base elements."""
    if isinstance(g, Compose):
        return Compose(invert_word(g.then), invert_word(g.first))
    if isinstance(g, Inverse):
        return g.of
    return Inverse(g)


class ComposedMap(eqx.Module):
    """`(*lead, z) -> outer(*lead, inner(*lead, z))`."""

    outer: Callable
    inner: Callable

    def __call__(self, *args):
        *lead, z = args
        return self.outer(*lead, self.inner(*lead, z))


class InverseMap(eqx.Module):
    """Inverse in the last argument of `z -> z + h(*lead, z)`, `Lip(h) < 1`, by fixed point.

    The error after k iterations is at most `rho^k |h|/(1 - rho)`; `num_iterations = 64` gives
    below 1e-16 relative for `rho <= 0.5`. Differentiable by jvp through the unrolled loop.
    """

    forward: Callable
    num_iterations: int = eqx.field(static=True, default=64)

    def __call__(self, *args):
        *lead, w = args

        def step(_, z):
            return jax.tree.map(lambda w_, z_, f_: w_ - (f_ - z_), w, z, self.forward(*lead, z))

        return jax.lax.fori_loop(0, self.num_iterations, step, w)


class AbstractFieldGauge(AbstractGauge):
    """A family acting on the vector field of a neural ODE on `[0, t1]`.

    `acts_on` (class variable) is the kind of neural ODE the family needs (`AbstractNeuralODE`
    or `LinearNODE`); `t1` the final time the family's boundary conditions refer to, which must
    be the model's (a gauge that vanishes at another time is no symmetry of this model, and a
    boundary-free one may look like one). `tangent` is the model with its field replaced by the
    field tangent `d/da act(identity + a v).field` at a = 0 (a `FieldTangent`).
    """

    t1: eqx.AbstractVar[float]
    acts_on: eqx.AbstractClassVar[type]
    rescales_parameters = False  # the field is wrapped: no parameter moves

    def check_model(self, model: Any) -> None:
        """Raise `TypeError` unless `model` is a neural ODE of kind `acts_on` whose `t0` and `t1`
        are Python numbers, `ValueError` unless it integrates over `[0, t1]` of this family,
        observes at the family's `observation_times` (a trajectory family) and, for a family
        with a state dimension (`features` of `dim` columns, or `dim`), its field
        maps states of that dimension to themselves."""
        if not isinstance(model, self.acts_on):
            if self.acts_on is AbstractNeuralODE:
                expected = "a gaugejax neural ODE (gaugejax.NeuralODE or LinearNODE)"
                how = (
                    "Wrap your vector field and solve options in one line: "
                    "gj.NeuralODE(field, t1=..., solver=..., stepsize_controller=..., "
                    "adjoint=...), where field(t, y, args) -> dy/dt (e.g. the `func` of a "
                    "diffrax-style model)."
                )
            else:
                expected = f"a gaugejax.{self.acts_on.__name__}"
                how = (
                    "Build one with gj.LinearNODE(field, t1=...) from an AbstractLinearField "
                    "(e.g. gj.BasisLinearField or gj.FunctionLinearField(w, b))."
                )
            raise model_error(self, expected, model, how)
        for name in ("t0", "t1"):
            value = getattr(model, name)
            if not isinstance(value, int | float):  # an array would be traced in a sweep
                raise TypeError(
                    f"{type(self).__name__} needs the model's `{name}` as a Python float (the "
                    "interval is static: the family's boundary conditions are checked against "
                    f"it); received {value!r}. Build the model with {name}=float({name})."
                )
        t0, t1 = float(model.t0), float(model.t1)
        if t0 != 0.0 or abs(t1 - float(self.t1)) > 1e-12 * max(1.0, abs(t1)):
            raise ValueError(
                f"{type(self).__name__} is defined on [0, {float(self.t1)}] (its boundary "
                f"conditions hold at t = 0 and t = t1 = {float(self.t1)}); the model integrates "
                f"over [{t0}, {t1}]. Build the gauge with t1={t1} (models must start at t0 = 0)."
            )
        times = getattr(self, "observation_times", None)  # a trajectory family's times
        if times is not None and model.observation_times != times:
            # elements that are the identity at other times are no symmetry of this model's
            # observable, and its control would keep x(T) alike
            raise ValueError(
                f"{type(self).__name__} is the identity at the observation times {times} (it "
                "keeps the trajectory saved there); the model observes "
                f"{model.observation_times or 'x(t1) only'}. Build the model with "
                f"observation_times={times} (or the gauge with the model's)."
            )
        features = getattr(self, "features", None)
        dim = features.U.shape[1] if hasattr(features, "U") else getattr(self, "dim", None)
        if isinstance(dim, int) and _maps_states(model, dim) is not True:
            found = [d for d in range(1, 257) if d != dim and _maps_states(model, d) is True]
            state = f"states of dimension {found[0]}" if len(found) == 1 else "other states"
            raise ValueError(
                f"{type(self).__name__} has `dim` = {dim} (it moves states of dimension {dim}); "
                f"the model's field takes {state} ({_maps_states(model, dim)}). Build the "
                "gauge with the model's state dimension."
            )

    def tangent(self, model: Any, direction: PyTree) -> AbstractNeuralODE:
        """The model with its field replaced by the field tangent along `direction`.

        **Arguments:** `model` (a neural ODE the family acts on); `direction` (shaped like
        `identity()`; e.g. `sample(key)` for a vector-space family).

        **Returns:** a neural ODE whose field is the `FieldTangent`
        `(t, y, args) -> d/da act(identity + a direction).field(t, y, args)` at a = 0.

        **Raises:** as `check_model`.
        """
        self.check_model(model)
        return model.with_field(FieldTangent(self, model, direction))


class AbstractMapGauge(AbstractFieldGauge):
    """A finite field family of near-identity maps (exact pullbacks of the field).

    Concrete families define `base_map(params)` (the map of a base element), `pull(field, map)`
    (the field transformation), `compose_maps`/`invert_map` (closed forms where they exist,
    else `ComposedMap`/`InverseMap`), and `sample`/`identity` for base elements.
    """

    infinitesimal = False

    @abc.abstractmethod
    def base_map(self, params: PyTree) -> Callable:
        """The near-identity map of a base element."""

    @abc.abstractmethod
    def pull(self, field: VectorField, map_: Callable) -> VectorField:
        """The field transformed by `map_`."""

    @abc.abstractmethod
    def compose_maps(self, outer: Callable, inner: Callable) -> Callable:
        """The map `outer o inner`."""

    @abc.abstractmethod
    def invert_map(self, map_: Callable) -> Callable:
        """The inverse of a base element's map."""

    def to_map(self, g: PyTree) -> Callable:
        """The map realised by any element (base, `Compose` or `Inverse`)."""
        if isinstance(g, Compose):
            # acting by `first` then `then` pulls back by map(first) o map(then)
            return self.compose_maps(self.to_map(g.first), self.to_map(g.then))
        if isinstance(g, Inverse):
            return self.invert_map(self.base_map(g.of))
        return self.base_map(g)

    def act(self, g: PyTree, model: Any) -> AbstractNeuralODE:
        self.check_model(model)
        return model.with_field(self.pull(model.field, self.to_map(g)))

    def inverse(self, g: PyTree) -> PyTree:
        return invert_word(g)

    def compose(self, g1: PyTree, g2: PyTree) -> PyTree:
        return Compose(g1, g2)


def _maps_states(model: Any, dim: int) -> bool | str:
    """True when `model.field` maps a state of shape `(dim,)` to one of that shape (traced
    only: `jax.eval_shape`), else what it does instead."""
    y = jax.ShapeDtypeStruct((dim,), state_dtype(model.field))
    t = jax.ShapeDtypeStruct((), y.dtype)  # an array, as diffrax passes it (`t[None]` works)
    try:
        out = jax.eval_shape(lambda t, y: model.field(t, y, model.args), t, y)
    except Exception as e:  # noqa: BLE001 - any failure means: not a state of this size
        return f"on a state of shape ({dim},): {type(e).__name__}: {str(e).splitlines()[0]}"
    shapes = [tuple(x.shape) for x in jax.tree.leaves(out)]
    return True if shapes == [(dim,)] else f"a state of shape ({dim},) gives shapes {shapes}"


class FieldTangent(eqx.Module):
    """`(t, y, args) -> d/da [gauge.act(identity + a * direction, model)].field(t, y, args)` at
    a = 0, by jvp."""

    gauge: Any
    model: Any
    direction: PyTree

    def __call__(self, t, y, args=None):
        base = self.gauge.identity()

        def f(a):
            g = jax.tree.map(lambda e, v: e + a * v, base, self.direction)
            return self.gauge.act(g, self.model).field(t, y, args)

        zero = jnp.zeros((), dtype=jnp.result_type(*jax.tree.leaves(base)))
        return jax.jvp(f, (zero,), (jnp.ones_like(zero),))[1]


def lipschitz_normalise(raw: jax.Array, lipschitz: jax.Array, target: jax.Array) -> jax.Array:
    """Rescale `raw` so that the Lipschitz bound `lipschitz` (of `raw`) becomes `target`."""
    return raw * (target / jnp.maximum(lipschitz, jnp.finfo(raw.dtype).tiny))
