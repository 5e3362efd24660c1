"""Random-feature building blocks shared by the neural-ODE gauge families."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..models.node import check_observation_times


BOUNDARIES = ("vanishing", "free")


def check_boundary(boundary: str) -> str:
    if boundary not in BOUNDARIES:
        raise ValueError(f"`boundary` must be one of {BOUNDARIES}; received {boundary!r}.")
    return boundary


def check_positive(name: str, value, *, below: float | None = None):
    if (
        not isinstance(value, (int, float))
        or not value > 0
        or (below is not None and value >= below)
    ):
        bound = f" and < {below}" if below is not None else ""
        raise ValueError(f"`{name}` must be a number > 0{bound}; received {value!r}.")
    return value


def mode_frequencies(t1: float, num_modes: int, boundary: str) -> tuple[Array, Array]:
    """`(omega, phase)` of the temporal modes `sin(omega_k t + phase_k)` on [0, T]:
    `sin(k pi t/T)`, k = 1..K, vanishing at both ends (`"vanishing"`), or `cos(k pi t/T)`,
    k = 0..K-1, vanishing at neither end (`"free"`). Arrays, so that both variants share one
    compiled program."""
    check_boundary(boundary)
    k = jnp.arange(num_modes, dtype=float) + (1.0 if boundary == "vanishing" else 0.0)
    phase = jnp.full((num_modes,), 0.0 if boundary == "vanishing" else jnp.pi / 2)
    return k * jnp.pi / t1, phase


def time_modes(
    t: Float[Array, ""], omega: Float[Array, " K"], phase: Float[Array, " K"]
) -> Float[Array, " K"]:
    """The temporal modes `sin(omega_k t + phase_k)`."""
    return jnp.sin(omega * t + phase)


class RandomFeatures(eqx.Module):
    """`y -> tanh(U y + v)`, `U ~ N(0, scale^2 / d)`, `v ~ N(0, 1)`; 1-Lipschitz times |U|_2."""

    U: Float[Array, "m d"]
    v: Float[Array, " m"]

    def __init__(self, dim: int, num_features: int, *, key: PRNGKeyArray, scale: float = 1.0):
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"`dim` must be a positive int; received {dim!r}.")
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"`num_features` must be a positive int; received {num_features!r}.")
        ku, kv = jax.random.split(key)
        self.U = scale * jax.random.normal(ku, (num_features, dim)) / jnp.sqrt(dim)
        self.v = jax.random.normal(kv, (num_features,))

    def __call__(self, y: Float[Array, " d"]) -> Float[Array, " m"]:
        return jnp.tanh(self.U @ y + self.v)

    @property
    def lipschitz(self) -> Float[Array, ""]:
        return jnp.linalg.norm(self.U, ord=2)


class ObservationEnvelope(eqx.Module):
    """`q(t) = scale * prod_i (t - t_i)` over the interior observation times still `active`.

    Multiplying a family's envelope (which vanishes at 0 and T) by q makes every element the
    identity at each observation time t_i as well: the gauge group of the saved trajectory
    `x(t_1), ..., x(t_n)`. `scale` normalises `max |q| = 1` on [0, T] (so Lipschitz and
    monotonicity bounds that hold for `|envelope| <= 1` still hold); `slope` is `max |q'|` on
    [0, T] (the time reparametrisation's monotonicity bound needs it). `boundary_only()` is
    the same shape with q = 1: vanishing at 0 and T only (the trajectory families' control),
    arrays only, so that a sweep of it reuses the compiled program.
    """

    times: Float[Array, " n"]
    active: Bool[Array, " n"]
    scale: Float[Array, ""]
    slope: Float[Array, ""]

    def __call__(self, t: Float[Array, ""]) -> Float[Array, ""]:
        return self.scale * jnp.prod(jnp.where(self.active, t - self.times, 1.0))

    def boundary_only(self) -> "ObservationEnvelope":
        """q = 1: the envelope vanishes at 0 and T only (x(T) kept, the trajectory not)."""
        return ObservationEnvelope(
            self.times,
            jnp.zeros_like(self.active),
            jnp.ones_like(self.scale),
            jnp.zeros_like(self.slope),
        )


def _max_abs(poly: np.polynomial.Polynomial, t1: float) -> float:
    """`max |poly|` on [0, t1]: at the ends or a real critical point inside (exact up to
    rounding), with a dense grid as a guard against inaccurate roots."""
    crit = poly.deriv().roots() if poly.degree() > 0 else np.zeros(0)
    crit = crit[np.isreal(crit)].real
    points = np.concatenate([[0.0, t1], crit[(crit >= 0) & (crit <= t1)]])
    points = np.concatenate([points, np.linspace(0.0, t1, 4097)])
    return float(np.max(np.abs(poly(points))))


def observation_envelope(t1: float, observation_times: Any) -> ObservationEnvelope | None:
    """The `ObservationEnvelope` vanishing at every observation time inside (0, T), or None
    without observation times (the family keeps x(T) only, as before).

    **Arguments:** `t1`: the final time T; `observation_times`: strictly increasing in (0, T]
    (`t_n = T` needs no factor: the family's own envelope vanishes at T).

    **Raises:** as `gaugejax.models.node.check_observation_times`.
    """
    times = check_observation_times(observation_times, 0.0, t1)
    if times is None:
        return None
    interior = np.asarray([t for t in times if t < t1], dtype=float)
    poly = np.polynomial.Polynomial.fromroots(interior)
    size = _max_abs(poly, t1)
    slope = _max_abs(poly.deriv(), t1) / size if interior.size else 0.0
    return ObservationEnvelope(
        jnp.asarray(interior, dtype=float),
        jnp.ones(interior.shape, dtype=bool),
        jnp.asarray(1.0 / size, dtype=float),
        jnp.asarray(slope, dtype=float),
    )
