"""First-order lanes of the families whose first-order action is a spacetime generator: the
forward sensitivity system written out (`gj.DeformationSensitivityField`: one jvp of the field,
one of the generator, per evaluation) against the nested path it replaces (the jvp of the
gauge-moved field, `gj.SensitivityField`), lane by lane."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj

from ._gauges import FieldScaling
from .conftest import small_node


D = 3

# boundary-free families give a real response (the vanishing ones give solver noise, where
# equal numbers would say little about the algebra)
FAMILIES = {
    "lie": lambda k: gj.LieDeformationGauge(D, 1.0, key=k, boundary="free"),
    "lie_vanishing": lambda k: gj.LieDeformationGauge(D, 1.0, key=k),
    "diffeo": lambda k: gj.SpatialDiffeoGauge(D, 1.0, key=k, boundary="free"),
}
# (every field family's generator against the jvp of its `act`, field by field:
# `test_contract.py::test_first_order_generator_is_the_tangent_of_act`)


def _model(name, key):
    return small_node(key, D, rtol=1e-9)


class _FlippedTime(eqx.Module):
    """A generator with the sign of its time part flipped (a wrong convention)."""

    eps: object

    def __call__(self, t, y):
        e0, ey = self.eps(t, y)
        return -e0, ey


def _responses(model, gauge, keys, inputs, generator_of):
    """Per sample, the responses of the nested path (no generator) and of
    `generator_of(gauge, element)` (None: the nested path again), from the model as a sweep
    solves it."""
    return _compiled(model.for_sweep(inputs.dtype, differentiated=False), gauge, keys, inputs,
                     generator_of)  # fmt: skip


@eqx.filter_jit
def _compiled(model, gauge, keys, inputs, generator_of):
    def one(k):
        g = gauge.sample(k)
        path = lambda a: gauge.act(a, model)  # noqa: E731
        nested = model.observe_tangent(path, gauge.identity(), g, inputs)[0]
        written = model.observe_tangent(path, gauge.identity(), g, inputs, generator_of(gauge, g))
        return nested, written[0]

    return jax.vmap(one)(keys)


def _own(gauge, g):
    return gauge.first_order_generator(g)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_written_out_system_equals_the_nested_path_lane_by_lane(name):
    k = jax.random.split(jax.random.key(3), 4)
    gauge, model = FAMILIES[name](k[0]), _model(name, k[1])
    x = jax.random.normal(k[2], (4, D))
    keys = gj.sample_keys(k[3], 6)
    nested, written = _responses(model, gauge, keys, x, _own)
    # judged as a sweep judges a deviation: against the size of the outputs
    scale = float(jnp.max(jnp.abs(jax.vmap(model)(x))))
    # the same derivatives summed in another order, under the same error control (the same
    # steps): measured <= 2.6e-16 of the outputs' size (JAX_DISABLE_MOST_OPTIMIZATIONS=1),
    # for the free families <= 1.3e-15 of the largest response
    np.testing.assert_allclose(written, nested, rtol=0, atol=2e-15 * scale)
    # the sweep's lanes (the written-out system) against the nested path's maxima: measured
    # <= 1.9e-16 of the outputs' size
    res = gj.sweep(model, gauge, x, key=k[3], num_samples=6, mode="first_order",
                   control_samples=0, recheck_samples=0)  # fmt: skip
    per_lane = np.max(np.abs(np.asarray(nested)).reshape(6, -1), axis=1)
    np.testing.assert_allclose(res.max_abs, per_lane, rtol=0, atol=2e-15 * scale)
    size = float(jnp.max(jnp.abs(nested)))
    assert name == "lie_vanishing" or size > 1e-3  # a real response, not zeros


def test_wrong_sign_is_seen_and_a_family_without_generator_falls_back():
    k = jax.random.split(jax.random.key(4), 4)
    gauge, model = FAMILIES["lie"](k[0]), _model("lie", k[1])
    x = jax.random.normal(k[2], (4, D))
    keys = gj.sample_keys(k[3], 4)

    # the time part with the wrong sign: a different response, by far more than the agreement
    def flipped(gauge, g):
        return _FlippedTime(gauge.first_order_generator(g))

    nested, wrong = _responses(model, gauge, keys, x, flipped)
    assert float(jnp.max(jnp.abs(wrong - nested))) > 1e-3 * float(jnp.max(jnp.abs(nested)))
    # a family whose action is no spacetime generator (it scales the field): None, and its
    # lanes are the nested path's
    scaling = FieldScaling()
    assert scaling.first_order_generator(scaling.sample(k[3])) is None
    nested, again = _responses(model, scaling, keys, x, lambda gauge, g: None)
    np.testing.assert_array_equal(again, nested)
    res = gj.sweep(model, scaling, x, key=k[3], num_samples=4, mode="first_order",
                   control_samples=0, recheck_samples=0)  # fmt: skip
    per_lane = np.max(np.abs(np.asarray(nested)).reshape(4, -1), axis=1)
    np.testing.assert_allclose(res.max_abs, per_lane, rtol=1e-14)
    assert per_lane.min() > 1e-3  # scaling the field changes the output
    # the model refuses two descriptions of one path
    with pytest.raises(ValueError, match="not both"):
        model.solve_tangent(x[0], x[0], lambda p, t, y, a: y, 0.0, 1.0, generator=lambda t, y: y)
