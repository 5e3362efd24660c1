"""Finite spatial diffeomorphisms `x = psi_t(y) = y + e(t) W tanh(U y + v)` (finite Eq. 13-16)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._core.calculus import pullback
from ..models import AbstractNeuralODE
from .features import RandomFeatures, check_boundary, check_positive
from .maps import AbstractMapGauge, ComposedMap, InverseMap, lipschitz_normalise


def envelope_frequency(t1: float, boundary: str) -> Float[Array, ""]:
    """omega of the envelope `sin(omega t)`: pi/T (vanishes at 0 and T, `"vanishing"`) or
    pi/(2T) (vanishes at 0 only, `"free"`); |e| <= 1 on [0, T] either way."""
    check_boundary(boundary)
    return jnp.asarray(jnp.pi / (t1 if boundary == "vanishing" else 2 * t1), dtype=float)


class FeatureShift(eqx.Module):
    """`psi(t, y) = y + sin(omega t) W tanh(U y + v)`."""

    W: Float[Array, "d m"]
    features: RandomFeatures
    omega: Float[Array, ""]

    def __call__(self, t, y):
        return y + jnp.sin(self.omega * t) * (self.W @ self.features(y))


class SpatialDiffeoGauge(AbstractMapGauge):
    """Finite spatial diffeomorphisms of a `NeuralODE`, acting by exact `pullback`.

    Base elements are `W` (d x m): `psi_t(y) = y + e(t) W tanh(U y + v)` with the envelope
    `e(t) = sin(pi t/T)` (`boundary="vanishing"`: psi_0 = psi_T = id, a gauge symmetry) or
    `sin(pi t/(2T))` (`"free"`: psi_T != id, the output changes to `psi_T^-1(Phi(z))`).

    Invertibility by construction: `Lip_y(psi_t - id) <= |e(t)| |W|_2 |U|_2 <= rho < 1`, so each
    psi_t is a bi-Lipschitz bijection with `D psi_t` invertible (`sigma_min >= 1 - rho`).
    Samples draw `|W|_2 |U|_2` uniformly in `[rho/4, rho]`.

    **Arguments:** `dim`, `t1`, `key` (draws U, v), `num_features` (m), `rho` in (0, 1),
    `boundary`, `feature_scale` (of U).
    """

    features: RandomFeatures
    t1: float
    rho: float
    omega: Float[Array, ""]
    acts_on = AbstractNeuralODE

    def __init__(
        self,
        dim: int,
        t1: float,
        *,
        key: PRNGKeyArray,
        num_features: int = 8,
        rho: float = 0.5,
        boundary: str = "vanishing",
        feature_scale: float = 1.0,
    ):
        check_positive("t1", t1)
        check_positive("rho", rho, below=1.0)
        self.features = RandomFeatures(dim, num_features, key=key, scale=feature_scale)
        self.t1 = float(t1)
        self.rho = float(rho)
        self.omega = envelope_frequency(self.t1, boundary)

    def base_map(self, W: Float[Array, "d m"]) -> FeatureShift:
        return FeatureShift(W, self.features, self.omega)

    def pull(self, field, map_):
        return pullback(field, map_)

    def compose_maps(self, outer, inner):
        return ComposedMap(outer, inner)

    def invert_map(self, map_):
        return InverseMap(map_)

    def control(self) -> "SpatialDiffeoGauge":
        """The `boundary="free"` family (psi_T != id): it changes the output. Only the envelope
        frequency (an array) differs, so a sweep of it reuses the compiled program."""
        return eqx.tree_at(lambda g: g.omega, self, envelope_frequency(self.t1, "free"))

    def sample(self, key: PRNGKeyArray) -> Float[Array, "d m"]:
        kw, kr = jax.random.split(key)
        m, d = self.features.U.shape
        raw = jax.random.normal(kw, (d, m))
        target = self.rho * jax.random.uniform(kr, minval=0.25, maxval=1.0)
        lip = jnp.linalg.norm(raw, ord=2) * self.features.lipschitz
        return lipschitz_normalise(raw, lip, target)

    def identity(self) -> Float[Array, "d m"]:
        m, d = self.features.U.shape
        return jnp.zeros((d, m))
