"""Tests run in float64 on the CPU with strict dtype promotion (set here, never on import)."""

import gc
import os
import shutil
import tempfile
from importlib import metadata


os.environ.setdefault("JAX_PLATFORMS", "cpu")
# An exception raised while JAX traces (the refusal tests raise many on purpose) has its
# traceback filtered at every JAX API boundary it crosses, each frame's path compared by
# `os.path` calls: one refusal test took 7.4 s, 1.4 s unfiltered (2-core machine,
# 2026-12-06). Unfiltered, a failing test also shows every frame.
os.environ.setdefault("JAX_TRACEBACK_FILTERING", "off")
# The tests run small programs whose time is almost all XLA compilation: skip the backend's
# expensive optimisation passes (measured on the 2-core machine: test_contract + test_orbits
# 142 s -> 98 s, all passing). The arithmetic is the same IEEE float64; the subprocesses the
# tests start inherit the setting. JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs them fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# And XLA:CPU's compiler itself: its classic (non-MLIR) fusion emitters, and the LLVM module
# code-generated in one piece, not split over threads (the xdist workers already use every
# core). Measured on the 2-core machine, whole-process CPU seconds: benchmark_sweep's w1 sides
# 12.0 -> 7.3, the census `scale` check at tiny sizes 21.0 -> 11.6. Still IEEE float64 (no fast
# math); appended to any XLA_FLAGS of the caller, read when the CPU client starts (after this),
# inherited by the subprocesses the tests start. GAUGEJAX_TEST_XLA_FLAGS= (empty) drops them.
# Measured with jaxlib 0.10.x, whose XLA knows both flags (XLA aborts on a flag it does not
# know): other versions run without them unless GAUGEJAX_TEST_XLA_FLAGS names some.
_MEASURED = metadata.version("jaxlib").startswith("0.10.")
COMPILE_FLAGS = os.environ.get(
    "GAUGEJAX_TEST_XLA_FLAGS",
    "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
    if _MEASURED
    else "",
)
if COMPILE_FLAGS and COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COMPILE_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# A persistent compilation cache per test session, shared by its xdist workers, is opt-in:
# `GAUGEJAX_TEST_JAX_CACHE=session` makes a fresh folder in the controller (removed at the
# end, so no run reads another run's programs), a path uses that folder. It serves programs
# both workers build (measured: test_sweep + test_user_models + test_orbits in one process,
# 155 of 540 programs read, 78 -> 74 s of CPU), but it is off by default: once in a full-suite
# run (2026-12-05, jax 0.10.2 CPU) XLA's executable serialisation for the cache write
# (`executable.serialize()`) crashed a worker with a segmentation fault, in a test that passes
# alone. The test command must not depend on it.
_CACHE_ENV = "GAUGEJAX_TEST_JAX_CACHE"


def pytest_configure(config):
    if not hasattr(config, "workerinput") and os.environ.get(_CACHE_ENV) == "session":
        config._gaugejax_jax_cache = tempfile.mkdtemp(prefix="gaugejax-test-jax-cache-")
        os.environ[_CACHE_ENV] = config._gaugejax_jax_cache  # inherited by the workers
    if os.environ.get(_CACHE_ENV):
        jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    owned = getattr(config, "_gaugejax_jax_cache", None)
    if owned:
        shutil.rmtree(owned, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def tracing_gc():
    """Python's garbage collector as the CLI runs it (`gj.use_tracing_gc`): with the default
    thresholds a worker's full collections of its large heap (~1 s each) cost 31 s and 43 s
    of the two workers' time; 13 s in all with it, the suite 482 -> 462 s (2-core machine,
    2026-12-06). At the first test: collection has imported gaugejax (under the jaxtyping
    import hook) and the test modules, which are frozen with it."""
    import gaugejax as gj

    gj.use_tracing_gc()
    yield
    # After the last test, before an xdist worker reports that it has finished: one full
    # collection (the cyclic garbage's finalisers still run under pytest's unraisable-exception
    # hook), then the survivors frozen. pytest's own collections at the end of the session
    # would otherwise scan the worker's whole heap again, after the report, and xdist sends a
    # worker still busy 5 s after its shutdown request a SIGINT: "KeyboardInterrupt" ignored in
    # a gc callback, printed as a PytestUnraisableExceptionWarning under the passed tests
    # (both full runs in the tree, 2026-12-07; at the end of a run of three test files, two
    # full collections of 1.1 s each after the report).
    gc.collect()
    gc.freeze()


@pytest.fixture
def getkey():
    """A function returning a fresh key on each call (deterministic per test)."""
    key = [jax.random.key(0)]

    def _getkey():
        key[0], sub = jax.random.split(key[0])
        return sub

    return _getkey


def small_node(key, dim=3, rtol=1e-8):
    """A tanh-MLP neural ODE on [0, 1] used across the tests."""
    import diffrax

    import gaugejax as gj

    field = gj.MLPField(dim, 16, 2, key=key, out_scale=0.7)
    return gj.NeuralODE(
        field, t1=1.0, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol)
    )


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active. A program read from
    the session's persistent compilation cache (opt-in) counts too (the event spans the lookup)."""

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


def run_until_idle(cmd, *, idle_s: float = 60.0, poll_s: float = 0.5, **kwargs):
    """Run `cmd` (subprocess), failing it as hung once its CPU time (all threads, from
    /proc/<pid>/stat) has not grown for `idle_s` seconds: a hang guard that measures progress,
    not wall time, so a loaded machine (slow but progressing) never trips it, while a deadlock
    (threads idle in futex waits, CPU time flat) does. Returns `(returncode, stdout, stderr,
    hung)`."""
    import subprocess
    import time

    tick = os.sysconf("SC_CLK_TCK")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )

    def cpu() -> float:
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except (OSError, IndexError, ValueError):
            return -1.0

    last, since, hung = cpu(), time.monotonic(), False
    while proc.poll() is None:
        time.sleep(poll_s)
        now = cpu()
        if now > last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > idle_s:
            hung = True
            proc.kill()
            break
    out, err = proc.communicate()
    return proc.returncode, out, err, hung
