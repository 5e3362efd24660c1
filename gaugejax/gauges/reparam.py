"""Finite time reparametrisations `t = tau(s) = s + sum_k c_k sin(omega_k s)` (finite Eq. 17-20)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._core.calculus import reparametrize
from ..models import AbstractNeuralODE
from .features import check_boundary, check_positive
from .maps import AbstractMapGauge, ComposedMap, InverseMap, lipschitz_normalise


def _frequencies(t1: float, num_modes: int, boundary: str) -> Float[Array, " K"]:
    """`k pi / T` (vanishing: tau(T) = T) or `(k - 1/2) pi / T` (free), k = 1..K."""
    k = jnp.arange(1.0, num_modes + 1.0) - (0.0 if boundary == "vanishing" else 0.5)
    return k * jnp.pi / t1


class SineReparam(eqx.Module):
    """`tau(s) = s + sum_k c_k sin(omega_k s)`."""

    c: Float[Array, " K"]
    omega: Float[Array, " K"]

    def __call__(self, s):
        return s + jnp.sum(self.c * jnp.sin(self.omega * s))


class TimeReparamGauge(AbstractMapGauge):
    """Finite time reparametrisations of a `NeuralODE`, acting by exact `reparametrize`.

    Base elements are coefficients `c` (K,): `tau(s) = s + sum_k c_k sin(omega_k s)` with
    `omega_k = k pi / T` (`boundary="vanishing"`: tau(0) = 0, tau(T) = T, a gauge symmetry) or
    `omega_k = (k - 1/2) pi / T` (`"free"`: tau(T) != T, the output becomes x(tau(T))).

    Monotonicity by construction: `tau'(s) >= 1 - sum_k |c_k| omega_k >= 1 - rho > 0`; samples
    draw `sum_k |c_k| omega_k` uniformly in `[rho/4, rho]`.

    **Arguments:** `t1`, `num_modes` (K), `rho` in (0, 1), `boundary`.
    """

    t1: float
    rho: float
    omega: Float[Array, " K"]
    acts_on = AbstractNeuralODE

    def __init__(
        self, t1: float, *, num_modes: int = 3, rho: float = 0.5, boundary: str = "vanishing"
    ):
        check_positive("t1", t1)
        check_positive("rho", rho, below=1.0)
        if not isinstance(num_modes, int) or num_modes <= 0:
            raise ValueError(f"`num_modes` must be a positive int; received {num_modes!r}.")
        self.t1 = float(t1)
        self.rho = float(rho)
        self.omega = _frequencies(self.t1, num_modes, check_boundary(boundary))

    @property
    def num_modes(self) -> int:
        return self.omega.shape[0]

    def base_map(self, c: Float[Array, " K"]) -> SineReparam:
        return SineReparam(c, self.omega)

    def pull(self, field, map_):
        return reparametrize(field, map_)

    def compose_maps(self, outer, inner):
        return ComposedMap(outer, inner)

    def invert_map(self, map_):
        return InverseMap(map_)

    def control(self) -> "TimeReparamGauge":
        """The `boundary="free"` family (tau(T) != T): it changes the output. Only the
        frequencies (an array) differ, so a sweep of it reuses the compiled program."""
        free = _frequencies(self.t1, self.num_modes, "free")
        return eqx.tree_at(lambda g: g.omega, self, free)

    def sample(self, key: PRNGKeyArray) -> Float[Array, " K"]:
        kc, kr = jax.random.split(key)
        raw = jax.random.normal(kc, (self.num_modes,)) / jnp.arange(1.0, self.num_modes + 1.0)
        target = self.rho * jax.random.uniform(kr, minval=0.25, maxval=1.0)
        return lipschitz_normalise(raw, jnp.sum(jnp.abs(raw) * self.omega), target)

    def identity(self) -> Float[Array, " K"]:
        return jnp.zeros((self.num_modes,))
