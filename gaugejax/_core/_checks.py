"""Input checks shared by the public functions: shapes (static under `jit`, so always checked
at trace time) and values, which are checked on the host when concrete and inside the compiled
program when traced (`check_value`, the one home of that decision)."""

from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree


T = TypeVar("T")


def check_like(what: str, value: PyTree, like: PyTree) -> None:
    """Raise `ValueError` unless `value` has the PyTree structure and leaf shapes of `like`."""
    got = jax.tree.map(jnp.shape, value)
    want = jax.tree.map(jnp.shape, like)
    if jax.tree.structure(got) != jax.tree.structure(want) or jax.tree.leaves(
        got
    ) != jax.tree.leaves(want):
        raise ValueError(f"{what} must have the structure and shapes {want}; received {got}.")


def is_traced(tree: Any) -> bool:
    """Whether any leaf of `tree` is a JAX tracer: its value is known only when the compiled
    program runs (under `jit`, `vmap`, `grad`, ...), not now."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def check_value(
    value: T,
    failed: Any,
    message: str,
    *,
    error: type[Exception] = ValueError,
    received: Callable[[], str] | None = None,
) -> T:
    """Check a value condition now if it is concrete, or when the program runs if it is
    traced, with one message either way: the one eager-or-traced check of the library.

    **Arguments:**

    - `value`: what the check guards; returned. When the check is traced, the runtime error
      rides on it (`eqx.error_if`), so it must then hold arrays.
    - `failed`: true (in any entry) where the value is wrong: a bool, an array, or a function
      of no arguments returning one. A function runs under `jax.ensure_compile_time_eval`, so
      a condition on concrete arrays stays concrete (and raises now) even inside a `jit`
      trace. Write it so that NaN fails, e.g. `~(x > 0)` rather than `x <= 0`.
    - `message`: the error's message, the same whether raised now or at run time.
    - `error`: the exception class raised for a concrete failure (default `ValueError`).
    - `received`: optional function of no arguments describing the measured values (host
      arithmetic, so only for concrete ones), appended to the message of a concrete failure.

    **Returns:** `value` itself when `failed` is concrete and false; when `failed` is traced,
    `value` with the check attached. Use the returned value: a traced check whose result is
    dropped is dropped with it.

    **Raises:** `error(message)` at once when `failed` is concrete and true. When it is traced,
    the compiled program raises when it runs (an `eqx.EquinoxRuntimeError` under
    `eqx.filter_jit`, a `jax.errors.JaxRuntimeError` under `jax.jit`), its text holding
    `message`.
    """
    if callable(failed):
        with jax.ensure_compile_time_eval():
            failed = failed()
    if is_traced(failed):
        return eqx.error_if(value, jnp.any(failed), message)
    if bool(np.any(np.asarray(failed))):
        raise error(message if received is None else f"{message} {received()}")
    return value
