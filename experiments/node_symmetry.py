"""Section 2 of the paper, checked numerically: Lie derivatives, Eq. 16, Eq. 20, Theorem 2.1,
finite spatial diffeomorphisms and time reparametrisations of a tanh-MLP neural ODE (float64).
`run(config, run_dir)` writes `results.json`, `metrics.jsonl` (a record per check), figures
drawn from `results.json`, and returns the summary, one claim row per check."""

import dataclasses
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj
from gaugejax import (
    claim,
    claim_above as above,
    claim_below as below,
    claim_slope as slope_claim,
    histogram_figure,
    in_band,
    loglog_figure,
    validate_checks,
)

from ._common import run_checks


FAST_COMPILE = True  # many programs, each run briefly: gj.use_fast_compile in its process


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `node_symmetry` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    dim: int = 4
    width: int = 32
    depth: int = 2
    out_scale: float = 0.7
    t1: float = 1.0
    rtol: float = 1e-8
    num_inputs: int = 8
    num_samples: int = 128
    chunk_size: int = 32
    num_points: int = 16
    scales: tuple[float, ...] = (0.16, 0.08, 0.04, 0.02, 0.01)
    amplitude: float = 0.5
    num_observations: int = 5  # interior observation times t1 * i / (n + 1) of the trajectory
    tolerance: float = 1e-6
    identity_tolerance: float = 1e-12
    slope_band: float = 0.2
    workers: int = 2
    checks: tuple[str, ...] = ()  # run only these checks (all when empty)

    def __post_init__(self):
        validate_checks(self.checks, CHECKS)


class _Setup(eqx.Module):
    model: gj.NeuralODE
    inputs: jax.Array
    ts: jax.Array
    ys: jax.Array


def _field_gap(a, b, setup):
    """max |a - b| over the setup's points (t, y) of two fields `(t, y, args) -> dy/dt`."""
    gap = jax.vmap(lambda t, y: jnp.max(jnp.abs(a(t, y, None) - b(t, y, None))))
    return jnp.max(gap(setup.ts, setup.ys))


def check_lie_bracket(cfg, key, setup):
    ka, kz = jax.random.split(key)
    A, B = jax.random.normal(ka, (2, cfg.dim, cfg.dim)) / np.sqrt(cfg.dim)
    zs = jax.random.normal(kz, (cfg.num_points, cfg.dim))
    got = jax.vmap(gj.lie_bracket(lambda z: A @ z, lambda z: B @ z))(zs)
    err_linear = float(jnp.max(jnp.abs(got - zs @ (B @ A - A @ B).T)))

    def u(z):
        return jnp.stack([z[0] * z[1], z[0]])

    def v(z):
        return jnp.stack([jnp.sin(z[1]), z[0] ** 2])

    def by_hand(z):
        z0, z1 = z[0], z[1]
        return jnp.stack(
            [z0 * jnp.cos(z1) - z1 * jnp.sin(z1) - z0**3, 2 * z0**2 * z1 - jnp.sin(z1)]
        )

    err_nonlinear = float(
        jnp.max(jnp.abs(jax.vmap(gj.lie_bracket(u, v))(zs[:, :2]) - jax.vmap(by_hand)(zs[:, :2])))
    )
    err = max(err_linear, err_nonlinear)
    row = below("lie_bracket", "Lie bracket by two jvps equals closed forms "
                "([Az, Bz] = (BA - AB) z; a nonlinear pair by hand)", "Eq. 9 (L_eps F)", err,
                cfg.identity_tolerance,
                f"linear {err_linear:.2e}, nonlinear {err_nonlinear:.2e}")  # fmt: skip
    return [row], {"linear": err_linear, "nonlinear": err_nonlinear}


def check_eq16(cfg, key, setup):
    kg, ks = jax.random.split(key)
    gauge = gj.LieDeformationGauge(cfg.dim, cfg.t1, key=kg, time_component=False)
    eps = gauge.generator(gauge.sample(ks))
    F = setup.model.field
    s = 0.37

    def one(t, y):
        e0, ey = eps(t, y)
        f = F(t, y, None)
        DF = jax.jacfwd(lambda y: F(t, y, None))(y)
        Deps = jax.jacfwd(lambda y: eps(t, y)[1])(y)
        dt_eps = jax.jacfwd(lambda t: eps(t, y)[1])(t)
        eq16 = f + s * (DF @ ey - Deps @ f - dt_eps)
        return jnp.max(jnp.abs(gj.deform(F, eps, s)(t, y, None) - eq16))

    err = float(jnp.max(jax.jit(jax.vmap(one))(setup.ts, setup.ys)))
    text = "deform with a spatial generator equals Eq. 16 term by term (F + DF eps - D eps F"
    row = below("eq16", text + " - d_t eps)", "Eq. 13-16", err, cfg.identity_tolerance)
    return [row], {"error": err}


def check_deform_vs_finite(cfg, key, setup):
    kg, ks = jax.random.split(key)
    gauge = gj.LieDeformationGauge(cfg.dim, cfg.t1, key=kg, time_component=True)
    eps = gauge.generator(gauge.sample(ks))
    F = setup.model.field

    @jax.jit
    def gap(h):
        def chart(s, y):
            e0, ey = eps(s, y)
            return s + h * e0, y + h * ey

        return _field_gap(gj.spacetime_pullback(F, chart), gj.deform(F, eps, h), setup)

    gaps = [float(gap(jnp.asarray(h))) for h in cfg.scales]
    p = gj.loglog_slope(cfg.scales, gaps)
    row = slope_claim("deform_vs_finite",
                      "deform(F, (eps0, eps_y), h) is the first-order expansion of the finite "
                      "spacetime diffeomorphism (t, x) = (s, y) + h eps: the gap is O(h^2)",
                      "Eq. 9 + Sec. 2.2 rescaling", p, 2.0, cfg.slope_band,
                      "gaps " + ", ".join(f"{g:.1e}" for g in gaps))  # fmt: skip
    return [row], {"scales": list(cfg.scales), "gaps": gaps, "slope": p}


def check_thm21(cfg, key, setup):
    """Sufficiency (first order and O(s^2)) and necessity of Theorem 2.1."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    model, x = setup.model, setup.inputs
    kw = dict(num_samples=cfg.num_samples, chunk_size=cfg.chunk_size)
    van = gj.LieDeformationGauge(cfg.dim, cfg.t1, key=k1, amplitude=cfg.amplitude)
    free = gj.LieDeformationGauge(cfg.dim, cfg.t1, key=k1, amplitude=cfg.amplitude, boundary="free")
    res_van = gj.sweep(model, van, x, key=k2, **kw)
    res_free = gj.sweep(model, free, x, key=k2, **kw)

    # finite s: O(s^2) for vanishing generators, O(s) for free ones
    dev_van, dev_free = (
        gj.ray_deviations(model, gauge, gauge.sample(k3), x, cfg.scales).tolist()
        for gauge in (van, free)
    )
    p_van, p_free = gj.loglog_slope(cfg.scales, dev_van), gj.loglog_slope(cfg.scales, dev_free)

    # necessity: measured response = DPhi(z) v(0, z) - v(T, Phi(z)), v = eps_y - F eps0
    gs = jax.vmap(free.sample)(jax.random.split(k4, 4))

    @jax.jit
    def necessity(g):  # per input: the error of the prediction, the size of the response
        measured = gj.gauge_response(model, free, g, x)[0]
        predicted = jax.vmap(lambda z: gj.first_order_response(model, free.generator(g), z))(x)
        return jnp.max(jnp.abs(measured - predicted), axis=1), jnp.max(jnp.abs(measured), axis=1)

    errs, sizes = jax.vmap(necessity)(gs)
    nec_err, nec_size = float(jnp.max(errs)), float(jnp.min(sizes))

    s_van = res_van.summary()
    s_free = res_free.summary()
    rows = [
        below("thm21_sufficiency",
              "Generators vanishing at t=0 and t=T leave the output unchanged at first order "
              f"(max over {res_van.num_samples} random generators x {len(x)} inputs)",
              "Thm 2.1, Eq. 11-12", s_van["max_abs_max"], cfg.tolerance,
              f"median {s_van['max_abs_median']:.1e}; failures {s_van['failures'] or 'none'}",
              ok=not s_van["failures"], tolerance=f"< {cfg.tolerance:g} (rtol {cfg.rtol:g})"),
        above("thm21_control",
              "Negative control: generators that do not vanish at the boundary move the output "
              "at first order (min over samples)", "Thm 2.1 (necessity)",
              float(res_free.max_abs.min()), 100 * cfg.tolerance,
              f"median {s_free['max_abs_median']:.2e}"),
        slope_claim("thm21_second_order",
                    "Finite deformation by a vanishing generator changes the output at O(s^2)",
                    "Thm 2.1", p_van, 2.0, cfg.slope_band, f"free generator slope {p_free:.2f}"),
        below("thm21_necessity",
              "For a non-vanishing generator the first-order response equals "
              "DPhi(z) v(0,z) - v(T, Phi(z)), v = eps_y - F eps0", "Thm 2.1 (Cartan formula step)",
              nec_err, cfg.tolerance, f"smallest response {nec_size:.2e}",
              ok=nec_size > 100 * cfg.tolerance),
    ]  # fmt: skip
    data = {"first_order_vanishing": res_van.max_abs, "first_order_free": res_free.max_abs,
            "sweep_vanishing": s_van, "sweep_free": s_free, "scales": list(cfg.scales),
            "finite_vanishing": dev_van, "finite_free": dev_free, "slope_vanishing": p_van,
            "slope_free": p_free, "necessity_error": nec_err}  # fmt: skip
    return rows, data


def check_thm21_trajectory(cfg, key, setup):
    """Thm 2.1 on the trajectory saved at t_i; the control vanishes at 0 and T only."""
    ts = tuple(cfg.t1 * (i + 1) / (cfg.num_observations + 1) for i in range(cfg.num_observations))
    model, k1, k2 = setup.model.with_options(observation_times=ts), *jax.random.split(key)
    gauge = gj.LieDeformationGauge(cfg.dim, cfg.t1, key=k1, amplitude=cfg.amplitude,
                                   observation_times=ts)  # fmt: skip
    res = gj.sweep(model, gauge, setup.inputs, key=k2, num_samples=cfg.num_samples,
                   chunk_size=cfg.chunk_size)  # fmt: skip
    s, moved = res.summary(), float(np.nanmin(res.control_max_rel)) * res.reference_scale
    row = below("thm21_trajectory", f"Generators vanishing at t=0 and every observation time "
                f"({len(ts)} interior t_i) leave every saved state x(t_i) unchanged at first order",
                "Thm 2.1 generalised", s["max_abs_max"], cfg.tolerance, f"floor {res.floor:.1e} "
                f"(relative); vanishing at 0 and T only: saved states move >= {moved:.2e}",
                ok=not s["failures"] and moved > 100 * cfg.tolerance)  # fmt: skip
    return [row], {"observation_times": ts, "summary": s, "floor": res.floor, "control": moved}


def check_finite_families(cfg, key, setup):
    k1, k2, k3 = jax.random.split(key, 3)
    model, x = setup.model, setup.inputs
    kw = dict(num_samples=cfg.num_samples, chunk_size=cfg.chunk_size)
    ref = jax.vmap(model)(x)
    one = jnp.asarray(cfg.t1)
    rows, data = [], {}

    sp = gj.SpatialDiffeoGauge(cfg.dim, cfg.t1, key=k1)
    sp_free = gj.SpatialDiffeoGauge(cfg.dim, cfg.t1, key=k1, boundary="free")
    tr = gj.TimeReparamGauge(cfg.t1)
    tr_free = gj.TimeReparamGauge(cfg.t1, boundary="free", rho=0.9)
    res_sp = gj.sweep(model, sp, x, key=k2, **kw)
    res_tr = gj.sweep(model, tr, x, key=k2, **kw)

    num_free = max(cfg.num_samples // 8, 2)
    keys = jax.random.split(k3, num_free)

    def violating(family, predict):
        """Per sample of a boundary-violating family: the error of the predicted new output,
        and the change of the output."""

        def one(k):
            g = family.sample(k)
            new = jax.vmap(family.act(g, model))(x)
            return jnp.max(jnp.abs(new - predict(g))), jnp.max(jnp.abs(new - ref))

        return (np.asarray(a) for a in jax.jit(jax.vmap(one))(keys))

    def spatial(g):  # psi_T^-1 of the old output
        return jax.vmap(lambda z: sp_free.to_map(sp_free.inverse(g))(one, z))(ref)

    def reparam(g):  # the old trajectory at tau(T)
        controller = model.stepsize_controller
        tau_T = tr_free.to_map(g)(one)
        return jax.vmap(
            lambda z: gj.solve(model.field, z, t1=tau_T, stepsize_controller=controller)[0]
        )(x)

    for name, what, res, free, eq, label in [
        ("spatial", "spatial diffeomorphisms psi_t", res_sp, (sp_free, spatial), "Eq. 13-16",
         "psi_T^-1(Phi(z))"),
        ("reparam", "time reparametrisations tau", res_tr, (tr_free, reparam), "Eq. 17-20",
         "x(tau(T))"),
    ]:  # fmt: skip
        s = res.summary()
        err, change = violating(*free)
        rows += [
            below(f"finite_{name}", f"Finite {what} with boundary conditions leave x(T) unchanged "
                  f"({s['num_samples']} samples, exact field transformation)", eq,
                  s["max_abs_max"], cfg.tolerance,
                  f"median {s['max_abs_median']:.1e}, median steps {s['num_steps_median']:.0f}, "
                  f"noise floor {s['noise_floor']:.1e}", ok=not s["failures"]),
            below(f"finite_{name}_violating", "Boundary-violating maps change x(T) (min change "
                  f"{change.min():.2e}) exactly to {label}", eq, float(err.max()), cfg.tolerance,
                  ok=float(change.min()) > 100 * cfg.tolerance),
        ]  # fmt: skip
        data[name] = {"deviation": res.max_abs, "summary": s, "violating_error": err,
                      "violating_change": change}  # fmt: skip
    return rows, data


def check_eq20(cfg, key, setup):
    """Printed Eq. 20 `F + F e0 + d_t F e0` versus derived `F + e0' F + e0 d_t F`."""
    model, x = setup.model, setup.inputs
    F = model.field
    c = jax.random.normal(key, (3,)) * 0.3
    k = jnp.arange(1.0, 4.0)

    def e0(t):  # vanishes at 0 and T: a gauge symmetry by Thm 2.1
        return jnp.sum(c * jnp.sin(k * jnp.pi * t / cfg.t1))

    def derived(h):
        return gj.deform(F, lambda t, y: (e0(t), jnp.zeros_like(y)), h)

    def printed(h):
        def field(t, y, args):
            f, dtF = gj.time_derivative(lambda t_: F(t_, y, args), t)
            return f + h * (f * e0(t) + dtF * e0(t))

        return field

    @jax.jit
    def gaps(h):
        exact = gj.reparametrize(F, lambda s: s + h * e0(s))
        ref = jax.vmap(model)(x)

        def out_dev(field):
            return jnp.max(jnp.abs(jax.vmap(model.with_field(field))(x) - ref))

        fields = derived(h), printed(h)
        return *(_field_gap(f, exact, setup) for f in fields), *(out_dev(f) for f in fields)

    vals = np.array([[float(v) for v in gaps(jnp.asarray(h))] for h in cfg.scales])
    p = [gj.loglog_slope(cfg.scales, vals[:, i]) for i in range(4)]
    ok = in_band(p[0], 2.0, cfg.slope_band) and in_band(p[1], 1.0, cfg.slope_band)
    rows = [
        claim(
            "eq20_verdict", "Eq. 20: the time reparametrisation t = s + h e0(s) gives "
            "F' = F + h (e0' F + e0 d_t F) "
            "(derived; field gap O(h^2)), not the printed F + h (F e0 + d_t F e0) (gap O(h))",
            "Eq. 17-20", p[0], ok,
            f"derived slope 2 +- {cfg.slope_band}; printed slope 1 +- {cfg.slope_band}",
            f"printed-form slope {p[1]:.2f}. Output level (e0 vanishing at 0, T): derived changes "
            f"x(T) at slope {p[2]:.2f}, printed at slope {p[3]:.2f}. Verdict: the printed Eq. 20 "
            "is not dimensionally consistent; the derived form is right."),
    ]  # fmt: skip
    data = {
        "scales": list(cfg.scales),
        "field_gap_derived": vals[:, 0],
        "field_gap_printed": vals[:, 1],
        "output_change_derived": vals[:, 2],
        "output_change_printed": vals[:, 3],
        "slopes": p,
    }
    return rows, data


def check_jvp_through_solve(cfg, key, setup):
    """Why first-order responses use the sensitivity system (evidence for the README)."""
    k1, k2 = jax.random.split(key)
    model, x = setup.model, setup.inputs
    gauge = gj.LieDeformationGauge(cfg.dim, cfg.t1, key=k1, amplitude=cfg.amplitude)
    keys = jax.random.split(k2, 8)
    fwd = model.with_options(adjoint=diffrax.ForwardMode())

    @jax.jit
    def jvp_through(g):  # what a user writes: a jvp through the adaptive solve
        out = jax.jvp(lambda a: jax.vmap(gauge.act(a, fwd))(x), (gauge.identity(),), (g,))[1]
        return jnp.max(jnp.abs(out))

    through = float(jnp.max(jax.vmap(jvp_through)(jax.vmap(gauge.sample)(keys))))
    # the sweep's lane: the sensitivity system, under error control
    sens = float(jnp.max(jax.vmap(gj.sweep_lane(model, gauge, x))(keys)["max_abs"]))
    row = below(
        "jvp_through_solve", "First-order responses need error control on the tangent: a jvp "
        "through an adaptive solve (ForwardMode) chooses steps for the primal only",
        "method (DESIGN Sec. 3)", sens, cfg.tolerance,
        f"jvp through diffeqsolve: {through:.2e}; sensitivity system: {sens:.2e} "
        f"(same 8 vanishing generators, rtol {cfg.rtol:g})",
        tolerance=f"sensitivity system < {cfg.tolerance:g}",
    )  # fmt: skip
    return [row], {"jvp_through_solve": through, "sensitivity": sens}


CHECKS = [
    ("lie_bracket", check_lie_bracket),
    ("eq16", check_eq16),
    ("deform_vs_finite", check_deform_vs_finite),
    ("thm21", check_thm21),
    ("thm21_trajectory", check_thm21_trajectory),
    ("finite_families", check_finite_families),
    ("eq20", check_eq20),
    ("jvp_through_solve", check_jvp_through_solve),
]
# measured order of cost on 2 CPU cores (most expensive first)
EXPENSIVE_FIRST = ["thm21", "finite_families", "thm21_trajectory", "jvp_through_solve", "eq20"]


def build_setup(cfg: Config, key) -> _Setup:
    km, kx, kt, ky = jax.random.split(key, 4)
    field = gj.MLPField(cfg.dim, cfg.width, cfg.depth, key=km, out_scale=cfg.out_scale)
    model = gj.NeuralODE(
        field,
        t1=cfg.t1,
        stepsize_controller=diffrax.PIDController(rtol=cfg.rtol, atol=cfg.rtol),
    )
    inputs = jax.random.normal(kx, (cfg.num_inputs, cfg.dim))
    ts = jax.random.uniform(kt, (cfg.num_points,), maxval=cfg.t1)
    ys = jax.random.normal(ky, (cfg.num_points, cfg.dim))
    return _Setup(model, inputs, ts, ys)


def run(config: Config, run_dir: Path) -> dict:
    """Run every Section 2 check; write results, metrics and figures under `run_dir`."""
    setup = build_setup(config, jax.random.key(config.seed))
    return run_checks("node_symmetry", CHECKS, config, setup, run_dir, plot, EXPENSIVE_FIRST)


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    """Figures from saved `results.json` content: convergence slopes and sweep histograms."""
    fig_dir = Path(fig_dir)
    out = []
    if {"deform_vs_finite", "thm21", "eq20"} <= results.keys():
        d, t, e = (results[k] for k in ("deform_vs_finite", "thm21", "eq20"))
        series = [
            [(f"deform vs finite (slope {d['slope']:.2f})", d["scales"], d["gaps"])],
            [
                (f"vanishing eps (slope {t['slope_vanishing']:.2f})", t["scales"],
                 t["finite_vanishing"]),
                (f"free eps (slope {t['slope_free']:.2f})", t["scales"], t["finite_free"]),
            ],
            [
                (f"derived (slope {e['slopes'][0]:.2f})", e["scales"], e["field_gap_derived"]),
                (f"printed Eq. 20 (slope {e['slopes'][1]:.2f})", e["scales"],
                 e["field_gap_printed"]),
            ],
        ]  # fmt: skip
        titles = [
            "Lie deformation = 1st order of finite diffeo",
            "Thm 2.1: |x'(T) - x(T)| vs s",
            "Eq. 20: field gap to exact reparametrisation",
        ]
        panels = [(t_, "scale s", "max abs gap", s_) for t_, s_ in zip(titles, series, strict=True)]
        out.append(loglog_figure(fig_dir / "convergence.png", panels))
    return out + _sweep_figure(results, fig_dir, config)


def _sweep_figure(results, fig_dir, config) -> list[Path]:
    t, f = results.get("thm21", {}), results.get("finite_families", {})
    series = [
        (label, data[key])
        for label, data, key in [
            ("Lie, vanishing (1st order)", t, "first_order_vanishing"),
            ("Lie, free (1st order)", t, "first_order_free"),
            ("spatial diffeo (finite)", f.get("spatial", {}), "deviation"),
            ("time reparam (finite)", f.get("reparam", {}), "deviation"),
        ]
        if key in data
    ]
    if not series:
        return []
    title, path = "Gauge sweeps on a tanh-MLP neural ODE (float64)", fig_dir / "sweeps.png"
    xlabel = "log10 max |deviation| per gauge sample"
    return [histogram_figure(path, series, xlabel=xlabel, title=title, tolerance=config.tolerance)]
