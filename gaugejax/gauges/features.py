"""Random-feature building blocks shared by the neural-ODE gauge families."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


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
