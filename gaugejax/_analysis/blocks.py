"""Blocks of lanes: the compiled program of one block, its cache, and the runner that feeds it.

A block of `chunk_size * chunks_per_block` samples per device is one compiled call: inside it
`lax.map(..., batch_size=chunk_size)` runs fixed-size vmapped chunks (memory bounded by
`chunk_size` lanes for any number of samples); over devices the block is split by
`jax.shard_map`, so each device runs its own solver loops (plain auto-sharding of a vmapped
while-loop would all-reduce every step). The host loops over blocks and keeps only per-sample
scalars. Compiled programs are kept per (plan, argument shapes) across sweeps.
"""

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import Array, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from .._infra.devices import check_cpu_pool, free_memory_bytes
from .lane import Plan, flat, lane, observe_reference


def replicate(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """`tree` replicated with `sharding`. Through host numpy: for a mesh that spans processes
    (`jax.distributed`) `device_put` accepts host values only, the same on every process."""

    def one(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = one(jax.random.key_data(a))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return jax.device_put(np.asarray(a), sharding)

    return jax.tree.map(one, tree)


def gather(out: PyTree) -> PyTree:
    """Host numpy copies of a block's outputs; from every process when the mesh spans several
    (each process then holds the whole result)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(out)):
        return jax.device_get(out)
    return multihost_utils.process_allgather(out, tiled=True)


def sample_keys(key: PRNGKeyArray, num_samples: int) -> Array:
    """The keys a sweep draws its samples from: sample i's is `jax.random.fold_in(key, i)`.
    Another implementation drawing its gauge elements from these sees the same elements as
    `sweep(..., key=key)`, sample for sample (as the benchmark's baselines do).

    **Returns:** `num_samples` keys (a leading axis).

    **Raises:** `ValueError` when `num_samples` is not an int >= 1.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an int >= 1; received {num_samples!r}.")
    return _fold(key, jnp.arange(num_samples, dtype=jnp.uint32))


def _fold(key, indices):
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def run_block(plan: Plan, indices, key, params, inputs, reference, scale):
    """The metrics of the lanes `indices` (sample i drawn from `fold_in(key, i)`), in chunks of
    `plan.chunk_size` vmapped lanes, split over the plan's mesh when it has one."""

    def body(indices, key, params, inputs, reference, scale):
        keys = _fold(key, indices)  # as `sample_keys`, for these lanes
        return jax.lax.map(
            lambda k: lane(plan, k, params, inputs, reference, scale),
            keys,
            batch_size=plan.chunk_size,
        )

    if plan.mesh is None:
        return body(indices, key, params, inputs, reference, scale)
    return jax.shard_map(
        body,
        mesh=plan.mesh,
        in_specs=(P(plan.axis), P(), P(), P(), P(), P()),
        out_specs=P(plan.axis),
        check_vma=False,
    )(indices, key, params, inputs, reference, scale)


_block_jit = jax.jit(run_block, static_argnums=0)
_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 32
_EXECUTABLES_LOCK = threading.Lock()  # sweeps may run from several threads


def compiled_block(plan: Plan, *args) -> tuple[Callable, float]:
    """The compiled block program for `plan` and these argument shapes, and the seconds spent
    compiling it now (0.0 when an earlier sweep in this process already compiled it)."""
    leaves, treedef = jax.tree.flatten(args)
    signature = (plan, treedef, tuple((x.shape, str(x.dtype)) for x in leaves))
    with _EXECUTABLES_LOCK:
        if signature in _EXECUTABLES:
            _EXECUTABLES.move_to_end(signature)
            return _EXECUTABLES[signature], 0.0
    start = time.perf_counter()
    lowered = _block_jit.lower(plan, *args)
    if plan.mesh is not None:
        check_cpu_pool(list(plan.mesh.devices.flat), lowered.as_text())
    compiled = lowered.compile()
    with _EXECUTABLES_LOCK:
        _EXECUTABLES[signature] = compiled
        while len(_EXECUTABLES) > _MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    return compiled, time.perf_counter() - start


def program_bytes(compiled) -> int:
    """The device bytes a compiled program holds while it runs (per device when sharded)."""
    m = compiled.memory_analysis()
    if m is None:  # a backend without the analysis: nothing to compare
        return 0
    size = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(size - m.alias_size_in_bytes)


class Runner(NamedTuple):
    """Runs blocks of one sweep configuration (devices, mesh, block size) for any plan."""

    devices: list
    mesh: Any
    block: int
    progress: bool

    def _check_memory(self, plan: Plan, compiled, block: int, args, split) -> None:
        """Refuse a block program whose bytes (XLA's memory analysis: arguments, outputs and
        temporaries per device) exceed what each device can still allocate, naming the largest
        `chunk_size` that fits: the bytes are affine in the chunk (the lanes of one chunk run
        at once, the block's outputs scale with it), fitted from a second compile at half the
        chunk."""
        need = program_bytes(compiled)
        free = free_memory_bytes(self.devices)
        if free is None or need <= free:
            return
        chunk = plan.chunk_size
        per_chunk = block // chunk  # chunks per block (times the devices along the axis)
        fit = "not even chunk_size = 1 fits"
        if chunk >= 2:
            half = plan._replace(chunk_size=chunk // 2)
            first = jax.ShapeDtypeStruct((per_chunk * (chunk // 2),), jnp.uint32, sharding=split)
            with jax.default_matmul_precision(plan.precision):
                smaller = program_bytes(compiled_block(half, first, *args)[0])
            slope = max((need - smaller) / (chunk - chunk // 2), 1.0)
            largest = int((free - (need - slope * chunk)) // slope)
            if largest >= 1:
                fit = f"the largest chunk_size that fits is about {min(largest, chunk - 1)}"
        raise ValueError(
            f"`chunk_size` = {chunk} needs about {need / 2**20:.1f} MiB per device (XLA's "
            f"memory analysis of the block program: arguments, outputs, temporaries), more "
            f"than the {free / 2**20:.1f} MiB each device can still allocate; {fit} (fitted "
            f"from the program at chunk_size = {chunk} and {chunk // 2}). Expected a smaller "
            "`chunk_size` or `chunks_per_block`."
        )

    def reference(self, plan: Plan, params, inputs):
        """`(reference, identity deviation, all reference solves succeeded)` on the host."""
        with jax.default_matmul_precision(plan.precision):
            reference, noise, solved = observe_reference(plan, params, inputs)
        return reference, float(noise), bool(solved)

    def run(
        self, plan: Plan, params, inputs, reference, key, num_samples, desc, block=None,
        indices=None,
    ):  # fmt: skip
        """Per-sample metrics of `num_samples` samples (host numpy), compile and run time:
        samples `0 .. num_samples - 1`, or the sample indices `indices` (rebuilt from their
        keys, the same elements as in the sweep), in blocks of `block` (default the runner's)."""
        block = self.block if block is None else block
        # whole blocks: padding lanes draw the next samples, and their results are dropped
        padded = np.arange(-(-num_samples // block) * block, dtype=np.uint32)
        if indices is not None:
            padded[:num_samples] = np.asarray(indices, dtype=np.uint32)
        with jax.default_matmul_precision(plan.precision):
            scale = jnp.max(jnp.abs(flat(reference)))
            if self.mesh is not None:
                split = NamedSharding(self.mesh, P(plan.axis))
                key, params, inputs, reference, scale = replicate(
                    (key, params, inputs, reference, scale), NamedSharding(self.mesh, P())
                )
            else:
                split = jax.sharding.SingleDeviceSharding(self.devices[0])
            args = (key, params, inputs, reference, scale)
            first = jax.ShapeDtypeStruct((block,), jnp.uint32, sharding=split)
            compiled, compile_time = compiled_block(plan, first, *args)
            self._check_memory(plan, compiled, block, args, split)
        pieces, run_time = [], 0.0
        blocks = range(-(-num_samples // block))
        for b in tqdm(blocks, desc=desc, unit="block", disable=not self.progress):
            lanes = jax.device_put(padded[b * block : (b + 1) * block], split)
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(lanes, *args))
            run_time += time.perf_counter() - start
            pieces.append(gather(out))
        merged = {k: np.concatenate([p[k] for p in pieces])[:num_samples] for k in pieces[0]}
        return merged, compile_time, run_time
