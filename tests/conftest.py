"""Tests run in float64 on the CPU with strict dtype promotion (set here, never on import)."""

import os


os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    """A function returning a fresh key on each call (deterministic per test)."""
    key = [jax.random.key(0)]

    def _getkey():
        key[0], sub = jax.random.split(key[0])
        return sub

    return _getkey


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(ys) against log(xs)."""
    import numpy as np

    return float(np.polyfit(np.log(np.asarray(xs)), np.log(np.asarray(ys)), 1)[0])


def small_node(key, dim=3, rtol=1e-8):
    """A tanh-MLP neural ODE on [0, 1] used across the tests."""
    import diffrax

    import gaugejax as gj

    field = gj.MLPField(dim, 16, 2, key=key, out_scale=0.7)
    return gj.NeuralODE(
        field, t1=1.0, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol)
    )


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active."""

    _active: list = []
    _registered = False

    def __init__(self):
        self.count = 0
        if not CompileCounter._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileCounter._listen)
            CompileCounter._registered = True

    @staticmethod
    def _listen(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            for counter in CompileCounter._active:
                counter.count += 1

    def __enter__(self):
        CompileCounter._active.append(self)
        return self

    def __exit__(self, *exc):
        CompileCounter._active.remove(self)
