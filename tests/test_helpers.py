"""The shared helpers, one home each: here the eager-or-traced value check."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from gaugejax._core._checks import check_value, is_traced


# ---------------------------------------------------------------------------- check_value

MESSAGE = "`x` must be > 0."


def _positive(x):
    return check_value(x, lambda: ~(x > 0), MESSAGE, received=lambda: f"Received {x}.")


def test_check_value_raises_now_for_concrete_and_at_run_time_for_traced_values():
    ok = jnp.asarray([1.0, 2.0])
    assert _positive(ok) is ok  # concrete and fine: the value itself, nothing attached
    bad = jnp.asarray([1.0, -2.0])
    with pytest.raises(ValueError, match=r"^`x` must be > 0\. Received \[ 1\. -2\.\]\.$"):
        _positive(bad)
    # NaN fails (the condition is written ~(x > 0))
    with pytest.raises(ValueError, match="must be > 0"):
        _positive(jnp.asarray([jnp.nan]))
    # traced: the same message, when the compiled program runs (eqx.filter_jit and jax.jit)
    np.testing.assert_array_equal(eqx.filter_jit(_positive)(ok), ok)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"`x` must be > 0\."):
        eqx.filter_jit(_positive)(bad)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"`x` must be > 0\."):
        jax.jit(_positive)(bad)
    with pytest.raises(Exception, match=r"`x` must be > 0\."):  # one bad lane fails the batch
        jax.block_until_ready(jax.vmap(_positive)(jnp.asarray([[1.0], [-1.0]])))


def test_check_value_keeps_concrete_conditions_eager_inside_a_trace():
    """A condition on concrete arrays (closed over, or Python numbers) raises while tracing,
    before anything runs; a condition handed over already computed inside the trace cannot."""
    closed = jnp.asarray(-1.0)

    @jax.jit
    def f(y):
        return y + check_value(closed, lambda: ~(closed > 0), MESSAGE, error=TypeError)

    with pytest.raises(TypeError, match=r"^`x` must be > 0\."):
        f(1.0)

    @jax.jit
    def g(y):
        return y + check_value(closed, ~(closed > 0), MESSAGE)  # computed in the trace: traced

    with pytest.raises(jax.errors.JaxRuntimeError, match="must be > 0"):
        g(1.0)
    assert check_value(None, False, MESSAGE) is None  # nothing to attach when concrete
    assert is_traced(None) is False and is_traced((1.0, jnp.ones(2))) is False
    jax.jit(lambda y: is_traced((1.0, y)) or pytest.fail("not seen as traced"))(1.0)


def test_solve_refuses_equal_times_with_one_message_in_both_modes():
    def field(t, y, args):
        return -y

    message = r"`t1` must differ from `t0` \(t1 < t0 integrates backwards\)\."
    with pytest.raises(ValueError, match=message + r" Received t0 = t1 = 0\.5\."):
        gj.solve(field, jnp.ones(2), t0=0.5, t1=0.5)
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        eqx.filter_jit(lambda t: gj.solve(field, jnp.ones(2), t0=t, t1=t)[0])(jnp.asarray(0.5))
