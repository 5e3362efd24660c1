"""Finite time reparametrisations `t = tau(s) = s + sum_k c_k sin(omega_k s)` (finite Eq. 17-20)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._core.calculus import reparametrize
from ..models import AbstractNeuralODE
from ..models.node import check_observation_times
from .diffeo import check_trajectory_boundary
from .features import ObservationEnvelope, check_boundary, check_positive, observation_envelope
from .maps import AbstractMapGauge, ComposedMap, InverseMap, lipschitz_normalise


def _frequencies(t1: float, num_modes: int, boundary: str) -> Float[Array, " K"]:
    """`k pi / T` (vanishing: tau(T) = T) or `(k - 1/2) pi / T` (free), k = 1..K."""
    k = jnp.arange(1.0, num_modes + 1.0) - (0.0 if boundary == "vanishing" else 0.5)
    return k * jnp.pi / t1


class SineReparam(eqx.Module):
    """`tau(s) = s + q(s) sum_k c_k sin(omega_k s)`, q the `ObservationEnvelope` (1 without
    one)."""

    c: Float[Array, " K"]
    omega: Float[Array, " K"]
    envelope: ObservationEnvelope | None = None

    def shift(self, s):
        """`tau(s) - s = q(s) sum_k c_k sin(omega_k s)`, computed as such (not as a
        difference)."""
        shift = jnp.sum(self.c * jnp.sin(self.omega * s))
        if self.envelope is not None:  # None: the x(T) families, their arithmetic unchanged
            shift = self.envelope(s) * shift
        return shift

    def __call__(self, s):
        return s + self.shift(s)


class TimeGenerator(eqx.Module):
    """`(t, y) -> (reparam.shift(t), 0)`: the spacetime generator of the time
    reparametrisations `t = s + a reparam.shift(s)` at a = 0 (no space part)."""

    reparam: SineReparam

    def __call__(self, t, y):
        return self.reparam.shift(t), jax.tree.map(jnp.zeros_like, y)


class TimeReparamGauge(AbstractMapGauge):
    """Finite time reparametrisations of a `NeuralODE`, acting by exact `reparametrize`.

    Base elements are coefficients `c` (K,): `tau(s) = s + sum_k c_k sin(omega_k s)` with
    `omega_k = k pi / T` (`boundary="vanishing"`: tau(0) = 0, tau(T) = T, a gauge symmetry) or
    `omega_k = (k - 1/2) pi / T` (`"free"`: tau(T) != T, the output becomes x(tau(T))).

    **Observable preserved:** x(T) (`boundary="vanishing"`); with `observation_times`
    `(t_1, ..., t_n)` the saved trajectory of a model observing at those times:
    `tau(s) = s + q(s) sum_k c_k sin(omega_k s)`, `q = prod_i (s - t_i)` normalised to
    `max |q| = 1` on [0, T], so tau(t_i) = t_i too. `control()`: the `"free"` family, or with
    observation times the boundary-only one (`q = 1`: tau(0) = 0, tau(T) = T only), which
    keeps x(T) and breaks the trajectory.

    Monotonicity by construction: `tau'(s) >= 1 - sum_k |c_k| (omega_k + max |q'|) >= 1 - rho
    > 0` (`|q| <= 1`; `q' = 0` without observation times); samples draw that sum uniformly in
    `[rho/4, rho]`.

    **Arguments:** `t1`, `num_modes` (K), `rho` in (0, 1), `boundary`, `observation_times`
    (the model's; default None: x(T)).

    **Raises:** `ValueError` for a bad value (naming it), as `check_observation_times`, or
    `observation_times` with `boundary="free"`.
    """

    t1: float
    rho: float
    omega: Float[Array, " K"]
    envelope: ObservationEnvelope | None
    observation_times: tuple[float, ...] | None
    acts_on = AbstractNeuralODE

    def __init__(
        self,
        t1: float,
        *,
        num_modes: int = 3,
        rho: float = 0.5,
        boundary: str = "vanishing",
        observation_times: Any = None,  # a sequence of floats, or None
    ):
        check_positive("t1", t1)
        check_positive("rho", rho, below=1.0)
        if not isinstance(num_modes, int) or num_modes <= 0:
            raise ValueError(f"`num_modes` must be a positive int; received {num_modes!r}.")
        check_trajectory_boundary(boundary, observation_times)
        self.t1 = float(t1)
        self.rho = float(rho)
        self.omega = _frequencies(self.t1, num_modes, check_boundary(boundary))
        self.envelope = observation_envelope(self.t1, observation_times)
        self.observation_times = check_observation_times(observation_times, 0.0, self.t1)

    @property
    def num_modes(self) -> int:
        return self.omega.shape[0]

    def base_map(self, c: Float[Array, " K"]) -> SineReparam:
        return SineReparam(c, self.omega, self.envelope)

    def pull(self, field, map_):
        return reparametrize(field, map_)

    def compose_maps(self, outer, inner):
        return ComposedMap(outer, inner)

    def invert_map(self, map_):
        return InverseMap(map_)

    def first_order_generator(self, direction: Float[Array, " K"]) -> TimeGenerator:
        """`(q(t) sum_k direction_k sin(omega_k t), 0)`: tau is linear in c, `tau = s + a
        shift` along `direction` from the identity (c = 0), and the reparametrisation by
        `t = s + a eps0` is `deform(F, (eps0, 0), a)` to first order."""
        return TimeGenerator(self.base_map(direction))

    def control(self) -> "TimeReparamGauge":
        """The `boundary="free"` family (tau(T) != T): it changes x(T); with observation times
        the boundary-only family (tau(t_i) != t_i): it changes the trajectory. Only arrays
        differ, so a sweep of it reuses the compiled program."""
        if self.envelope is not None:
            return eqx.tree_at(lambda g: g.envelope, self, self.envelope.boundary_only())
        free = _frequencies(self.t1, self.num_modes, "free")
        return eqx.tree_at(lambda g: g.omega, self, free)

    def sample(self, key: PRNGKeyArray) -> Float[Array, " K"]:
        kc, kr = jax.random.split(key)
        raw = jax.random.normal(kc, (self.num_modes,)) / jnp.arange(1.0, self.num_modes + 1.0)
        target = self.rho * jax.random.uniform(kr, minval=0.25, maxval=1.0)
        rate = self.omega
        if self.envelope is not None:  # |tau' - 1| <= sum_k |c_k| (omega_k + max |q'|)
            rate = rate + self.envelope.slope
        return lipschitz_normalise(raw, jnp.sum(jnp.abs(raw) * rate), target)

    def identity(self) -> Float[Array, " K"]:
        return jnp.zeros((self.num_modes,))
