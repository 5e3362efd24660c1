"""Calls that differ only in array values or times reuse one compiled program.

Most of a smoke run is XLA compilation; these tests pin the structural choices that let repeated
calls share programs (Module fields instead of closures, times passed as arrays). The assertion
is a count of backend compilations, not a timing. The negative case shows the counter sees a
recompilation when the structure does change.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj

from .conftest import CompileCounter


D = 3


def _weight(key):
    return gj.random_linear_node(D, 1.0, key=key).field.weight


def test_wilson_line_second_call_compiles_nothing(getkey):
    w = _weight(getkey())
    w2 = _weight(getkey())
    jax.block_until_ready(gj.wilson_line(w, 0.7, 0.2))
    with CompileCounter() as c:
        U = gj.wilson_line(w2, 0.9, 0.1)  # other arrays, other times: same program
        Ub = gj.wilson_line(w2, 0.1, 0.9)
    assert c.count == 0
    # and the numbers are those of the new call: U(0.1 <- 0.9) U(0.9 <- 0.1) = 1
    np.testing.assert_allclose(Ub @ U, np.eye(D), atol=1e-9)
    with CompileCounter() as c:
        gj.wilson_line(lambda t: jnp.eye(D), 0.9, 0.1)  # a new closure: a new program
    assert c.count >= 1


def test_magnus_steps_are_traced(getkey):
    w = _weight(getkey())
    ref = gj.wilson_line(w, 1.0, 0.0)
    errs = [float(jnp.max(jnp.abs(gj.wilson_line_magnus(w, 1.0, 0.0, num_steps=4) - ref)))]
    with CompileCounter() as c:
        for n in (8, 16):
            errs.append(
                float(jnp.max(jnp.abs(gj.wilson_line_magnus(w, 1.0, 0.0, num_steps=n) - ref)))
            )
    assert c.count <= 3  # the subtraction/max of the comparison, never the integrator again
    # order 4: halving the step divides the error by about 16
    assert errs[1] < errs[0] / 8 and errs[2] < errs[1] / 8


def test_attention_node_reuses_its_solves(getkey):
    # moderate weights and tokens: the cubic flow of the jump stays far from blow-up
    Wq, Wk, Wv = jax.random.normal(getkey(), (3, D, D)) / np.sqrt(D)
    x = 0.5 * jax.random.normal(getkey(), (4, D))
    jax.block_until_ready(gj.attention_as_node(Wq, Wk, Wv, scale=0.1)(x))
    Wv2 = 2 * Wv
    with CompileCounter() as c:
        y = gj.attention_as_node(Wq, Wk, Wv2, scale=0.05)(x)
    assert c.count == 0  # three solves (two Wilson lines and the jump), all reused
    h = gj.attention(x, Wq, Wk, Wv2, "identity")
    assert float(jnp.max(jnp.abs(y - x - 0.05 * h))) < 0.05 * float(jnp.max(jnp.abs(h)))


def test_fast_compile_is_the_suites_setting_and_adds_nothing_twice(monkeypatch):
    """`gj.use_fast_compile` is what this suite runs under (the conftest sets JAX's switch and
    the same XLA flags before JAX starts): called again it adds no flag, and leaves JAX's
    switch on; a jaxlib whose XLA was not measured with the flags gets none (XLA aborts on a
    flag it does not know)."""
    from importlib import metadata

    from .conftest import COMPILE_FLAGS

    if os.environ.get("GAUGEJAX_TEST_XLA_FLAGS") is not None:
        pytest.skip("GAUGEJAX_TEST_XLA_FLAGS replaces the suite's flags")
    assert COMPILE_FLAGS == gj.fast_compile_xla_flags()
    flags = os.environ.get("XLA_FLAGS", "")
    assert COMPILE_FLAGS in flags
    monkeypatch.setenv("XLA_FLAGS", flags)  # both restored after the test
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    before = jax.config.read("jax_disable_most_optimizations")
    try:
        assert gj.use_fast_compile() == flags and os.environ["XLA_FLAGS"] == flags
        assert jax.config.read("jax_disable_most_optimizations") is True
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
    monkeypatch.setattr(metadata, "version", lambda name: "0.11.0")
    assert gj.fast_compile_xla_flags() == ""


def test_tracing_gc_is_the_suites_setting_and_still_collects_cycles():
    """`gj.use_tracing_gc` is what this suite runs under (the session fixture): the thresholds
    (100000, 50, 1000), the imports frozen. Cyclic garbage is still collected without an
    explicit `gc.collect()`: a dropped reference cycle is freed once 100000 more container
    objects have been made, and not after 1000 (the default thresholds would have freed it
    after 700)."""
    import gc
    import weakref

    assert gc.get_threshold() == (100_000, 50, 1000)
    assert gc.get_freeze_count() > 10_000  # gaugejax, jax and the test modules
    frozen = gc.get_freeze_count()
    assert gj.use_tracing_gc() == (100_000, 50, 1000)
    assert gc.get_freeze_count() == frozen  # called again: nothing collected or frozen

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    gc.collect(0)  # the youngest generation starts empty (a full pass would scan the heap)
    alive = cycle()
    kept = [[] for _ in range(1000)]
    assert alive() is not None  # not collected yet: 1000 << 100000
    kept += [[] for _ in range(150_000)]
    assert alive() is None  # collected by an automatic pass of the youngest generation
    del kept
