"""The gauge-family contract: what a family acts on, and its group operations.

Every family is an `AbstractGauge`. Concrete families are final (never subclassed); the two
abstract refinements below fix how the infinitesimal generator (`tangent`) is computed:

- `AbstractParameterGauge`: the family moves the model's parameters; `tangent` is the jvp of
  `act` at the identity, a PyTree shaped like the model's inexact arrays.
- field families (`gaugejax.gauges.maps.AbstractFieldGauge`): the family acts on the vector
  field of a neural ODE; `tangent` is the model with its field replaced by the field tangent.

Either way `tangent(model, direction)` returns one kind of object: the model's tangent, a
PyTree with the structure of the model.
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from .._core._types import SpacetimeGenerator


def model_error(family: Any, expected: str, model: Any, how: str = "") -> TypeError:
    """The `TypeError` a family raises for a model it does not act on: it names the family, the
    kind of model expected, what was received, and (`how`) how to adapt the model."""
    name = family if isinstance(family, str) else type(family).__name__
    message = f"{name} acts on {expected}; received {type(model).__name__}."
    return TypeError(f"{message} {how}".rstrip())


def cast_element(g: PyTree, dtype) -> PyTree:
    """The element `g` with its floating leaves in `dtype` (a model's): families sample in the
    default float dtype, and a float32 model must be moved by float32 arrays (strict dtype
    promotion refuses the mix; standard promotion would silently compute in float64)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, g
    )


class AbstractGauge(eqx.Module):
    """A family of gauge transformations acting on a model.

    Group elements `g` are PyTrees (so they vmap); boundary conditions hold by construction.
    Convention: `act(compose(g1, g2), m) == act(g2, act(g1, m))` (g1 first, then g2).

    **Contract** (checked for every family by `tests/test_contract.py`):

    - `check_model(model)` raises before anything is traced or compiled: `TypeError` for a
      model of the wrong kind (naming the family, the expected kind, what was received and how
      to adapt it), `ValueError` for the right kind with the wrong sizes or time interval.
      `act` calls it; `sweep` calls it before evaluating anything.
    - `sample(key)` works under `jit` and `vmap`; `identity()` acts trivially; `inverse` and
      `compose` follow the convention above.
    - `tangent(model, direction)`: the infinitesimal generator along `direction` (an element
      of the family's Lie algebra, e.g. `sample(key) - identity()`), shaped like the model.
    - `control()`: a family of the same shape whose elements *break* the symmetry (e.g. a
      boundary-free version), or None; sweeps use it as the negative control of a verdict.

    Class variable `infinitesimal`: True for families defined to first order only (a sweep
    then checks the first-order response of the observable, not a finite deviation).
    Class variable `rescales_parameters`: True for families whose elements can change the size
    of the model's parameters (a sweep then reports each lane's growth `|moved| / |model|`);
    the abstract refinements below set it (field families wrap the field, permutations keep
    every norm).
    """

    infinitesimal: eqx.AbstractClassVar[bool]
    rescales_parameters: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def check_model(self, model: Any) -> None:
        """Raise `TypeError`/`ValueError` unless this family acts on `model` (see the class)."""

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

    @abc.abstractmethod
    def tangent(self, model: Any, direction: PyTree) -> Any:
        """The model's tangent along `direction` at the identity (shaped like the model)."""

    @abc.abstractmethod
    def control(self) -> "AbstractGauge | None":
        """A symmetry-breaking family of the same shape (the negative control), or None."""

    def first_order_generator(self, direction: PyTree) -> SpacetimeGenerator | None:
        """The spacetime generator of the family's first-order action along `direction`, or
        None.

        A family whose elements near the identity move a neural ODE's vector field as a
        spacetime diffeomorphism returns the generator `eps(t, y) -> (eps0, eps_y)` with
        `act(identity() + a direction, model).field = deform(model.field, eps, a) + O(a^2)`
        for every model it acts on (the first-order term of Eq. 9: x = y + a eps_y, t = s + a
        eps0). A first-order sweep (and `gauge_response`) then solves the forward sensitivity
        system with one jvp of the field and one of eps per evaluation
        (`gj.DeformationSensitivityField`), not a jvp of the transformed field. None (the
        default, e.g. for families that move parameters): the response is the jvp of `act`.

        **Arguments:** `direction`: a tangent at the identity, shaped like `identity()` (e.g.
        `sample(key)` for a family whose identity is zero).

        **Returns:** a callable `(t, y) -> (eps0, eps_y)` (a Module, so it vmaps), or None.
        """
        del direction
        return None

    def match(self, reference: Any, model: Any, g: PyTree) -> PyTree:
        """One round of alignment (`gj.align`): an element `g'` such that `act(g', model)` is at
        least as close to `reference` (squared distance of the parameters) as `act(g, model)`,
        e.g. one sweep of coordinate descent over the family's factors. Families that can be
        aligned override it; the default refuses.

        **Arguments:** `reference`, `model`: two models of the same structure and shapes
        (checked by `gj.align`); `g`: the current element.

        **Returns:** the next element.

        **Raises:** `NotImplementedError` naming the family.
        """
        del reference, model, g
        raise NotImplementedError(
            f"{type(self).__name__} has no alignment (`match`); families that have one: "
            f"{', '.join(MATCH_FAMILIES)}."
        )

    def canonical_element(self, model: Any) -> PyTree:
        """The element taking `model` to the canonical representative of its orbit
        (`gj.canonicalize`): a function of `model` such that `act(canonical_element(m'), m')`
        is the same model for every `m'` on the orbit of `model` (up to rounding, and up to
        the directions the family documents as unfixed). Families with a canonical form
        override it; the default refuses.

        **Arguments:** `model`: a model the family acts on.

        **Returns:** an element of the family.

        **Raises:** `NotImplementedError` naming the family.
        """
        del model
        raise NotImplementedError(
            f"{type(self).__name__} has no canonical form (`canonical_element`); families that "
            f"have one: {', '.join(CANONICAL_FAMILIES)}."
        )

    def parameter_scale(self, g: PyTree, model: Any) -> PyTree | None:
        """How `g` acts on per-parameter statistics: the factors `s` of an action that scales
        every parameter elementwise, `act(g, model) = s * model`, or None (the default) for a
        family whose action mixes parameters (a rotation, a permutation of units).

        Under such an action gradients transform as `grad' = grad / s`, so optimiser state
        that is a per-parameter statistic of gradients can be carried through `g`: a first
        moment as `m / s`, a diagonal second moment as `v / s^2` (`gj.transport_adam_state`).
        A mixing action maps a diagonal second moment to a non-diagonal one: no diagonal
        state can follow it.

        **Arguments:** `g`: an element of the family; `model`: a model the family acts on.

        **Returns:** a PyTree shaped like `eqx.filter(model, eqx.is_inexact_array)` (`s` of
        every inexact array, 1 where the family does not act), or None.
        """
        del g, model
        return None


# the families that override `match` (named in its refusal above)
MATCH_FAMILIES = ("UnitPermutationGauge", "BlockAttentionGauge", "DecoderGauge")

# the families that override `canonical_element` (named in the refusal above)
CANONICAL_FAMILIES = (
    "RescalingGauge",
    "UnitPermutationGauge",
    "HeadPermutationGauge",
    "BlockAttentionGauge",
    "DecoderGauge",
)


class AbstractParameterGauge(AbstractGauge):
    """A family that moves a model's parameters. `tangent` is `d/da act(identity + a v)` at
    a = 0 by `eqx.filter_jvp`: the parameter tangent, with zeros where the family does not act.
    """

    rescales_parameters = True

    def tangent(self, model: Any, direction: PyTree) -> Any:
        """The parameter tangent along `direction` (an element of the Lie algebra).

        **Arguments:**

        - `model`: a model the family acts on.
        - `direction`: a PyTree shaped like `identity()`: the step `identity() + a direction`
          is differentiated at a = 0.

        **Returns:** a PyTree with the model's structure: the tangent of every inexact array
        (zeros where the family does not act), None for every other leaf. An element's
        integer leaves (a finite factor, e.g. a permutation) have no directions: they stay at
        the identity.

        **Raises:** as `check_model`.
        """
        self.check_model(model)
        base = self.identity()

        def step(e, v, a):  # an integer leaf (a permutation) has no direction
            return e + a * v if jnp.issubdtype(jnp.result_type(e), jnp.inexact) else e

        def moved(a):
            g = jax.tree.map(lambda e, v: step(e, v, a), base, direction)
            return eqx.filter(self.act(g, model), eqx.is_inexact_array)

        zero = jnp.zeros((), dtype=jax.tree.leaves(base)[0].dtype)
        _, out = jax.jvp(moved, (zero,), (jnp.ones_like(zero),))
        return out


def well_conditioned(key, shape, log_cond: float):
    """Random matrices `U diag(s) V^T` with singular values in [cond^-1/2, cond^1/2]."""
    ku, kv, ks = jax.random.split(key, 3)
    U = jnp.linalg.qr(jax.random.normal(ku, shape))[0]
    V = jnp.linalg.qr(jax.random.normal(kv, shape))[0]
    s = jnp.exp(jax.random.uniform(ks, shape[:-1], minval=-0.5, maxval=0.5) * log_cond)
    return jnp.einsum("...ij,...j,...kj->...ik", U, s, V)


def best_scale(a, b, c, e) -> np.ndarray:
    """Per entry, the scale `s > 0` that brings a weight `u` scaled by `s` and a weight `w`
    divided by it closest to the reference's `u_ref`, `w_ref` (alignment's unit scalings):
    `|s u - u_ref|^2 + |w / s - w_ref|^2 = a s^2 - 2 b s + c / s^2 - 2 e / s + const`. The
    exact minimiser over `s > 0`: of the positive real roots of the derivative's quartic
    `a s^4 - b s^3 + e s - c` and `s = 1` (the current value), the one of least cost.

    **Arguments:** `a = |u|^2`, `b = <u, u_ref>`, `c = |w|^2`, `e = <w, w_ref>`: (n,) host
    arrays, one entry per scale.

    **Returns:** the (n,) scales, a float64 numpy array.
    """
    out = np.ones(np.shape(a))
    for j, coefficients in enumerate(zip(a, b, c, e, strict=True)):
        aj, bj, cj, ej = coefficients
        roots = np.roots([aj, -bj, 0.0, ej, -cj]) if aj or cj else np.ones(0)
        roots = roots[np.isreal(roots)].real
        candidates = np.concatenate([[1.0], roots[roots > 0]])
        cost = aj * candidates**2 - 2 * bj * candidates + cj / candidates**2
        cost = cost - 2 * ej / candidates
        out[j] = candidates[np.argmin(cost)]
    return out
