"""Trace-time input checks shared by the public functions (shapes are static under jit)."""

import jax
import jax.numpy as jnp
from jaxtyping import PyTree


def check_like(what: str, value: PyTree, like: PyTree) -> None:
    """Raise `ValueError` unless `value` has the PyTree structure and leaf shapes of `like`."""
    got = jax.tree.map(jnp.shape, value)
    want = jax.tree.map(jnp.shape, like)
    if jax.tree.structure(got) != jax.tree.structure(want) or jax.tree.leaves(
        got
    ) != jax.tree.leaves(want):
        raise ValueError(f"{what} must have the structure and shapes {want}; received {got}.")
