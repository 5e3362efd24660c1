"""CPU devices for sharded sweeps: one per core, and the one hazard of several in a process.

XLA:CPU runs every CPU device of a process on one intra-op thread pool, sized when the CPU
client starts: `NPROC` when that variable is set, else the schedulable cores (measured: with
`NPROC=4` the pool has 4 threads, without it 2 on this project's 2-core machines). jaxlib's
batched LAPACK kernels (LU, SVD, eigendecompositions: the `lapack_*_ffi` custom calls that
`jnp.linalg` lowers to, e.g. a vmapped `jnp.linalg.norm(A, ord=2)` or `jnp.linalg.solve`) split
their batch into tasks on that pool and wait for them on the pool thread that runs the kernel.
When every pool thread holds such a kernel, the tasks never run: the process hangs with all
threads idle (a native stack shows each thread in `jax::ParallelBatchMap`'s wait). Kernels
that can run at once: one per device and independent chain. D devices on a pool of P <= D
threads hang once each kernel's batch is large (8 lanes per device hung W1 on 2 devices and 2
threads; 2 lanes did not); one device hangs when its program has P independent chains (the
README's single-device reproducer: two chains, 2 threads; it returns with `NPROC=4`; the
control of a GPT-2-sized `DecoderGauge`, with QR factorisations of several independent element
parts, hung one device on a pool of 3). `configure_cpu_devices` sizes the pool for
`KERNELS_PER_DEVICE` kernels per device plus as many more (idle pool threads cost nothing
measurable); `sweep` refuses a sharded program with LAPACK kernels on a pool no larger than its
device count, instead of hanging.
"""

import functools
import gc
import os
import re
from importlib import metadata

import jax


# batched LAPACK kernels that may wait at once per CPU device, which the pool must outnumber
KERNELS_PER_DEVICE = 4


def pool_threads_for(num_devices: int) -> int:
    """The intra-op pool `configure_cpu_devices` asks for: `KERNELS_PER_DEVICE * (n + 1)`."""
    return KERNELS_PER_DEVICE * (num_devices + 1)


def intra_op_threads() -> int:
    """The threads of XLA:CPU's intra-op pool, as XLA sizes it when the CPU client starts:
    `NPROC` if set to a positive int, else the cores this process may run on.

    **Returns:** the thread count (an estimate when `NPROC` changed after JAX started).
    """
    value = os.environ.get("NPROC", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return _cores()


def configure_cpu_devices(num_devices: int | None = None) -> int:
    """Expose `num_devices` CPU devices (default: one per core) for `sweep` to shard over, with
    an intra-op pool of at least `pool_threads_for(num_devices)` threads (`NPROC`; never fewer
    than it has), so several batched LAPACK kernels per device can wait at once without a
    deadlock (module docstring). Call it right after `import jax`, before any JAX operation, as
    `jax.config.update("jax_num_cpu_devices", ...)` requires.

    **Arguments:**

    - `num_devices`: positive int, or None for the number of cores this process may use.

    **Returns:** the number of CPU devices configured.

    **Raises:** `ValueError` for a `num_devices` that is not a positive int; `RuntimeError`
    when JAX's backends have already started (then neither setting is changed).
    """
    n = _cores() if num_devices is None else num_devices
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"`num_devices` must be a positive int or None; received {n!r}.")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:
        raise RuntimeError(
            f"configure_cpu_devices({num_devices!r}) must run before any JAX operation (JAX's "
            f"backends have started: {e}). Call it right after `import jax`."
        ) from None
    # the pool is sized when the CPU client starts, i.e. at the first JAX operation after this
    os.environ["NPROC"] = str(max(intra_op_threads(), pool_threads_for(n)))
    return n


def _cores() -> int:
    """The cores this process may run on (what XLA counts when `NPROC` is unset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_cpu_pool(devices: list, program: str) -> None:
    """Refuse to run `program` (StableHLO or HLO text) sharded over `devices` when it holds
    batched LAPACK kernels and this process's CPU devices among them are at least as many as
    the intra-op pool's threads: it could hang (module docstring).

    **Arguments:**

    - `devices`: the devices the program is sharded over; `program`: its text.

    **Raises:** `ValueError` naming `devices`, the pool size and the remedies.
    """
    local = [d for d in devices if d.platform == "cpu" and d.process_index == jax.process_index()]
    threads = intra_op_threads()
    if len(local) < 2 or len(local) < threads or "lapack_" not in program:
        return
    kernels = sorted(set(re.findall(r"lapack_\w+", program)))
    raise ValueError(
        f"`devices`: {len(local)} CPU devices of this process share XLA:CPU's intra-op pool "
        f"of {threads} threads, and this program holds batched LAPACK kernels "
        f"({', '.join(kernels[:4])}) that wait on that pool: with as many devices as threads "
        "the sweep can hang. Expected fewer devices than pool threads; set NPROC to at least "
        f"{len(local) + 1} before JAX starts (gaugejax.configure_cpu_devices({len(local)}) "
        "right after `import jax` does both), or pass fewer devices."
    )


def free_memory_bytes(devices: list) -> int | None:
    """The bytes each of `devices` can still allocate: the smallest `bytes_limit -
    bytes_in_use` of their memory statistics (GPUs, TPUs); for CPU devices, which share the
    host's memory, the host's available memory (`MemAvailable`, Linux) over the number of this
    process's CPU devices among them.

    **Arguments:**

    - `devices`: a non-empty list of jax devices.

    **Returns:** the bytes, or None where the backend keeps no statistics and the host does not
    report its available memory.
    """
    local = [d for d in devices if d.process_index == jax.process_index()]
    free = []
    for d in local:
        stats = d.memory_stats() or {}
        if "bytes_limit" in stats:
            free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    cpus = [d for d in local if d.platform == "cpu"]
    if cpus:
        available = _host_available_bytes()
        if available is not None:
            free.append(available // len(cpus))
    return min(free) if free else None


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# lanes vmapped together by default, per platform. CPU: measured with `benchmark_sweep`'s
# workloads (B = 512, one pinned core of the 2-core development machine, 2026-12-06: samples/s
# at chunks of 8/16/32/64/128/256 were W1 614/715/784/744/732/702, W2 276/326/343/335/340/344,
# W3 881/902/831/818/867/850): 32 is within 8 % of the best on each, where small chunks lose
# up to 20 % (W1 at 8). Accelerators: not measured yet (no device lent); a GPU runs a chunk's
# lanes in parallel, so a larger chunk, bounded by the memory check.
DEFAULT_CHUNK_SIZE = {"cpu": 32}
ACCELERATOR_CHUNK_SIZE = 1024


def default_chunk_size(devices: list) -> int:
    """The `chunk_size` a sweep uses on `devices` when none is given: `DEFAULT_CHUNK_SIZE` for
    their platform (measured), `ACCELERATOR_CHUNK_SIZE` for another (GPU, TPU).

    **Arguments:** `devices`: the jax devices of the sweep.
    """
    platform = devices[0].platform
    return DEFAULT_CHUNK_SIZE.get(platform, ACCELERATOR_CHUNK_SIZE)


def supports_float64(device) -> bool:
    """Whether `device` computes in float64: x64 is on (`jax_enable_x64`; without it JAX makes
    every float64 array float32) and a float64 program compiles for the device's backend.

    **Arguments:**

    - `device`: a jax device.

    **Returns:** True or False (CPU and GPU backends compute in float64; another backend is
    probed once per process by compiling a float64 program).
    """
    return bool(jax.config.jax_enable_x64) and _compiles_float64(device.platform)


# backends known to compute in float64: no probe program compiled for them
FLOAT64_PLATFORMS = ("cpu", "cuda", "rocm", "gpu")


@functools.cache
def _compiles_float64(platform: str) -> bool:
    if platform in FLOAT64_PLATFORMS:
        return True
    device = jax.devices(platform)[0]
    spec = jax.ShapeDtypeStruct((2,), "float64", sharding=jax.sharding.SingleDeviceSharding(device))
    try:
        jax.jit(lambda x: x * x + 1.0).lower(spec).compile()
    except Exception:  # the backend refuses F64 (its message varies by backend and version)
        return False
    return True


# XLA:CPU compiler flags that cut compile time and keep the arithmetic IEEE float64 (no fast
# math): the classic (non-MLIR) fusion emitters, and each LLVM module code-generated in one
# piece. Measured with jaxlib 0.10.x, whose XLA knows both (XLA aborts on a flag it does not
# know, so other versions get none of them).
FAST_COMPILE_XLA_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)


def fast_compile_xla_flags() -> str:
    """`FAST_COMPILE_XLA_FLAGS` joined where this jaxlib's XLA was measured to know them
    (0.10.x), else the empty string."""
    return (
        " ".join(FAST_COMPILE_XLA_FLAGS) if metadata.version("jaxlib").startswith("0.10.") else ""
    )


def use_fast_compile() -> str:
    """Compile this process's XLA programs for compile time rather than run time: for work
    that compiles many programs and runs each briefly (checks, small sweeps), where the
    compiler's optimisation passes cost more than they save. JAX's
    `jax_disable_most_optimizations` (XLA's backend optimisation level 0, LLVM's expensive
    passes off) from now on, and `fast_compile_xla_flags()` appended to `XLA_FLAGS`, which XLA
    reads when its CPU client starts: call this before any JAX operation for both (later, only
    the first applies). Both are inherited by child processes through the environment. The
    arithmetic stays IEEE float64, but fused differently: results can move in the last bits.
    Measured (2-core CPU, 2026-12-06): the `linear_symmetry` experiment 74.5 s -> 36.0 s, its
    XLA compile time 93 s -> 19 s (compiles on several threads), every claim unchanged.

    **Returns:** the `XLA_FLAGS` now set.
    """
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    flags = os.environ.get("XLA_FLAGS", "")
    extra = fast_compile_xla_flags()
    if extra and extra not in flags:
        flags = f"{flags} {extra}".strip()
        os.environ["XLA_FLAGS"] = flags
    return flags


# Python's cyclic garbage collector for a process that traces many programs: JAX's tracing and
# lowering make and drop millions of small objects, and at the default thresholds (700, 10, 10)
# the collector keeps rescanning the ever larger heap of compiled-program caches.
TRACING_GC_THRESHOLDS = (100_000, 50, 1000)


def use_tracing_gc() -> tuple[int, int, int]:
    """Collect this process's cyclic garbage less often, for work that traces many programs:
    what exists now (the imports) is collected once and frozen (never scanned again, as
    `gc.freeze`), and the youngest generation is collected every 100000 net allocations
    instead of 700 (`TRACING_GC_THRESHOLDS`). Garbage is still collected, only less often; the
    numbers computed are unchanged. Measured (2-core CPU, 2026-12-06): the `node_symmetry`
    smoke run 25.3 s -> 20.0 s; the test suite's full collections, 31 s and 43 s of its two
    workers' time, 13 s in all, at the same peak memory. Called again (the thresholds already
    set) it does nothing: no second full collection.

    **Returns:** the thresholds now set (`gc.get_threshold()`).
    """
    if gc.get_threshold() == TRACING_GC_THRESHOLDS:
        return TRACING_GC_THRESHOLDS
    gc.collect()
    gc.freeze()
    gc.set_threshold(*TRACING_GC_THRESHOLDS)
    return gc.get_threshold()


def use_compilation_cache(path: str | os.PathLike) -> str:
    """Cache every compiled XLA program of this process in the folder `path`: a later process
    running the same programs reads them from disk instead of compiling them again. JAX caches
    only programs whose compile took at least a second by default; a research run compiles
    many short ones (a smoke run of an experiment: ~100 programs of ~0.05 s each; measured, a
    cached gauge_fixing smoke run 16.2 s -> 13.2 s), so here every program is cached. Leave it
    off where compile times are measured (they would be read from disk).

    **Returns:** the folder, as JAX's config holds it.

    **Raises:** `ValueError` when `path` is empty.
    """
    folder = os.fspath(path)
    if not folder:
        raise ValueError("`path` must name a folder for the compilation cache; received ''.")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
