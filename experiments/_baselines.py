"""The benchmark's baselines: the paths a user would write instead of `gj.sweep`, measured by
`benchmark_sweep` on the same workloads and the same gauge elements (sample i's key is
`fold_in(key, i)`, as the sweep draws it).

- `naive_diffrax`: `jit(vmap(...))` over all B samples of `diffrax.diffeqsolve` of the
  transformed model's field (w1), or of `jax.jvp` through that solve (w2, w3: the tangent is
  then not under error control, and on w3 its error is the solver's, not the symmetry's).
  On w1 that field is the `GaugedLinearField` `LinearGauge.act` builds, the one the sweep
  integrates: its G(t) and dG/dt are the family's, in closed form for W1's one-mode elements
  (`dG/dt = s'(t) A G`, G from `gj.expm` with squarings adapted to the norm) since the
  structure-aware evaluation, a jvp through a fixed 12-squaring exponential before; so
  this side speeds up with the sweep.
- `hand_sensitivity` (w2, w3): the forward sensitivity system written by hand in JAX, one
  `diffrax.diffeqsolve` of the state `(y, dy)` per input, `jit(vmap(...))` over the samples: per
  evaluation one jvp of F along `(eps0, eps_y + dy)` and one jvp of the generator along
  `(1, F)` (the generator is the Lie family's own, `gauge.generator(g)`). The cost of the
  mathematics, against which the sweep's first-order path is measured.
- `torch_w1`, `torch_w2` (the `bench` extra): torchdiffeq on batched tensors. W1 with
  `torch.linalg.matrix_exp`, `torch.func.jvp` for dG/dt and `odeint(method="rk4")`, which is
  the 3/8 rule, not the classic tableau (per-sample deviations agree to the O(dt^4)
  truncation, not to rounding); the side `torchdiffeq_closed_form` is W1 as a user who knows
  the element's structure writes it: one `matrix_exp` per evaluation and the closed form
  `dG/dt = s'(t) A G(t)` of a one-mode element (W1's gauge has one mode); W2/W3 as the
  hand-written forward sensitivity system (W2:
  torchdiffeq has no Tsit5, so its fixed-step `rk4` with the same steps; W3: its adaptive
  `dopri5` at the same tolerances, one step size for the whole batch).
- `gradsolve` (the `bench` extra): its fixed-step engines through its problem protocol (W1:
  classic RK4, agreement to rounding; W2: fixed-step Tsit5 and a jvp through its scan).

Each returns `(row, per_sample)`: the row's measured numbers (`samples_per_s`, `compile_s`,
deviations, evaluations where counted) and the per-sample deviations.
"""

import importlib.metadata
import importlib.util
import statistics
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj


def unavailable(side: str, workload: str) -> str | None:
    """Why the baseline `side` cannot run the workload here (None: it can)."""
    if side.startswith("torchdiffeq"):
        missing = [m for m in ("torch", "torchdiffeq") if importlib.util.find_spec(m) is None]
        if missing:
            return f"skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')"
    if side == "torchdiffeq_closed_form" and workload != "w1":
        # the closed form is a one-mode linear gauge's (W1); W2/W3 deform an MLP field
        return "skipped: the closed form dG/dt = s'(t) A G is W1's (a one-mode linear gauge)"
    if side == "hand_sensitivity" and workload == "w1":
        return "skipped: w1 is a finite workload (no sensitivity system)"
    if side == "gradsolve" and importlib.util.find_spec("gradsolve") is None:
        return "skipped: gradsolve is not installed (pip install -e '.[bench]')"
    if side == "gradsolve" and workload == "w3":
        # its adaptive engines record accepted steps for a reverse-mode replay; a forward
        # sensitivity under error control is not in its interface
        return "skipped: gradsolve has no error-controlled forward sensitivity (w3)"
    return None


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


def _timed_lanes(cfg, lane, keys, num_samples: int) -> tuple:
    """The row and per-sample deviations of a JAX side: `jit(vmap(lane))` over the samples'
    keys, timed by `gj.time_program` (compile apart, median of `cfg.repeats`); `lane(key)`
    returns `(deviation, steps, evaluations)`."""
    with jax.default_matmul_precision(cfg.precision):
        timed = gj.time_program(jax.vmap(lane), keys, repeats=cfg.repeats)
    dev, steps, evaluations = timed.output
    row = {
        "samples_per_s": num_samples / timed.median_s,
        "compile_s": timed.compile_s,
        **gj.deviation_summary(dev, steps),
    }
    row["evaluations_mean"] = float(np.mean(evaluations))
    return row, np.asarray(dev)


def naive_diffrax(cfg, w, key, num_samples: int, first_order: bool) -> tuple:
    model, gauge, inputs = w.model, w.gauge, w.inputs
    keys = gj.sample_keys(key, num_samples)
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

    return _timed_lanes(cfg, lane, keys, num_samples)


class _HandSensitivity(eqx.Module):
    """`(y, dy) -> (F, DF (eps0, eps_y + dy) - D eps_y (1, F) + F D eps0 (1, F))`, written out:
    `gj.deform`'s first-order term plus `DF dy`, D over `(t, y)`."""

    field: eqx.Module
    eps: eqx.Module

    def generator(self, t, y):
        e0, ey = self.eps(t, y)
        return jnp.asarray(e0, t.dtype), ey  # eps0 is the time's tangent: the time's dtype

    def __call__(self, t, state, args):
        y, dy = state
        (e0, ey), eps_along = jax.linearize(self.generator, t, y)
        f, df = jax.jvp(lambda t_, y_: self.field(t_, y_, args), (t, y), (e0, ey + dy))
        de0, dey = eps_along(jnp.ones_like(t), f)
        return f, df - dey + f * de0


def hand_sensitivity(cfg, w, key, num_samples: int) -> tuple:
    """W2/W3's first-order responses from the hand-written forward sensitivity system (module
    docstring), the model's solver, controller and step, per-input error control as the sweep's;
    the per-sample maximum |dy(t1)| over the inputs."""
    model, gauge, inputs = w.model, w.gauge, w.inputs
    keys = gj.sample_keys(key, num_samples)

    def lane(k):
        system = _HandSensitivity(model.field, gauge.generator(gauge.sample(k)))

        def one(x0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(system),
                model.solver,
                model.t0,
                model.t1,
                model.dt0,
                (x0, jnp.zeros_like(x0)),
                stepsize_controller=model.stepsize_controller,
                max_steps=model.max_steps,
                throw=False,
            )
            return sol.ys[1][-1], sol.stats["num_steps"]

        dout, steps = jax.vmap(one)(inputs)
        return jnp.max(jnp.abs(dout)), jnp.max(steps), _evaluations(model, steps)

    return _timed_lanes(cfg, lane, keys, num_samples)


def _torch_setup(cfg, w, key, num_samples: int) -> tuple:
    """`(dtype, host array -> tensor, the samples' gauge elements on the host)` of a torch side:
    the same elements every side draws, torch's thread count as configured."""
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    samples = jax.device_get(jax.vmap(w.gauge.sample)(gj.sample_keys(key, num_samples)))

    def tensor(a):
        return torch.from_numpy(np.array(a)).to(tdtype)  # a writable copy

    return tdtype, tensor, samples


def torch_w1(cfg, w, key, num_samples: int, closed_form: bool = False) -> tuple:
    """W1 in torch as batched tensors, the same gauge elements as the other sides: dG/dt by
    `torch.func.jvp` through `matrix_exp`, or (`closed_form`) `s'(t) A G(t)` from one
    `matrix_exp` per evaluation (G = expm(s(t) A) commutes with A)."""
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
            if closed_form:
                G = torch.linalg.matrix_exp(s * A)
                dG = ds * (A @ G)
            else:
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
        "dG_dt": "closed form s'(t) A G" if closed_form else "torch.func.jvp of matrix_exp",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **gj.deviation_summary(dev),
    }
    return row, dev


def torch_w2(cfg, w, key, num_samples: int, adaptive: bool) -> tuple:
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
        **gj.deviation_summary(dev),
    }
    return row, dev


def gradsolve(cfg, w, key, num_samples: int, first_order: bool) -> tuple:
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
    keys = gj.sample_keys(key, num_samples)
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
        timed = gj.time_program(program, keys, repeats=cfg.repeats)
    dev = np.asarray(timed.output)
    row = {
        "samples_per_s": num_samples / timed.median_s,
        "compile_s": timed.compile_s,
        "engine": f"{engine.name} ({steps} steps)",
        "gradsolve_version": importlib.metadata.version("gradsolve"),
        **gj.deviation_summary(dev),
    }
    return row, dev
