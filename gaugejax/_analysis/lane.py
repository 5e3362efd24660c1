"""One lane of a sweep: the static plan of a sweep program, the function of one gauge sample
that the engine vmaps, and its metrics.

Everything static about a sweep (the model's and gauge's non-array parts, mode, observable,
chunk, mesh, precision) is one hashable `Plan`, the key of the jit and executable caches;
arrays travel as arguments. The lane asks the model for its observable and its first-order
response (`gaugejax.models.solved`), never looking at its class.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._core._checks import is_traced, reported_checks
from .._core.solve import NOT_COUNTED, SolveStats, SolveStatus, status_code
from ..models.solved import observe, observe_tangent


def default_observable(model: Any, inputs: PyTree) -> tuple[PyTree, SolveStats | None]:
    """`(outputs, stats)` of `model` on a batch of inputs (leading axis): the model's own
    `observe` (`vmap(model.solve)` with the solver's stats for a neural ODE), `vmap(model)`
    with no stats for a model without solves; a tuple of arrays is passed as positional
    arguments (e.g. `(query, key, value)` of `eqx.nn.MultiheadAttention`)."""
    return observe(model, inputs)


def flat(tree: PyTree) -> Array:
    """Every leaf of `tree`, raveled and concatenated."""
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def host_flat(tree: PyTree) -> np.ndarray:
    """`flat(tree)` on the host, in numpy: no program compiled for it."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def finite(tree: PyTree) -> Array:
    """Whether every entry of every leaf of `tree` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def in_dtype(tree: PyTree, dtype) -> PyTree:
    """`tree` with its floating arrays cast to `dtype` (other leaves unchanged): a sweep runs in
    its inputs' dtype, whatever dtype a gauge's arrays or samples were made in (e.g. float64
    under `jax_enable_x64` for a float32 model)."""

    def cast(x):
        if not eqx.is_inexact_array(x) or x.dtype == dtype:
            return x
        if is_traced(x):
            return x.astype(dtype)
        return jnp.asarray(np.asarray(x).astype(dtype))  # on the host: nothing compiled

    return jax.tree.map(cast, tree)


def param_size(tree: PyTree) -> Array:
    """The largest |entry| of the inexact arrays of `tree` (1 when it has none)."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    if not leaves:
        return jnp.ones(())
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves if x.size]))


def lane_metrics(
    dev: PyTree, scale: Array, stats: SolveStats | None, g: PyTree, growth: Array | None = None
) -> dict[str, Array]:
    """One lane's `max_abs`, `mean_abs`, `max_rel` (of the deviation `dev` against the
    reference's `scale`), `result` (the worst input's status, or a lane-level failure),
    `num_steps`, `num_evaluations` and `parameter_growth`."""
    a = jnp.abs(flat(dev))
    if stats is None:
        zero = jnp.zeros((), dtype=jnp.int32)
        steps, nfe, status = zero, zero, SolveStatus.successful
    else:
        steps = jnp.max(stats.num_steps)
        # -1 marks "not counted" per input: keep it, do not sum it into a count
        nfe = jnp.where(
            jnp.all(stats.num_evaluations >= 0), jnp.sum(stats.num_evaluations), NOT_COUNTED
        )
        # the worst input decides (any failure fails the lane)
        failed = jax.vmap(lambda r: r != SolveStatus.successful)(stats.result)
        first = jnp.argmax(failed)
        status = jax.tree.map(lambda c: c[first], stats.result)
    status = SolveStatus.where(
        (status == SolveStatus.successful) & ~finite(a), SolveStatus.nonfinite_output, status
    )
    status = SolveStatus.where(finite(g), status, SolveStatus.singular_gauge)
    ok = status == SolveStatus.successful
    nan = jnp.asarray(jnp.nan, dtype=a.dtype)
    return {
        # a failed lane holds NaN, never a finite number that could pass for a deviation
        "max_abs": jnp.where(ok, jnp.max(a), nan),
        "mean_abs": jnp.where(ok, jnp.mean(a), nan),
        # floored: a reference that is exactly zero gives max_rel = max_abs / tiny, not NaN
        "max_rel": jnp.where(ok, jnp.max(a) / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny), nan),
        "result": status_code(status),
        "num_steps": steps.astype(jnp.int32),
        "num_evaluations": nfe.astype(jnp.int32),
        # how much larger the transformed model's parameters are than the model's: outputs
        # computed from parameters `growth` times larger carry `growth` times the rounding
        "parameter_growth": jnp.where(
            ok, jnp.ones((), a.dtype) if growth is None else growth.astype(a.dtype), nan
        ),
    }


class Static:
    """The non-array part of `(model, gauge, ...)`, hashable by its PyTree structure and leaves
    (a jit cache key): diffrax adjoints such as `BacksolveAdjoint` hold dicts, which Modules
    cannot hash. Unhashable leaves compare by identity."""

    def __init__(self, tree):
        self.tree = tree
        leaves, self._treedef = jax.tree.flatten(tree)
        self._key = tuple(hashable(x) for x in leaves)

    def __hash__(self):
        return hash((self._treedef, self._key))

    def __eq__(self, other):
        return (
            isinstance(other, Static)
            and self._treedef == other._treedef
            and self._key == other._key
        )


class Identity:
    """Wraps an unhashable leaf: equal only to itself."""

    def __init__(self, x):
        self.x = x

    def __hash__(self):
        return id(self.x)

    def __eq__(self, other):
        return isinstance(other, Identity) and other.x is self.x


def hashable(x):
    """`x`, or an `Identity` wrapper of it when it cannot be hashed."""
    try:
        hash(x)
    except TypeError:
        return Identity(x)
    return x


class Plan(NamedTuple):
    """Everything static about a sweep program (hashable: the jit and executable cache key)."""

    static: Static
    mode: str
    observable: Callable
    chunk_size: int
    mesh: Any
    axis: str  # the mesh axis the samples are split over
    precision: str

    def without_blocks(self) -> "Plan":
        """This plan without what only the block programs depend on (chunk and mesh): the key
        of the reference program, so that a new `chunk_size` does not recompile it."""
        return self._replace(chunk_size=1, mesh=None, axis="samples")


def lane(plan: Plan, sample_key, params, inputs, reference, scale) -> dict[str, Array]:
    """The metrics of the gauge sample drawn from `sample_key` (see `lane_metrics`)."""
    model, gauge = eqx.combine(params, plan.static.tree)
    # a bad element fails its lane, never the sweep: the family's traced value checks (factors
    # > 0 and finite, a matrix not singular) mark it NaN instead of raising at run time
    with reported_checks():
        g = in_dtype(gauge.sample(sample_key), scale.dtype)
    if plan.mode == "first_order":

        def path(a):
            return gauge.act(a, model)

        if plan.observable is default_observable:
            # the model's own first-order response (for a neural ODE the forward sensitivity
            # system, under error control)
            identity = in_dtype(gauge.identity(), scale.dtype)
            # a family whose first-order action is a spacetime generator says so: the model
            # then solves one jvp of its field and one of eps per evaluation, not a jvp of act
            generator = gauge.first_order_generator(g)
            dout, stats = observe_tangent(model, path, identity, g, inputs, generator)
        else:
            # the observable returns (outputs, stats): has_aux differentiates the outputs only
            _, dout, stats = jax.jvp(
                lambda a: plan.observable(path(a), inputs),
                (in_dtype(gauge.identity(), scale.dtype),),
                (g,),
                has_aux=True,
            )
        return lane_metrics(dout, scale, stats, g)
    with reported_checks():
        moved = gauge.act(g, model)
    out, stats = plan.observable(moved, inputs)
    growth = None
    if gauge.rescales_parameters:
        tiny = jnp.finfo(scale.dtype).tiny
        growth = param_size(moved) / jnp.maximum(param_size(model), tiny)
    return lane_metrics(jax.tree.map(jnp.subtract, out, reference), scale, stats, g, growth)


@functools.partial(jax.jit, static_argnums=0)
def observe_reference(plan: Plan, params, inputs):
    """The reference outputs, their scale (largest |entry|), the identity element's deviation
    (absolute), and whether every reference solve succeeded: one program."""
    model, gauge = eqx.combine(params, plan.static.tree)
    reference, stats = plan.observable(model, inputs)
    dtype = jax.tree.leaves(inputs)[0].dtype
    identity = plan.observable(gauge.act(in_dtype(gauge.identity(), dtype), model), inputs)[0]
    noise = jnp.max(jnp.abs(flat(identity) - flat(reference)))
    scale = jnp.max(jnp.abs(flat(reference)))
    if stats is None:
        return reference, scale, noise, jnp.asarray(True)
    solved = jnp.all(jax.vmap(lambda r: r == SolveStatus.successful)(stats.result))
    return reference, scale, noise, solved
