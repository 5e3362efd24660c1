"""A test gauge shared by the sweep and verdict tests (imported by test modules, after the
jaxtyping import hook is installed: conftest must not import gaugejax at module level)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import gaugejax as gj


class ScaledField(eqx.Module):
    """Test-only field `g * F` (g a scalar array)."""

    field: object
    g: jax.Array

    def __call__(self, t, y, args):
        return self.g * self.field(t, y, args)


class FieldScaling(gj.gauges.AbstractParameterGauge):
    """A test 'gauge' `F -> g F` of neural ODEs, from each sample's uniform draw u: by default
    deliberately broken (it changes the function), g = 0.5 + u; with `above`, exact (g = 1)
    except where u > `above` (g = 1.5: planted broken elements). Samples with u below
    `nan_below` are NaN (failed lanes). Thresholds may be arrays (one compiled program)."""

    nan_below: Any = 0.0
    above: Any = None
    infinitesimal = False

    def check_model(self, model):
        if not isinstance(model, gj.AbstractNeuralODE):
            raise TypeError("FieldScaling acts on neural ODEs")

    def control(self):
        return None

    def sample(self, key):
        u = jax.random.uniform(key)
        g = 0.5 + u if self.above is None else jnp.where(u > self.above, 1.5, 1.0)
        return jnp.where(u < self.nan_below, jnp.nan, g)

    def act(self, g, model):
        return model.with_field(ScaledField(model.field, g))

    def identity(self):
        return jnp.ones(())

    def inverse(self, g):
        return 1 / g

    def compose(self, g1, g2):
        return g1 * g2
