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
from .lane import Plan, host_flat, lane, observe_reference


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


# the key stream of a block's lanes: the sweep's own samples, or its control (apart from them)
SAMPLES, CONTROL = 0, 2**31 - 1
# per lane, a draw from the lane's key for the re-check's random half (in the block program:
# no eager program on the host, and the same draw whatever the chunk or block sizes)
DRAW = 2**31 - 2


def run_block(plan: Plan, indices, key, stream, params, inputs, reference, scale):
    """The metrics of the lanes `indices` (sample i drawn from `fold_in(key, i)`, or from
    `fold_in(fold_in(key, stream), i)` for a `stream` other than `SAMPLES`), in chunks of
    `plan.chunk_size` vmapped lanes, split over the plan's mesh when it has one; each lane also
    returns `draw`, a uniform uint32 of its key."""

    def body(indices, key, stream, params, inputs, reference, scale):
        data = jax.random.key_data(key)
        other = jax.random.key_data(jax.random.fold_in(key, stream))
        key = jax.random.wrap_key_data(
            jnp.where(stream == SAMPLES, data, other), impl=jax.random.key_impl(key)
        )
        keys = _fold(key, indices)  # as `sample_keys`, for these lanes

        def one(k):
            out = lane(plan, k, params, inputs, reference, scale)
            return {**out, "draw": jax.random.bits(jax.random.fold_in(k, DRAW), dtype=jnp.uint32)}

        return jax.lax.map(one, keys, batch_size=plan.chunk_size)

    if plan.mesh is None:
        return body(indices, key, stream, params, inputs, reference, scale)
    return jax.shard_map(
        body,
        mesh=plan.mesh,
        in_specs=(P(plan.axis), P(), P(), P(), P(), P(), P()),
        out_specs=P(plan.axis),
        check_vma=False,
    )(indices, key, stream, params, inputs, reference, scale)


_block_jit = jax.jit(run_block, static_argnums=0)
_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 32
_EXECUTABLES_LOCK = threading.Lock()  # sweeps may run from several threads


def _signature(plan: Plan, args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return (plan, treedef, tuple((x.shape, str(x.dtype)) for x in leaves))


def is_compiled(plan: Plan, *args) -> bool:
    """Whether the block program for `plan` and these argument shapes is cached."""
    with _EXECUTABLES_LOCK:
        return _signature(plan, args) in _EXECUTABLES


def compiled_block(plan: Plan, *args) -> tuple[Callable, float]:
    """The compiled block program for `plan` and these argument shapes, and the seconds spent
    compiling it now (0.0 when an earlier sweep in this process already compiled it)."""
    signature = _signature(plan, args)
    with _EXECUTABLES_LOCK:
        if signature in _EXECUTABLES:
            _EXECUTABLES.move_to_end(signature)
            return _EXECUTABLES[signature], 0.0
    start = time.perf_counter()
    lowered = _block_jit.lower(plan, *args)
    if plan.mesh is not None:
        check_cpu_pool(list(plan.mesh.devices.flat), lowered.as_text())
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    with _EXECUTABLES_LOCK:
        _EXECUTABLES[signature] = compiled
        while len(_EXECUTABLES) > _MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    return compiled, seconds


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
        """`(reference, its scale, identity deviation, all reference solves succeeded)`: the
        reference outputs as arrays, the rest host numbers (one program: the reference's plan
        without the chunk and mesh, which it does not depend on)."""
        with jax.default_matmul_precision(plan.precision):
            reference, scale, noise, solved = observe_reference(
                plan.without_blocks(), params, inputs
            )
        return reference, float(scale), float(noise), bool(solved)

    def _arguments(self, plan: Plan, params, inputs, reference, key, stream):
        """The block program's arguments after the lane indices, and the indices' sharding.
        The scale and stream are host numpy (an eager `jax.numpy` op would be a program of
        its own)."""
        scale = np.max(np.abs(host_flat(reference)))
        args = (key, np.uint32(stream), params, inputs, reference, scale)
        if self.mesh is None:
            return args, jax.sharding.SingleDeviceSharding(self.devices[0])
        return replicate(args, NamedSharding(self.mesh, P())), NamedSharding(
            self.mesh, P(plan.axis)
        )

    def side(
        self, plan: Plan, params, inputs, reference, key, num: int, blocks: int,
        stream: int = SAMPLES,
    ) -> tuple[Plan, int]:  # fmt: skip
        """The plan and block size to run `num` lanes of `plan` beside the sweep's own `blocks`
        blocks (the re-check, the control): a block of their own size (one chunk of at most
        `num` lanes per device), unless the sweep was one block, its program is compiled and
        the own-size one is not: a small sweep runs them in its block rather than compile a
        program (a large one would pay its block for a few lanes: the re-check at `dt0 / 8` in
        a whole block of 128 lanes cost as much as a 1024-sample W2 sweep's blocks)."""
        shards = 1 if self.mesh is None else int(self.mesh.shape[plan.axis])
        per_device = -(-num // shards)
        chunk = min(plan.chunk_size, per_device)
        own = chunk * -(-per_device // chunk) * shards
        if own >= self.block:
            return plan, self.block
        own_plan = plan._replace(chunk_size=chunk)
        if blocks > 1:
            return own_plan, own
        args, split = self._arguments(plan, params, inputs, reference, key, stream)

        def compiled(p, size):
            first = jax.ShapeDtypeStruct((size,), jnp.uint32, sharding=split)
            return is_compiled(p, first, *args)

        if compiled(own_plan, own) or not compiled(plan, self.block):
            return own_plan, own
        return plan, self.block

    def run(
        self, plan: Plan, params, inputs, reference, key, num_samples, desc, block=None,
        indices=None, stream=SAMPLES,
    ):  # fmt: skip
        """Per-sample metrics of `num_samples` samples (host numpy), compile and run time:
        samples `0 .. num_samples - 1`, or the sample indices `indices` (rebuilt from their
        keys, the same elements as in the sweep), of the key `stream` (`SAMPLES` or
        `CONTROL`), in blocks of `block` (default the runner's)."""
        block = self.block if block is None else block
        # whole blocks: padding lanes draw the next samples, and their results are dropped
        padded = np.arange(-(-num_samples // block) * block, dtype=np.uint32)
        if indices is not None:
            padded[:num_samples] = np.asarray(indices, dtype=np.uint32)
        with jax.default_matmul_precision(plan.precision):
            args, split = self._arguments(plan, params, inputs, reference, key, stream)
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
