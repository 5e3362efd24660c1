"""Input checks shared by the public functions: shapes (static under `jit`, so always checked
at trace time) and values, which are checked on the host when concrete and inside the compiled
program when traced (`check_value`, the one home of that decision)."""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
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


def array_namespace(*values: Any):
    """`numpy` when every leaf of `values` is concrete, `jax.numpy` when one is traced: a
    condition on concrete values computed with numpy compiles nothing, where each eager
    `jax.numpy` op compiles an XLA program of its own (a sweep's first call paid a dozen for
    its argument checks); a traced condition must stay in the graph."""
    return jnp if is_traced(values) else np


# while a sweep lane is traced: traced checks mark their value with NaN instead of raising
_REPORTED: contextvars.ContextVar[bool] = contextvars.ContextVar("reported_checks", default=False)


@contextlib.contextmanager
def reported_checks() -> Iterator[None]:
    """While this block traces a function, a traced `check_value` that fails does not raise
    when the program runs: the floating arrays of its value become NaN instead, for the caller
    to report. A sweep lane draws and applies its gauge element inside it, so one bad element
    (a rescaling factor that overflowed to 0 or inf, a singular matrix) fails its lane (NaN
    outputs: `nonfinite_output`, or `singular_gauge` for a non-finite element) instead of
    aborting the whole vmapped program with a runtime error. Concrete checks still raise."""
    token = _REPORTED.set(True)
    try:
        yield
    finally:
        _REPORTED.reset(token)


def _marked(value: T, failed: Any) -> T:
    bad = jnp.any(failed)
    return jax.tree.map(
        lambda x: (
            jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x) if eqx.is_inexact_array(x) else x
        ),
        value,
    )


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
    `message`; inside `reported_checks`, a value holding floating arrays is returned with
    them NaN instead (nothing raised).
    """
    if callable(failed):
        with jax.ensure_compile_time_eval():
            failed = failed()
    if is_traced(failed):
        if _REPORTED.get() and any(map(eqx.is_inexact_array, jax.tree.leaves(value))):
            return _marked(value, failed)
        return eqx.error_if(value, jnp.any(failed), message)
    if bool(np.any(np.asarray(failed))):
        raise error(message if received is None else f"{message} {received()}")
    return value
