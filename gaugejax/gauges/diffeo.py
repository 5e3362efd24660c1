"""Finite spatial diffeomorphisms `x = psi_t(y) = y + e(t) W tanh(U y + v)` (finite Eq. 13-16)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._core.calculus import pullback
from ..models import AbstractNeuralODE
from ..models.node import check_observation_times
from .features import (
    ObservationEnvelope,
    RandomFeatures,
    check_boundary,
    check_positive,
    observation_envelope,
)
from .maps import AbstractMapGauge, ComposedMap, InverseMap, lipschitz_normalise


def check_trajectory_boundary(boundary: str, observation_times) -> None:
    """Refuse `observation_times` with `boundary="free"`: a family that moves x(T) cannot keep
    the trajectory; its control is already the boundary-only family."""
    if observation_times is not None and check_boundary(boundary) != "vanishing":
        raise ValueError(
            "`observation_times` needs `boundary` = 'vanishing' (elements that are the identity "
            f"at 0, T and every observation time); received boundary={boundary!r}."
        )


def envelope_frequency(t1: float, boundary: str) -> Float[Array, ""]:
    """omega of the envelope `sin(omega t)`: pi/T (vanishes at 0 and T, `"vanishing"`) or
    pi/(2T) (vanishes at 0 only, `"free"`); |e| <= 1 on [0, T] either way."""
    check_boundary(boundary)
    return jnp.asarray(jnp.pi / (t1 if boundary == "vanishing" else 2 * t1), dtype=float)


class FeatureShift(eqx.Module):
    """`psi(t, y) = y + sin(omega t) q(t) W tanh(U y + v)`, q the `ObservationEnvelope` (1
    without one)."""

    W: Float[Array, "d m"]
    features: RandomFeatures
    omega: Float[Array, ""]
    envelope: ObservationEnvelope | None = None

    def displacement(self, t, y):
        """`psi(t, y) - y = sin(omega t) q(t) W tanh(U y + v)`, computed as such (not as a
        difference)."""
        e = jnp.sin(self.omega * t)
        if self.envelope is not None:  # None: the x(T) families, their arithmetic unchanged
            e = e * self.envelope(t)
        return e * (self.W @ self.features(y))

    def __call__(self, t, y):
        return y + self.displacement(t, y)


class SpatialGenerator(eqx.Module):
    """`(t, y) -> (0, shift.displacement(t, y))`: the spacetime generator of the spatial maps
    `x = y + a shift.displacement(t, y)` at a = 0 (no time part)."""

    shift: FeatureShift

    def __call__(self, t, y):
        return jnp.zeros((), jnp.result_type(t)), self.shift.displacement(t, y)


class SpatialDiffeoGauge(AbstractMapGauge):
    """Finite spatial diffeomorphisms of a `NeuralODE`, acting by exact `pullback`.

    Base elements are `W` (d x m): `psi_t(y) = y + e(t) W tanh(U y + v)` with the envelope
    `e(t) = sin(pi t/T)` (`boundary="vanishing"`: psi_0 = psi_T = id, a gauge symmetry) or
    `sin(pi t/(2T))` (`"free"`: psi_T != id, the output changes to `psi_T^-1(Phi(z))`).

    **Observable preserved:** x(T) (`boundary="vanishing"`); with `observation_times`
    `(t_1, ..., t_n)` the saved trajectory `x(t_1), ..., x(t_n)` of a model observing at those
    times: `e(t) = sin(pi t/T) q(t)`, `q = prod_i (t - t_i)` normalised to `max |q| = 1` on
    [0, T], so psi_{t_i} = id too. `control()`: the `"free"` family, or with observation
    times the boundary-only one (`q = 1`: psi_0 = psi_T = id only), which keeps x(T) and
    breaks the trajectory.

    Invertibility by construction: `Lip_y(psi_t - id) <= |e(t)| |W|_2 |U|_2 <= rho < 1`, so each
    psi_t is a bi-Lipschitz bijection with `D psi_t` invertible (`sigma_min >= 1 - rho`).
    Samples draw `|W|_2 |U|_2` uniformly in `[rho/4, rho]`.

    **Arguments:** `dim`, `t1`, `key` (draws U, v), `num_features` (m), `rho` in (0, 1),
    `boundary`, `feature_scale` (of U), `observation_times` (the model's; default None: x(T)).

    **Raises:** `ValueError` for a bad value (naming it), as `check_observation_times`, or
    `observation_times` with `boundary="free"`.
    """

    features: RandomFeatures
    t1: float
    rho: float
    omega: Float[Array, ""]
    envelope: ObservationEnvelope | None
    observation_times: tuple[float, ...] | None
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
        observation_times: Any = None,  # a sequence of floats, or None
    ):
        check_positive("t1", t1)
        check_positive("rho", rho, below=1.0)
        check_trajectory_boundary(boundary, observation_times)
        self.features = RandomFeatures(dim, num_features, key=key, scale=feature_scale)
        self.t1 = float(t1)
        self.rho = float(rho)
        self.omega = envelope_frequency(self.t1, boundary)
        self.envelope = observation_envelope(self.t1, observation_times)
        self.observation_times = check_observation_times(observation_times, 0.0, self.t1)

    def base_map(self, W: Float[Array, "d m"]) -> FeatureShift:
        return FeatureShift(W, self.features, self.omega, self.envelope)

    def pull(self, field, map_):
        return pullback(field, map_)

    def compose_maps(self, outer, inner):
        return ComposedMap(outer, inner)

    def invert_map(self, map_):
        return InverseMap(map_)

    def first_order_generator(self, direction: Float[Array, "d m"]) -> SpatialGenerator:
        """`(0, e(t) direction tanh(U y + v))`: the map is linear in W, `psi = id + a
        displacement` along `direction` from the identity (W = 0), and the pullback by
        `x = y + a eps_y` is `deform(F, (0, eps_y), a)` to first order."""
        return SpatialGenerator(self.base_map(direction))

    def control(self) -> "SpatialDiffeoGauge":
        """The `boundary="free"` family (psi_T != id): it changes x(T); with observation times
        the boundary-only family (psi_0 = psi_T = id only): it changes the trajectory. Only
        arrays differ, so a sweep of it reuses the compiled program."""
        if self.envelope is not None:
            return eqx.tree_at(lambda g: g.envelope, self, self.envelope.boundary_only())
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
