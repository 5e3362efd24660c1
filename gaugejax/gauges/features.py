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


def time_modes(
    t: Float[Array, ""], t1: float, num_modes: int, boundary: str
) -> Float[Array, " num_modes"]:
    """Temporal modes on [0, T]: `sin(k pi t/T)`, k = 1..K, vanishing at both ends, or
    `cos(k pi t/T)`, k = 0..K-1, which vanish at neither end (`boundary="free"`)."""
    k = jnp.arange(num_modes, dtype=jnp.result_type(t, float))
    if boundary == "vanishing":
        return jnp.sin((k + 1) * jnp.pi * t / t1)
    return jnp.cos(k * jnp.pi * t / t1)


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
