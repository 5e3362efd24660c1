"""A benchmark's measures: median times with compilation apart, peak memory, XLA's FLOP count,
the matmul ceiling and the deviation summary, each with its numbers and its refusals."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def test_median_time_and_time_program():
    # three 20 ms sleeps: the median is 20 ms plus the timer's and scheduler's overhead
    assert 0.02 <= gj.median_time(lambda: time.sleep(0.02), 3) < 0.2
    x = jnp.arange(6.0, dtype=jnp.float64)
    timed = gj.time_program(lambda v: jnp.cumsum(v) * 2.0, x, repeats=2)
    assert isinstance(timed, gj.TimedProgram)
    np.testing.assert_array_equal(timed.output, [0.0, 2.0, 6.0, 12.0, 20.0, 30.0])
    assert timed.compile_s > 0 and 0 < timed.median_s < 1.0  # microseconds of work, measured
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"`repeats` must be an int >= 1; received {bad!r}"):
            gj.median_time(lambda: None, bad)
    with pytest.raises(ValueError, match="`repeats` must be an int >= 1"):
        gj.time_program(jnp.sin, x, repeats=0)


def test_program_flops_counts_a_matmul():
    a = jnp.ones((32, 32), jnp.float64)
    # XLA counts a dot as 2 m n k FLOPs; the add of b, 32^2 more
    assert gj.program_flops(lambda m: m @ m, a) == 2 * 32**3
    assert gj.program_flops(lambda m: m @ m + m, a) == 2 * 32**3 + 32**2


def test_matmul_ceiling_and_peak_memory():
    ceiling = gj.matmul_ceiling("float64", repeats=5, n=64)
    assert (ceiling["n"], ceiling["dtype"], ceiling["precision"]) == (64, "float64", "highest")
    # measured 8.4e9 float64 FLOP/s on this 2-core machine under load (median of 5)
    assert ceiling["flop_per_s"] > 8e8
    with pytest.raises(ValueError, match=r"`n` must be an int >= 1; received 0"):
        gj.matmul_ceiling(n=0)
    memory = gj.peak_memory()
    # a process that has imported jax: measured 0.27 GB
    assert 1e8 < memory["peak_rss_bytes"] <= gj.peak_rss()  # a peak never falls
    assert memory["peak_memory_bytes"] is None or memory["peak_memory_bytes"] > 0


def test_deviation_summary():
    summary = gj.deviation_summary([1e-15, 4e-15, 2e-15], steps=[10, 20, 30])
    assert summary == {
        "max_deviation": 4e-15,
        "median_deviation": 2e-15,
        "steps_mean": 20.0,
        "steps_max": 30,
        "lane_efficiency": pytest.approx(2 / 3, rel=1e-15),
    }
    assert gj.deviation_summary(np.array([3.0])) == {"max_deviation": 3.0, "median_deviation": 3.0}
    with pytest.raises(ValueError, match="`values` must hold at least one deviation"):
        gj.deviation_summary([])
    with pytest.raises(
        ValueError, match=r"`steps` must have one entry per value \(2\); received 3"
    ):
        gj.deviation_summary([1.0, 2.0], steps=[1, 2, 3])


def test_sample_keys_are_the_sweeps():
    gauge = gj.RescalingGauge((3,), 0.5)
    key = jax.random.key(7)
    keys = gj.sample_keys(key, 4)
    assert keys.shape == (4,)
    for i in range(4):  # the element the sweep drew for sample i, bit for bit
        ours, sweeps = gauge.sample(keys[i]), gj.lane_element(gauge, key, i)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(sweeps), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"`num_samples` must be an int >= 1; received 0"):
        gj.sample_keys(key, 0)


def test_use_compilation_cache_caches_every_program(tmp_path):
    config = jax.config
    before = (config.jax_compilation_cache_dir, config.jax_persistent_cache_min_compile_time_secs)
    try:
        assert gj.use_compilation_cache(tmp_path / "xla") == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # however short
        with pytest.raises(ValueError, match=r"`path` must name a folder .*received ''"):
            gj.use_compilation_cache("")
    finally:  # the test session's own cache (conftest) again
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
