"""Benchmark of the sweep engine against the paths a user would write, side by side in one
process (the project's benchmark protocol: compile once and report compile time apart,
`block_until_ready`, median of repeats, same solver, step count and precision on every side).

Workloads (the design notes' W1-W3, issue 12):

- `w1`: a linear neural ODE, d = 16, `w(t) = W0 + sin(pi t) W1`, `b(t) = b0 + cos(pi t) b1`,
  and finite gauges `LinearGauge` (one mode, `G = expm(sin(pi t/T) A)`, `c = sin(pi t/T) c0`),
  classic RK4 with 100 fixed steps; the deformed ODE is really integrated. `LinearGauge`
  normalises `A` by its spectral norm (`|A|_2 = rho u`, u ~ U(1/4, 1)) instead of W1's
  `0.3 N(0, 1)/sqrt(d)`.
- `w2`: a tanh-MLP neural ODE (d = 16, width 64) under infinitesimal Lie deformations with
  boundary-vanishing generators: the first-order output response per sample (zero for a
  symmetry), Tsit5 with 100 fixed steps.
- `w3`: `w2` with a PID controller at rtol = atol = `w3_rtol`; lane efficiency (mean / max
  steps per lane) and the per-lane step counts are recorded.

Sides (a row per workload, batch size and side):

- `gaugejax`: `gj.sweep` (fixed chunks of `chunk_size`; first-order responses from the forward
  sensitivity system, under error control).
- `gaugejax_sharded`: the same sweep under `jax.shard_map` over every device (over a mesh of
  one on a single GPU: the sharded path's overhead; over N CPU devices with
  `python -m experiments benchmark_sweep --cpu-devices N`). Its "gaugejax x" column is the
  unsharded rate over the sharded one.
- `naive_diffrax`: what a user writes without gaugejax's sweep: `jit(vmap(...))` over all B
  samples of `diffrax.diffeqsolve` of the transformed model's field (w1), or of `jax.jvp`
  through that solve (w2, w3: the tangent is then not under error control, and on w3 its error
  is the solver's, not the symmetry's: compare `max_deviation`).
- `torchdiffeq` (with the `bench` extra): w1 as batched tensors (`torch.linalg.matrix_exp`,
  `torch.func.jvp` for dG/dt, `torchdiffeq.odeint` with `method="rk4"`, which is the 3/8 rule,
  not the classic tableau: per-sample deviations agree to the O(dt^4) truncation, not to
  rounding); w2/w3 as the hand-written forward sensitivity system on batched tensors (w2:
  torchdiffeq has no Tsit5, so its fixed-step `rk4` with the same steps; w3: its adaptive
  `dopri5` at the same tolerances, one step size for the whole batch).
- `gradsolve` (with the `bench` extra): its fixed-step engines through its problem protocol
  (w1: classic RK4, per-sample agreement to rounding; w2: fixed-step Tsit5 and a jvp through
  its scan; w3 is not expressible: the row says why).

Known problem (jaxlib 0.10.2, CPU): batched LAPACK kernels wait on XLA:CPU's intra-op pool
and deadlock when they occupy all of its threads (`gj.configure_cpu_devices`): a vmapped loop
body with two independent "inner loop -> LU solve" chains on a 2-thread pool (README: a pure-JAX
reproducer), or one kernel per device on as many CPU devices as threads. The CLI sizes the pool
(`NPROC`) for two kernels per device; the w1 lane also fuses its weight and bias into one solve
(`GaugedLinearField`).

Op count (what each side computes, not one "useful work" for all): the
FLOPs of one evaluation of the workload's vector field on one sample's M inputs, from XLA's
cost analysis (`field_flops`), over M, times the side's own field evaluations per sample,
summed over its M inputs (`gj.count_evaluations` for the JAX sides: 4 per RK4 step, 6 per
Tsit5 step plus one at the start, rejected steps included on w3; counted calls for torch;
gradsolve reports none, so its rows use gaugejax's count: `op_count` says which). A side that
takes fewer steps (w3's naive jvp, torch's RK4 on w2) is credited with fewer FLOPs. The
ceiling is a measured square matmul on the same device, dtype and precision
(`matmul_ceiling`, in `env["ceiling"]`); `ceiling_fraction` is the ratio.

This is a benchmark, not a check: it has no claims; rows go to `results.json`, `summary.json`
(`env`, `rows`, the Markdown `table`) and `figures/throughput.png`.
"""

import dataclasses
import importlib.metadata
import importlib.util
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import gaugejax as gj
from gaugejax import PRECISIONS, REDUCED_PRECISIONS, io

from ._common import plain_log_ticks, pyplot


WORKLOADS = ("w1", "w2", "w3")
SIDES = ("gaugejax", "gaugejax_sharded", "naive_diffrax", "torchdiffeq", "gradsolve")
# compile times are measured: the CLI leaves the persistent compilation cache off for this module
PERSISTENT_COMPILE_CACHE = False
# and exposes one CPU device per core unless --cpu-devices says otherwise: the sharded side then
# uses every core (measured on 2 cores: W1 1.64x, W2 1.12x over one device; `sharded-2dev/`),
# the unsharded sides run on the first device as before
CPU_DEVICES = "auto"


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `benchmark_sweep` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    workloads: tuple[str, ...] = WORKLOADS
    sides: tuple[str, ...] = SIDES
    batch_sizes: tuple[int, ...] = (1024,)
    chunk_size: int = 256
    repeats: int = 5
    precision: str = "highest"
    dtype: str = "float64"
    # w1
    w1_dim: int = 16
    w1_inputs: int = 8
    w1_steps: int = 100
    w1_rho: float = 0.6
    # w2 / w3
    w2_dim: int = 16
    w2_width: int = 64
    w2_inputs: int = 8
    w2_steps: int = 100
    w3_rtol: float = 1e-6
    # torch threads for the torchdiffeq side (0: torch's default)
    torch_threads: int = 0
    # the other sides run only up to this many samples (0: at every batch size); the naive
    # side vmaps all of them at once, and the GPU preset's largest B would dominate its time
    baseline_max_samples: int = 0

    NONNEGATIVE: ClassVar[tuple[str, ...]] = ("torch_threads", "baseline_max_samples")

    def __post_init__(self):
        for name, valid in (("workloads", WORKLOADS), ("sides", SIDES)):
            chosen = getattr(self, name)
            if not chosen or any(v not in valid for v in chosen):
                raise ValueError(
                    f"`{name}` must be a non-empty list from {list(valid)}; received "
                    f"{list(chosen)}."
                )
        if not self.batch_sizes or any(
            isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in self.batch_sizes
        ):
            raise ValueError(
                f"`batch_sizes` must be a non-empty list of ints > 0; received "
                f"{list(self.batch_sizes)}."
            )
        for name in ("chunk_size", "repeats", "w1_dim", "w1_inputs", "w1_steps", "w2_dim",
                     "w2_width", "w2_inputs", "w2_steps"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0; received {getattr(self, name)}.")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"`dtype` must be 'float32' or 'float64'; received {self.dtype!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"`precision` must be one of {list(PRECISIONS)}; received {self.precision!r}."
            )
        if self.dtype == "float64":  # before a run directory exists or anything is measured
            lacking = sorted({d.platform for d in jax.devices() if not gj.supports_float64(d)})
            if lacking:
                raise ValueError(
                    f"`dtype` = 'float64', but the {', '.join(lacking)} devices do not compute "
                    "in float64 (x64 off, or the backend lacks it); expected dtype = 'float32'."
                )
        elif self.precision in REDUCED_PRECISIONS:
            warnings.warn(
                f"`precision` = {self.precision!r} with float32: matmuls on GPUs and TPUs then "
                f"round to about {REDUCED_PRECISIONS[self.precision]:.0e} relative, so the "
                "max_deviation column measures the rounding, not the solve (its floor rises to "
                "~1e-3); 'highest' keeps float32's own floor.",
                stacklevel=2,
            )
        if not 0 < self.w3_rtol < 1:
            raise ValueError(f"`w3_rtol` must be in (0, 1); received {self.w3_rtol}.")
        if self.torch_threads < 0:
            raise ValueError(f"`torch_threads` must be >= 0; received {self.torch_threads}.")


PRESETS = {
    "default": {},
    # tiny sizes: checks that every side runs and agrees (the suite runs it), not a measurement
    "smoke": {
        "batch_sizes": [4],
        "chunk_size": 2,
        "repeats": 1,
        "w1_dim": 3,
        "w1_steps": 10,
        "w2_dim": 2,
        "w2_width": 4,
        "w2_steps": 10,
        "w3_rtol": 1e-4,
        "baseline_max_samples": 4,
    },
    # on a GPU: python -m experiments benchmark_sweep --config configs/benchmark_sweep/gpu.toml
    "gpu": {
        "batch_sizes": [1000, 10000, 100000, 1000000],
        "chunk_size": 100000,
        "dtype": "float32",
        "repeats": 3,
        "baseline_max_samples": 100000,
    },
}


class Workload(eqx.Module):
    """One workload: the model, the gauge family, the inputs, and its raw arrays (for the
    torch side)."""

    model: eqx.Module
    gauge: gj.AbstractGauge
    inputs: jax.Array
    arrays: dict


def _w1_workload(cfg: Config, key) -> Workload:
    kw, kb, kx = jax.random.split(key, 3)
    d = cfg.w1_dim
    W0, W1 = jax.random.normal(kw, (2, d, d)) / np.sqrt(d)
    b0, b1 = jax.random.normal(kb, (2, d))
    # FourierBasis(T, 1) is (1, cos(pi t/T), sin(pi t/T)): W1 rides on sin, b1 on cos
    field = gj.BasisLinearField(
        gj.FourierBasis(1.0, 1),
        jnp.stack([W0, jnp.zeros_like(W0), W1]),
        jnp.stack([b0, b1, 0 * b1]),
    )
    model = gj.LinearNODE(
        field,
        t1=1.0,
        solver=gj.RK4(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=1.0 / cfg.w1_steps,
    )
    gauge = gj.LinearGauge(d, 1.0, num_modes=1, rho=cfg.w1_rho, bias_scale=0.3)
    arrays = {"W0": W0, "W1": W1, "b0": b0, "b1": b1}
    return Workload(model, gauge, jax.random.normal(kx, (cfg.w1_inputs, d)), arrays)


def _w2_workload(cfg: Config, key, adaptive: bool) -> Workload:
    km, kg, kx = jax.random.split(key, 3)
    field = gj.MLPField(cfg.w2_dim, cfg.w2_width, 2, key=km, out_scale=0.7)
    if adaptive:
        controller = diffrax.PIDController(rtol=cfg.w3_rtol, atol=cfg.w3_rtol)
        options = dict(stepsize_controller=controller)
    else:
        options = dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=1.0 / cfg.w2_steps)
    model = gj.NeuralODE(field, t1=1.0, solver=diffrax.Tsit5(), **options)
    gauge = gj.LieDeformationGauge(cfg.w2_dim, 1.0, key=kg)
    return Workload(model, gauge, jax.random.normal(kx, (cfg.w2_inputs, cfg.w2_dim)), {})


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _workload(cfg: Config, name: str, key) -> Workload:
    w = _w1_workload(cfg, key) if name == "w1" else _w2_workload(cfg, key, name == "w3")
    dtype = jnp.dtype(cfg.dtype)

    def cast(tree):
        return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)

    return Workload(cast(w.model), cast(w.gauge), cast(w.inputs), cast(w.arrays))


def _sample_keys(key, num_samples: int):
    """Sample i's key, as `gj.sweep` draws it (`fold_in(key, i)`): every side sees the same
    gauge elements."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples, dtype=jnp.uint32))


def _memory() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return {
        # the device's peak since the process started (None where the backend keeps none, CPU)
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),
        # the process's peak resident set (cumulative over the run's rows)
        "peak_rss_bytes": _peak_rss(),
    }


def _peak_rss() -> int:
    """This address space's peak RSS: VmHWM where Linux reports it (`ru_maxrss` also counts the
    parent's RSS at fork, which Linux carries across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _deviations(values, steps=None) -> dict:
    values = np.asarray(values, dtype=float)
    out = {
        "max_deviation": float(np.max(values)),
        "median_deviation": float(np.median(values)),
    }
    if steps is not None:
        steps = np.asarray(steps)
        out["steps_mean"] = float(np.mean(steps))
        out["steps_max"] = int(np.max(steps))
        # the vmapped lanes step together: the batch runs max steps, each lane needs its own
        out["lane_efficiency"] = float(np.mean(steps) / max(np.max(steps), 1))
    return out


def _gaugejax(
    cfg: Config, w: Workload, key, num_samples: int, sharded: bool
) -> tuple[dict, np.ndarray]:
    # unsharded: the first device; sharded: `jax.shard_map` over every device (also over one,
    # so the sharded path's overhead is measured on a single GPU)
    devices = jax.devices() if sharded else jax.devices()[:1]
    chunk = min(cfg.chunk_size, -(-num_samples // len(devices)))
    kwargs = dict(key=key, num_samples=num_samples, chunk_size=chunk, precision=cfg.precision)
    kwargs.update(devices=devices, shard=sharded)
    first = gj.sweep(w.model, w.gauge, w.inputs, **kwargs)
    # timing repeats: no control or re-check (the first sweep gave the verdict)
    times = [first.run_time_s] + [
        gj.sweep(w.model, w.gauge, w.inputs, control_samples=0, **kwargs).run_time_s
        for _ in range(cfg.repeats - 1)
    ]
    if first.failures():
        raise RuntimeError(f"lanes failed: {first.failures()}")
    row = {
        "samples_per_s": num_samples / statistics.median(times),
        "compile_s": first.compile_time_s,
        "noise_floor": first.noise_floor,
        "verdict": first.verdict,
        "chunk_size": chunk,
        "num_devices": len(devices),
        **_deviations(first.max_abs, first.num_steps),
        # field evaluations per sample (`gj.count_evaluations`: the solver's tableau)
        "evaluations_mean": float(np.mean(np.asarray(first.num_evaluations))),
    }
    steps, counts = np.unique(np.asarray(first.num_steps), return_counts=True)
    row["steps_histogram"] = {int(a): int(b) for a, b in zip(steps, counts, strict=True)}
    return row, np.asarray(first.max_abs)


def _user_solve(model, inputs, forward_mode: bool):
    """`diffrax.diffeqsolve` of every input as a user writes it (the model's solver, controller
    and step; `throw=False` so a failed lane shows in the numbers, not as an exception)."""

    def one(x0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(model.field),
            model.solver,
            model.t0,
            model.t1,
            model.dt0,
            x0,
            stepsize_controller=model.stepsize_controller,
            max_steps=model.max_steps,
            # a jvp through diffeqsolve needs forward mode (diffrax's documented way)
            adjoint=diffrax.ForwardMode() if forward_mode else diffrax.RecursiveCheckpointAdjoint(),
            throw=False,
        )
        return sol.ys[-1], sol.stats["num_steps"]

    return jax.vmap(one)(inputs)


def _evaluations(model, steps):
    """Field evaluations of solves that took `steps` attempted steps, summed over the inputs."""
    return jnp.sum(gj.count_evaluations(model.solver, model.stepsize_controller, model.dt0, steps))


def _naive_diffrax(cfg: Config, w: Workload, key, num_samples: int, first_order: bool) -> tuple:
    model, gauge, inputs = w.model, w.gauge, w.inputs
    keys = _sample_keys(key, num_samples)
    reference = eqx.filter_jit(lambda m: _user_solve(m, inputs, False)[0])(model)

    def lane(k):
        g = gauge.sample(k)
        if first_order:
            # the response along g at the identity: a jvp through the solve
            (_, steps), (dout, _) = jax.jvp(
                lambda a: _user_solve(gauge.act(a, model), inputs, True), (gauge.identity(),), (g,)
            )
            return jnp.max(jnp.abs(dout)), jnp.max(steps), _evaluations(model, steps)
        out, steps = _user_solve(gauge.act(g, model), inputs, False)
        return jnp.max(jnp.abs(out - reference)), jnp.max(steps), _evaluations(model, steps)

    with jax.default_matmul_precision(cfg.precision):
        start = time.perf_counter()
        program = jax.jit(jax.vmap(lane)).lower(keys).compile()
        compile_s = time.perf_counter() - start
        rate = num_samples / _median_time(lambda: program(keys), cfg.repeats)
        dev, steps, evaluations = jax.device_get(program(keys))
    row = {"samples_per_s": rate, "compile_s": compile_s, **_deviations(dev, steps)}
    row["evaluations_mean"] = float(np.mean(evaluations))
    return row, np.asarray(dev)


def _torch_setup(cfg: Config, w: Workload, key, num_samples: int) -> tuple:
    """`(dtype, host array -> tensor, the samples' gauge elements on the host)` of a torch side:
    the same elements every side draws, torch's thread count as configured."""
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    samples = jax.device_get(jax.vmap(w.gauge.sample)(_sample_keys(key, num_samples)))

    def tensor(a):
        return torch.from_numpy(np.array(a)).to(tdtype)  # a writable copy

    return tdtype, tensor, samples


def _torch_w1(cfg: Config, w: Workload, key, num_samples: int) -> tuple:
    """W1 in torch as batched tensors, the same gauge elements as the other sides."""
    import torch
    import torchdiffeq
    from torch.func import jvp

    tdtype, tensor, samples = _torch_setup(cfg, w, key, num_samples)

    A, c0 = tensor(samples.A[:, 0]), tensor(samples.c[:, 0])  # the one mode, (B, d, d), (B, d)
    W0, W1, b0, b1 = (tensor(w.arrays[k]) for k in ("W0", "W1", "b0", "b1"))
    omega = float(w.gauge.omega[0])
    x0 = tensor(w.inputs)

    nfe = [0]

    def field_of(A, c0):
        def field(t, y):  # y: (B, n, d) in the gauge's coordinates, x = G y + c
            nfe[0] += 1
            s, ds = torch.sin(omega * t), omega * torch.cos(omega * t)
            G, dG = jvp(torch.linalg.matrix_exp, (s * A,), (ds * A,))
            c, dc = s * c0, ds * c0
            Wt = W0 + torch.sin(torch.pi * t) * W1
            bt = b0 + torch.cos(torch.pi * t) * b1
            x = y @ G.transpose(1, 2) + c[:, None, :]
            rhs = x @ Wt.T + bt - y @ dG.transpose(1, 2) - dc[:, None, :]
            return torch.linalg.solve(G, rhs.transpose(1, 2)).transpose(1, 2)

        return field

    ts = torch.tensor([0.0, 1.0], dtype=tdtype)
    options = {"step_size": 1.0 / cfg.w1_steps}

    def solve(A, c0):
        y0 = x0.expand(A.shape[0], *x0.shape).contiguous()
        return torchdiffeq.odeint(field_of(A, c0), y0, ts, method="rk4", options=options)[-1]

    with torch.no_grad():
        reference = solve(torch.zeros_like(A[:1]), torch.zeros_like(c0[:1]))[0]
        solve(A[:2], c0[:2])  # warm-up (no compilation to report: torch runs eagerly)
        times = []
        for _ in range(cfg.repeats):
            nfe[0] = 0
            start = time.perf_counter()
            out = solve(A, c0)
            times.append(time.perf_counter() - start)
        dev = (out - reference).abs().amax(dim=(1, 2)).numpy()
    row = {
        "samples_per_s": num_samples / statistics.median(times),
        "compile_s": None,
        # each call evaluates every sample's M inputs: the per-sample count, summed over them
        "evaluations_mean": float(nfe[0] * x0.shape[0]),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **_deviations(dev),
    }
    return row, dev


def _torch_w2(cfg: Config, w: Workload, key, num_samples: int, adaptive: bool) -> tuple:
    """W2/W3 in torch as batched tensors, the same generators as the other sides: the forward
    sensitivity system written by hand, `y' = F(t, y)`, `dy' = DF(t, y) dy + L_g(t, y)` with
    `L_g = (L_eps F_hat)^y - F (L_eps F_hat)^t` (`gj.deform`'s first-order term, from two
    `torch.func.jvp`s), integrated by `torchdiffeq.odeint` on the (B, M, d) state. torchdiffeq
    has no Tsit5: W2 uses its fixed-step `rk4` (the 3/8 rule) with the same steps, so per-sample
    values agree to the truncation error, not to rounding; W3 its adaptive `dopri5` at the same
    rtol = atol, whose controller takes one step size for the whole batch (an RMS norm over
    every sample), not one per lane; its field evaluations (`nfe`) are counted."""
    import torch
    import torchdiffeq
    from torch.func import jvp

    tdtype, tensor, samples = _torch_setup(cfg, w, key, num_samples)

    mlp = w.model.field.mlp
    layers = [(tensor(lin.weight), tensor(lin.bias)) for lin in mlp.layers]
    out_scale = float(w.model.field.out_scale)
    U, v = tensor(w.gauge.features.U), tensor(w.gauge.features.v)
    omega, phase = tensor(w.gauge.omega), tensor(w.gauge.phase)
    Wy, a0 = tensor(samples.Wy), tensor(samples.a0)  # (B, K, d, m), (B, K, m)
    x0 = tensor(w.inputs)

    def F(t, y):  # t: (B, M), y: (B, M, d); eqx.nn.MLP on [t, y], tanh, then out_scale
        h = torch.cat([t[..., None], y], dim=-1)
        for i, (W, b) in enumerate(layers):
            h = h @ W.T + b
            h = torch.tanh(h) if i < len(layers) - 1 else h
        return out_scale * h

    def eps(t, y):  # the generator (eps0, eps_y) of each sample
        modes = torch.sin(omega * t[..., None] + phase)  # (B, M, K)
        phi = torch.tanh(y @ U.T + v)  # (B, M, m)
        eps_y = torch.einsum("bnk,bkdm,bnm->bnd", modes, Wy, phi)
        eps0 = torch.einsum("bnk,bkm,bnm->bn", modes, a0, phi)
        return eps0, eps_y

    nfe = [0]

    def field(t, state):
        y, dy = state
        nfe[0] += 1
        tt = t.expand(y.shape[:-1]).clone()  # jvp writes into its primal: no aliasing
        f = F(tt, y)
        (e0, ey), (de0, dey) = jvp(eps, (tt, y), (torch.ones_like(tt), f))
        _, dF_eps = jvp(F, (tt, y), (e0, ey))
        _, dF_dy = jvp(lambda y_: F(tt, y_), (y,), (dy,))
        # lie_t = -de0, lie_y = dF_eps - dey: the deformation's first-order term
        return f, dF_dy + (dF_eps - dey) + f * de0[..., None]

    ts = torch.tensor([0.0, 1.0], dtype=tdtype)
    if adaptive:
        options = dict(method="dopri5", rtol=cfg.w3_rtol, atol=cfg.w3_rtol)
    else:
        options = dict(method="rk4", options={"step_size": 1.0 / cfg.w2_steps})

    def solve(n):
        y0 = x0.expand(n, *x0.shape).contiguous()
        _, dy = torchdiffeq.odeint(field, (y0, torch.zeros_like(y0)), ts, **options)
        return dy[-1]

    with torch.no_grad():
        solve(num_samples)  # warm-up (every sample's generator; torch runs eagerly)
        times, counts = [], []
        for _ in range(cfg.repeats):
            nfe[0] = 0
            start = time.perf_counter()
            out = solve(num_samples)
            times.append(time.perf_counter() - start)
            counts.append(nfe[0])
        dev = out.abs().amax(dim=(1, 2)).numpy()
    row = {
        "samples_per_s": num_samples / statistics.median(times),
        "compile_s": None,
        "method": options["method"],
        "batch_evaluations": int(counts[-1]),
        "evaluations_mean": float(counts[-1] * x0.shape[0]),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **_deviations(dev),
    }
    return row, dev


def _gradsolve(cfg: Config, w: Workload, key, num_samples: int, first_order: bool) -> tuple:
    """gradsolve's fixed-step engines on the same transformed fields: its problem protocol (an
    object with `name`, `dim`, `t0`, `t1`, `is_stiff`, `f_jax(t, y, p)`), the M inputs of a
    sample stacked into one state of M * d, the flattened gauge element as the trajectory's
    parameters. W1: `fixed_step_explicit.solve_jax` (classic RK4, the tableau of `gj.RK4`);
    W2: `fixed_step_tsit5.solve_jax` with `jax.jvp` along the element at the identity. Both
    are called under one `jax.jit` (gradsolve's own `solve` jits a fresh lambda per call, so
    every call would recompile), sampling in the program as on the naive side."""
    from gradsolve.solvers import fixed_step_explicit, fixed_step_tsit5
    from jax.flatten_util import ravel_pytree

    model, gauge, inputs = w.model, w.gauge, w.inputs
    m, d = inputs.shape
    _, unravel = ravel_pytree(gauge.identity())
    engine = fixed_step_tsit5 if first_order else fixed_step_explicit
    steps = cfg.w2_steps if first_order else cfg.w1_steps

    class Problem:  # gradsolve's protocol has no base class
        name = "gaugejax_benchmark"
        dim = m * d
        # arrays of the workload's dtype: gradsolve's scan starts from `jnp.asarray(t0)`, and
        # a float64 time would promote a float32 workload
        t0, t1 = np.asarray(model.t0, inputs.dtype), np.asarray(model.t1, inputs.dtype)
        is_stiff = False

        def f_jax(self, t, y, p):
            moved = gauge.act(unravel(p), model)
            return jax.vmap(lambda x: moved.field(t, x, None))(y.reshape(m, d)).reshape(-1)

    problem = Problem()
    keys = _sample_keys(key, num_samples)
    y0 = jnp.broadcast_to(inputs.reshape(-1), (num_samples, m * d))
    reference = eqx.filter_jit(lambda mm: _user_solve(mm, inputs, False)[0])(model).reshape(-1)

    def program(keys):
        flat = jax.vmap(lambda k: ravel_pytree(gauge.sample(k))[0])(keys)

        def solve(ps):
            return engine.solve_jax(problem, y0, ps, n_steps=steps)

        if first_order:
            ident = jnp.broadcast_to(ravel_pytree(gauge.identity())[0], flat.shape)
            dout = jax.jvp(solve, (ident,), (flat,))[1]
        else:
            dout = solve(flat) - reference
        return jnp.max(jnp.abs(dout), axis=1)

    with jax.default_matmul_precision(cfg.precision):
        start = time.perf_counter()
        compiled = jax.jit(program).lower(keys).compile()
        compile_s = time.perf_counter() - start
        rate = num_samples / _median_time(lambda: compiled(keys), cfg.repeats)
        dev = np.asarray(jax.device_get(compiled(keys)))
    row = {
        "samples_per_s": rate,
        "compile_s": compile_s,
        "engine": f"{engine.name} ({steps} steps)",
        "gradsolve_version": importlib.metadata.version("gradsolve"),
        **_deviations(dev),
    }
    return row, dev


def _skip(cfg: Config, name: str, side: str, num_samples: int) -> str | None:
    """Why a side does not run (None: it runs)."""
    baseline = not side.startswith("gaugejax")
    if baseline and cfg.baseline_max_samples and num_samples > cfg.baseline_max_samples:
        return f"skipped: B > baseline_max_samples = {cfg.baseline_max_samples}"
    if side == "torchdiffeq":
        missing = [m for m in ("torch", "torchdiffeq") if importlib.util.find_spec(m) is None]
        if missing:
            return f"skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')"
    if side == "gradsolve" and importlib.util.find_spec("gradsolve") is None:
        return "skipped: gradsolve is not installed (pip install -e '.[bench]')"
    if side == "gradsolve" and name == "w3":
        # its adaptive engines record accepted steps for a reverse-mode replay; a forward
        # sensitivity under error control is not in its interface
        return "skipped: gradsolve has no error-controlled forward sensitivity (w3)"
    return None


def field_flops(cfg: Config, name: str, w: Workload, key) -> float:
    """FLOPs of one evaluation of the workload's vector field on one sample's M inputs, from
    XLA's cost analysis of that straight-line program (no loops, so nothing is counted once for
    many iterations): w1 the gauge-transformed linear field (G(t), dG/dt and the solve are
    shared by the M inputs, as in every side's program); w2/w3 the forward sensitivity field
    (`gj.SensitivityField`: the deformed field and its jvp). Matmuls, adds and multiplies
    count; transcendentals (tanh, sin) are not FLOPs in XLA's count."""
    g = w.gauge.sample(key)
    t = jnp.asarray(0.5, w.inputs.dtype)
    if name == "w1":
        moved = w.gauge.act(g, w.model)

        def evaluate(xs):
            return jax.vmap(lambda x: moved.field(t, x, None))(xs)

    else:
        gauge, model = w.gauge, w.model
        sensitivity = gj.SensitivityField(
            lambda a, t, y, args: gauge.act(a, model).field(t, y, args), gauge.identity(), g
        )

        def evaluate(xs):
            return jax.vmap(lambda x: sensitivity(t, (x, x), None))(xs)

    with jax.default_matmul_precision(cfg.precision):
        cost = jax.jit(evaluate).lower(w.inputs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # older jax: one per module
    return float(cost["flops"])


def matmul_ceiling(cfg: Config) -> dict:
    """The measured FLOP/s ceiling of the first device: an n x n matmul in the workloads' dtype
    and precision (n = 1024 on a CPU, 8192 on an accelerator), 2 n^3 FLOPs, median of
    `repeats` (at least 5) after a compiled warm-up."""
    device = jax.devices()[0]
    n = 1024 if device.platform == "cpu" else 8192
    a = jax.device_put(jnp.ones((n, n), cfg.dtype), device)
    with jax.default_matmul_precision(cfg.precision):
        program = jax.jit(lambda x: x @ x).lower(a).compile()
    jax.block_until_ready(program(a))
    seconds = _median_time(lambda: program(a), max(cfg.repeats, 5))
    return {"flop_per_s": 2.0 * n**3 / seconds, "n": n, "dtype": cfg.dtype,
            "precision": cfg.precision}  # fmt: skip


def measure(
    cfg: Config, name: str, key, num_samples: int, ceiling: float | None = None
) -> list[dict]:
    """One row per side for workload `name` at `num_samples` samples; with `ceiling` (FLOP/s)
    every row also gets `flop_per_s` and `ceiling_fraction` (module docstring: the op count)."""
    kw, ks = jax.random.split(key)
    w = _workload(cfg, name, kw)
    rows, base = [], None
    for side in cfg.sides:
        row = {"workload": name, "num_samples": num_samples, "side": side, "dtype": cfg.dtype}
        row["precision"] = cfg.precision
        reason = _skip(cfg, name, side, num_samples)
        if reason is not None:
            rows.append({**row, "status": reason})
            continue
        try:
            if side.startswith("gaugejax"):
                data, per_sample = _gaugejax(cfg, w, ks, num_samples, side != "gaugejax")
            elif side == "naive_diffrax":
                data, per_sample = _naive_diffrax(cfg, w, ks, num_samples, name != "w1")
            elif side == "torchdiffeq" and name == "w1":
                data, per_sample = _torch_w1(cfg, w, ks, num_samples)
            elif side == "torchdiffeq":
                data, per_sample = _torch_w2(cfg, w, ks, num_samples, name == "w3")
            else:
                data, per_sample = _gradsolve(cfg, w, ks, num_samples, name != "w1")
        except Exception as e:  # a side that fails (e.g. out of memory) is a row, not a crash
            rows.append({**row, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"})
            continue
        row.update(status="ok", **data, **_memory())
        if base is None and side == "gaugejax":
            base = per_sample
        elif base is not None:
            # the same gauge elements on every side: per-sample deviations must agree
            row["max_diff_vs_gaugejax"] = float(np.max(np.abs(per_sample - base)))
        rows.append(row)
    rate = {r["side"]: r.get("samples_per_s") for r in rows}
    for r in rows:
        if r.get("samples_per_s") and rate.get("gaugejax"):
            r["gaugejax_speedup"] = rate["gaugejax"] / r["samples_per_s"]
    ours = next((r for r in rows if r["side"] == "gaugejax" and r["status"] == "ok"), None)
    per_input = field_flops(cfg, name, w, ks) / len(w.inputs) if any(
        r.get("samples_per_s") for r in rows
    ) else None  # fmt: skip
    for r in rows:
        if not r.get("samples_per_s"):
            continue
        # a side's own field evaluations where it reports them (summed over the M inputs),
        # else gaugejax's (gradsolve's engines report none)
        own = r.get("evaluations_mean")
        if own is None and ours is None:
            continue
        r["op_count"] = "own evaluations" if own is not None else "gaugejax's evaluations"
        r["flops_per_sample"] = (own if own is not None else ours["evaluations_mean"]) * per_input
        r["flop_per_s"] = r["flops_per_sample"] * r["samples_per_s"]
        if ceiling:
            r["ceiling_fraction"] = r["flop_per_s"] / ceiling
    return rows


def _table(rows: list[dict]) -> list[str]:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, int | float) else "-"

    lines = [
        "| workload | B | side | samples/s | gaugejax x | compile s | max deviation | "
        "vs gaugejax | lane eff. | GFLOP/s | of ceiling | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["workload"],
            str(r["num_samples"]),
            r["side"],
            fmt(r.get("samples_per_s"), ".1f"),
            fmt(r.get("gaugejax_speedup"), ".2f"),
            fmt(r.get("compile_s"), ".2f"),
            fmt(r.get("max_deviation"), ".2e"),
            fmt(r.get("max_diff_vs_gaugejax"), ".1e"),
            fmt(r.get("lane_efficiency"), ".2f"),
            fmt(r["flop_per_s"] / 1e9 if r.get("flop_per_s") else None, ".3g"),
            fmt(r["ceiling_fraction"] * 100 if r.get("ceiling_fraction") else None, ".2g") + "%"
            if r.get("ceiling_fraction")
            else "-",
            r["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(config: Config, run_dir: Path) -> dict:
    """Measure every workload, batch size and side; write `results.json`, `metrics.jsonl`, the
    Markdown table and the figure."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    env = io.env_info()
    env["ceiling"] = matmul_ceiling(config)
    keys = jax.random.split(jax.random.key(config.seed), len(config.workloads))
    cases = [
        (name, key, b)
        for name, key in zip(config.workloads, keys, strict=True)
        for b in config.batch_sizes
    ]
    rows = []
    for name, key, b in tqdm(cases, desc="benchmark_sweep"):
        for row in measure(config, name, key, b, env["ceiling"]["flop_per_s"]):
            rows.append(row)
            io.append_jsonl(run_dir / "metrics.jsonl", row)
    table = _table(rows)
    io.write_json(run_dir / "results.json", {"env": env, "rows": rows})
    io.atomic_write_bytes(run_dir / "table.md", ("\n".join(table) + "\n").encode())
    for line in table:
        tqdm.write(line)
    figures = plot(io.read_json(run_dir / "results.json"), run_dir / "figures", config)
    return {
        "experiment": "benchmark_sweep",
        "claims": [],
        "env": env,
        "rows": rows,
        "table": table,
        "figures": [str(Path(f).relative_to(run_dir)) for f in figures],
        "wall_time_s": time.perf_counter() - start,
    }


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    """Samples/s per side, one panel per workload (log scale): bars labelled with the max
    deviation at one batch size (a fast side with a large deviation computes something else),
    lines against the batch size at several."""
    plt = pyplot()
    rows = [r for r in results["rows"] if r["status"] == "ok"]
    workloads = [w for w in config.workloads if any(r["workload"] == w for r in rows)]
    n = max(len(workloads), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.8))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, workloads, strict=False):
        mine = [r for r in rows if r["workload"] == name]
        if len(config.batch_sizes) == 1:
            sides = [r["side"] for r in mine]
            rates = [r["samples_per_s"] for r in mine]
            ax.bar(range(len(mine)), rates, color=[f"C{SIDES.index(s)}" for s in sides])
            for i, r in enumerate(mine):
                ax.annotate(
                    f"{r['samples_per_s']:.0f}/s\ndev {r['max_deviation']:.1e}",
                    (i, r["samples_per_s"]),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            ax.set_xticks(range(len(mine)), sides, fontsize=8, rotation=20, ha="right")
            ax.set_ylim(min(rates) / 3, max(rates) * 4)
            ax.set_title(f"{name} (B = {config.batch_sizes[0]})")
        else:
            for side, marker in zip(SIDES, "oxsd^", strict=True):
                line = sorted(
                    (r["num_samples"], r["samples_per_s"]) for r in mine if r["side"] == side
                )
                if line:
                    ax.plot(*zip(*line, strict=True), marker=marker, label=side)
            ax.set_xscale("log")
            ax.set_xlabel("samples per sweep (B)")
            ax.legend(fontsize=8)
            ax.set_title(name)
        ax.set_yscale("log")
        ax.set_ylabel("samples / s")
        plain_log_ticks(ax)
        ax.grid(True, which="major", axis="y", alpha=0.3)
    device = results["env"]["devices"][0] if results["env"]["devices"] else "?"
    fig.suptitle(f"Gauge-sweep throughput on {device} ({config.dtype})", fontsize=10)
    fig.tight_layout()
    path = io.save_figure(fig, fig_dir / "throughput.png")
    plt.close(fig)
    return [path]
