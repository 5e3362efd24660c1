"""What a benchmark of a sweep measures: wall time with compilation apart (median of repeats),
peak memory, the FLOPs of a program from XLA's cost analysis, the device's matmul ceiling, and
the summary of per-sample deviations a side reports.

Timings are medians: one slow repeat (a scheduler hiccup, a page fault) moves a mean but not a
median. Every timed call is waited for with `jax.block_until_ready`, as JAX dispatches
asynchronously: without it a timer measures the dispatch, not the work.
"""

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _check_repeats(repeats: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be an int >= 1; received {repeats!r}.")


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """The median wall time in seconds of `repeats` calls of `fn()`, each waited for
    (`jax.block_until_ready`). Compile (or call) `fn` once before, to keep compilation apart.

    **Raises:** `ValueError` when `repeats` is not an int >= 1.
    """
    _check_repeats(repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class TimedProgram:
    """A compiled program's `compile_s` (lowering and compilation), `median_s` (the median of
    its timed runs), and its `output` (of one more run, after the timed ones)."""

    compile_s: float
    median_s: float
    output: Any


def time_program(fn: Callable, *args: Any, repeats: int) -> TimedProgram:
    """`jax.jit(fn)` on `args`: compiled ahead of time (its compile time measured apart), then
    run `repeats` times (`median_time`) and once more for its output. Call it inside
    `jax.default_matmul_precision(...)` to time a precision other than the default.

    **Returns:** a `TimedProgram`.

    **Raises:** `ValueError` when `repeats` is not an int >= 1.
    """
    _check_repeats(repeats)
    start = time.perf_counter()
    program = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    median_s = median_time(lambda: program(*args), repeats)
    return TimedProgram(compile_s, median_s, jax.device_get(program(*args)))


def peak_rss() -> int:
    """This process's peak resident set in bytes: `VmHWM` where Linux reports it (`ru_maxrss`
    also counts the parent's RSS at fork, which Linux carries across exec), else `ru_maxrss`."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: jax.Device | None = None) -> dict:
    """Peaks since the process started: `peak_memory_bytes`, the device's (default: the first;
    None where the backend keeps none, as the CPU does), and `peak_rss_bytes` (`peak_rss`)."""
    stats = (device or jax.devices()[0]).memory_stats() or {}
    return {"peak_memory_bytes": stats.get("peak_bytes_in_use"), "peak_rss_bytes": peak_rss()}


def program_flops(fn: Callable, *args: Any) -> float:
    """The FLOPs of `jax.jit(fn)` on `args` from XLA's cost analysis of the compiled program.

    Count straight-line programs: a loop's body is counted once, whatever its trip count.
    Matmuls, adds and multiplies count; transcendentals (tanh, sin) are not FLOPs in XLA's
    count. Call it inside `jax.default_matmul_precision(...)` to count the program timed.

    **Raises:** `ValueError` when XLA reports no FLOP count for the program.
    """
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # older jax: one per module
    if not cost or "flops" not in cost:
        raise ValueError(f"XLA's cost analysis of `fn` has no FLOP count; received {cost!r}.")
    return float(cost["flops"])


def matmul_ceiling(
    dtype: str = "float64",
    precision: str = "highest",
    *,
    repeats: int = 5,
    n: int | None = None,
    device: jax.Device | None = None,
) -> dict:
    """The measured FLOP/s ceiling of a device: an `n x n` matmul (`2 n^3` FLOPs) in `dtype`
    and `precision`, the median of `repeats` runs after a compiled warm-up.

    **Arguments:**

    - `dtype`, `precision`: those of the program compared against the ceiling.
    - `repeats`: timed runs (>= 1).
    - `n`: the size (default 1024 on a CPU, 8192 on an accelerator: large enough to be
      compute-bound, small enough to take well under a second).
    - `device`: the device (default: the first).

    **Returns:** `{"flop_per_s", "n", "dtype", "precision"}`.

    **Raises:** `ValueError` when `n` or `repeats` is not an int >= 1.
    """
    _check_repeats(repeats)
    device = device or jax.devices()[0]
    n = (1024 if device.platform == "cpu" else 8192) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1; received {n!r}.")
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    with jax.default_matmul_precision(precision):
        program = jax.jit(lambda x: x @ x).lower(a).compile()
    jax.block_until_ready(program(a))
    seconds = median_time(lambda: program(a), repeats)
    return {"flop_per_s": 2.0 * n**3 / seconds, "n": n, "dtype": dtype, "precision": precision}


def deviation_summary(values: Any, steps: Any = None) -> dict:
    """The per-sample deviations a benchmark side reports: `max_deviation`, `median_deviation`,
    and with the samples' solver `steps`, `steps_mean`, `steps_max` and `lane_efficiency`
    (vmapped lanes step together: the batch runs the most steps, each lane needs its own; the
    mean over the max is the fraction of the work each lane needed).

    **Raises:** `ValueError` when `values` is empty, or `steps` does not have one entry per
    value.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("`values` must hold at least one deviation; received none.")
    out = {"max_deviation": float(np.max(values)), "median_deviation": float(np.median(values))}
    if steps is not None:
        steps = np.asarray(steps)
        if steps.size != values.size:
            raise ValueError(
                f"`steps` must have one entry per value ({values.size}); received {steps.size}."
            )
        out["steps_mean"] = float(np.mean(steps))
        out["steps_max"] = int(np.max(steps))
        out["lane_efficiency"] = float(np.mean(steps) / max(np.max(steps), 1))
    return out
