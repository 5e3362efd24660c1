"""Sections 2.3 and 3 of the paper, checked numerically: Wilson lines (Eq. 22-23, 46), linear
gauge transformations (Eq. 25, 27), the integrated relation (Eq. 32) against Euler, discrete
gauges (Eq. 33), Theorem 3.1 and the ReLU rescaling symmetry (Eq. 29-30). float64.
"""

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
    in_band,
    loglog_figure,
    small_multiples_figure,
    validate_checks,
)

from ._common import run_checks


FAST_COMPILE = True  # many programs, each run briefly: gj.use_fast_compile in its process


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `linear_symmetry` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    dim: int = 4
    t1: float = 1.0
    rtol: float = 1e-11
    basis_modes: int = 2
    num_inputs: int = 8
    num_samples: int = 64
    chunk_size: int = 16
    layer_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    theorem_layers: int = 4
    magnus_steps: tuple[int, ...] = (8, 16, 32, 64)
    hidden_width: int = 16
    tolerance: float = 1e-8
    identity_tolerance: float = 1e-12
    slope_band: float = 0.15
    workers: int = 2
    checks: tuple[str, ...] = ()  # run only these checks (all when empty)

    def __post_init__(self):
        validate_checks(self.checks, CHECKS)
        if sum(n >= 4 for n in self.layer_counts) < 2:
            raise ValueError(
                f"`layer_counts` needs two or more values >= 4 for the Euler rate; received "
                f"{list(self.layer_counts)}."
            )
        if self.theorem_layers not in self.layer_counts:
            raise ValueError(
                f"`theorem_layers` ({self.theorem_layers}) must be one of `layer_counts` "
                f"{list(self.layer_counts)}."
            )


class _Setup(eqx.Module):
    model: gj.LinearNODE
    inputs: jax.Array


def build_setup(cfg: Config, key) -> _Setup:
    km, kx = jax.random.split(key)
    model = gj.random_linear_node(
        cfg.dim,
        cfg.t1,
        key=km,
        basis=gj.FourierBasis(cfg.t1, cfg.basis_modes),
        stepsize_controller=diffrax.PIDController(rtol=cfg.rtol, atol=cfg.rtol),
    )
    return _Setup(model, jax.random.normal(kx, (cfg.num_inputs, cfg.dim)))


def _max(a) -> float:
    return float(jnp.max(jnp.abs(a)))


def check_wilson(cfg, key, setup):
    model, T = setup.model, cfg.t1
    w, b = model.weight, model.bias
    A = jax.random.normal(key, (cfg.dim, cfg.dim)) / np.sqrt(cfg.dim)
    const = max(
        _max(gj.wilson_line(lambda t: A, 0.7 * T, 0.2 * T) - jax.scipy.linalg.expm(0.5 * T * A)),
        _max(gj.wilson_line(lambda t: A, 0.2 * T, 0.7 * T) - jax.scipy.linalg.expm(-0.5 * T * A)),
    )
    ref = gj.wilson_line(w, T, 0.0)
    magnus = {
        order: [
            _max(gj.wilson_line_magnus(w, T, 0.0, num_steps=n, order=order) - ref)
            for n in cfg.magnus_steps
        ]
        for order in (2, 4)
    }
    p2, p4 = (-gj.loglog_slope(cfg.magnus_steps, magnus[o]) for o in (2, 4))
    # Eq. 22's integral by 40-point Gauss-Legendre quadrature
    integral = gj.quadrature(lambda t: gj.wilson_line(w, 0.0, t) @ b(t), 0.0, T, 40)
    closed = jax.vmap(lambda z: ref @ (z + integral))(setup.inputs)
    eq22 = _max(closed - jax.vmap(model)(setup.inputs))
    forward = gj.wilson_line(w, 0.8 * T, 0.2 * T)
    propagator = _max(gj.wilson_line(w, 0.2 * T, 0.8 * T) @ forward - jnp.eye(cfg.dim))
    printed = _max(gj.wilson_line(lambda t: -w(t), 0.2 * T, 0.8 * T) @ forward - jnp.eye(cfg.dim))
    rows = [
        below("wilson_constant",
              "Wilson line of a constant w is expm(w (t1 - t2)), for both orders of the times",
              "Eq. 23", const, 1e-10),
        claim(
            "wilson_magnus",
            "Magnus integrators of order 2 (a product of small exponentials) and 4 converge to the "
            "Wilson line at their orders", "Eq. 23", p4,
            in_band(p2, 2, cfg.slope_band) and in_band(p4, 4, cfg.slope_band),
            f"slopes 2 and 4 +- {cfg.slope_band}",
            f"order-2 slope {p2:.2f}; order-4 error at {cfg.magnus_steps[-1]} steps "
            f"{magnus[4][-1]:.1e}"),
        below("eq22",
              "Closed form x(T) = W_{T:0}(x0 + int W_{0:t} b dt) equals the solved linear ODE",
              "Eq. 22", eq22, cfg.tolerance),
        claim("eq23_verdict",
              "Eq. 23 for t1 < t2 must be the reverse-ordered exponential of -w (the inverse "
              "propagator, Eq. 22's W(-w)); as printed (+w) it does not invert the forward line",
              "Eq. 22-23", propagator, propagator < 1e-9 and printed > 1e-2,
              "propagator: |W_{a:b} W_{b:a} - 1| < 1e-9; printed form: > 1e-2",
              f"printed form: |W W - 1| = {printed:.2e}"),
    ]  # fmt: skip
    data = {"magnus_steps": list(cfg.magnus_steps), "magnus2": magnus[2], "magnus4": magnus[4]}
    return rows, data


def check_linear_gauge(cfg, key, setup):
    model, x, T = setup.model, setup.inputs, cfg.t1
    k1, k2, k3 = jax.random.split(key, 3)
    kw = dict(num_samples=cfg.num_samples, chunk_size=cfg.chunk_size)
    res = {
        kind: gj.sweep(model, gj.LinearGauge(cfg.dim, T, kind=kind), x, key=k1, **kw)
        for kind in ("expm", "cayley")
    }
    # a 'gauge' with G(T) != 1 changes x(T) to G(T)^-1 x(T)
    A = 0.5 * jax.random.normal(k2, (cfg.dim, cfg.dim)) / np.sqrt(cfg.dim)
    c0 = jax.random.normal(k3, (cfg.dim,))

    def G(t):
        return jax.scipy.linalg.expm(t * A)

    def c(t):
        return jnp.sin(jnp.pi * t / T) * c0

    broken = model.with_field(
        gj.FunctionLinearField(*gj.linear_gauge_transform(model.weight, model.bias, G, c))
    )
    out, old = jax.vmap(broken)(x), jax.vmap(model)(x)
    pred_err, change = _max(out - jnp.linalg.solve(G(T), old.T).T), _max(out - old)
    # covariance of Wilson lines
    gauge = gj.LinearGauge(cfg.dim, T)
    g = gauge.sample(k3)
    mp, new = gauge.to_map(g), gauge.act(g, model)
    cov = max(
        _max(
            gj.wilson_line(new.weight, a, b)
            - jnp.linalg.solve(mp.G(a), gj.wilson_line(model.weight, a, b) @ mp.G(b))
        )
        for a, b in [(0.9 * T, 0.15 * T), (0.15 * T, 0.9 * T)]
    )
    s = {k: r.summary() for k, r in res.items()}
    worst = max(v["max_abs_max"] for v in s.values())
    rows = [
        claim("eq25",
              f"Linear gauge transformations with G(0)=G(T)=1, c(0)=c(T)=0 leave x(T) unchanged "
              f"({cfg.num_samples} expm and {cfg.num_samples} Cayley samples)", "Eq. 24-25",
              worst, worst < cfg.tolerance and not any(v["failures"] for v in s.values()),
              f"< {cfg.tolerance:g} (rtol {cfg.rtol:g})",
              f"expm {s['expm']['max_abs_max']:.1e}, Cayley {s['cayley']['max_abs_max']:.1e}"),
        below("eq25_violating",
              f"With G(T) != 1 the output changes (by {change:.2e}) exactly to G(T)^-1 x(T)",
              "Eq. 24-25", pred_err, cfg.tolerance, ok=change > 1e-2),
        below(
            "eq46",
            "Wilson lines are covariant: W(w')_{t1:t2} = G(t1)^-1 W(w)_{t1:t2} G(t2), both orders",
            "Eq. 46", cov, cfg.tolerance),
    ]  # fmt: skip
    data = {f"deviation_{k}": r.max_abs for k, r in res.items()}
    return rows, data


def check_eq27(cfg, key, setup):
    model, x, T = setup.model, setup.inputs, cfg.t1
    w, b, F = model.weight, model.bias, model.field
    c = 0.4 * jax.random.normal(key, (2,))

    def e(t):
        return c[0] * jnp.sin(jnp.pi * t / T) + c[1] * jnp.sin(2 * jnp.pi * t / T)

    pts = jnp.linspace(0.05, 0.95, 5) * T
    ys = x[jnp.arange(5) % x.shape[0]]

    @jax.jit
    def gaps(h):
        def G(t):
            return jnp.eye(cfg.dim) + h * e(t) * w(t)

        def cc(t):
            return h * e(t) * b(t)

        lg = gj.FunctionLinearField(*gj.linear_gauge_transform(w, b, G, cc))

        def gap(tau):
            f = gj.reparametrize(F, tau)
            return jnp.max(
                jax.vmap(lambda t, y: jnp.max(jnp.abs(lg(t, y) - f(t, y, None))))(pts, ys)
            )

        return gap(lambda s: s - h * e(s)), gap(lambda s: s + h * e(s))

    hs = [0.04, 0.02, 0.01]
    vals = np.array([[float(v) for v in gaps(h)] for h in hs])
    p_minus, p_plus = gj.loglog_slope(hs, vals[:, 0]), gj.loglog_slope(hs, vals[:, 1])
    row = slope_claim(
        "eq27", "The time reparametrisation is the linear gauge G = 1 + eps w, c = eps b: its "
        "field equals reparametrize(t = s - eps(s)) to O(eps^2)", "Eq. 26-27", p_minus, 2,
        cfg.slope_band, f"with t = s + eps(s) instead: slope {p_plus:.2f} (the sign convention "
        "of Eq. 24 maps the new variable into the old one)",
        ok=in_band(p_plus, 1, cfg.slope_band),
    )  # fmt: skip
    return [row], {"scales": hs, "gap_minus": vals[:, 0], "gap_plus": vals[:, 1]}


def check_discrete(cfg, key, setup):
    model, x, T = setup.model, setup.inputs, cfg.t1
    w, b = model.weight, model.bias
    ref = jax.vmap(model)(x)
    # Eq. 32 for every N at once (one compiled solve), against Euler
    layers = gj.discretize_many(w, b, T, cfg.layer_counts)
    exact = [_max(jax.vmap(gj.LinearNet(*net))(x) - ref) for net in layers]
    euler = [
        _max(jax.vmap(gj.LinearNet(*gj.euler_discretize(w, b, T, N)))(x) - ref)
        for N in cfg.layer_counts
    ]
    # and `discretize` itself, for the theorem's N, agrees with the batched layers
    direct = gj.discretize(w, b, T, cfg.theorem_layers)
    batched_gap = _max(direct[0] - layers[list(cfg.layer_counts).index(cfg.theorem_layers)][0])
    # Euler's 1/N rate is asymptotic: fit it where N >= 4 (N = 1, 2 are pre-asymptotic)
    tail = [i for i, N in enumerate(cfg.layer_counts) if N >= 4]
    p_euler = gj.loglog_slope([cfg.layer_counts[i] for i in tail], [euler[i] for i in tail])
    k1, k2 = jax.random.split(key)
    N = cfg.theorem_layers
    net = gj.LinearNet(*direct)
    dg = gj.DiscreteLinearGauge(cfg.dim, N)
    res = gj.sweep(net, dg, x, key=k1, num_samples=cfg.num_samples, chunk_size=cfg.chunk_size)
    g = dg.sample(k2)
    lifted = gj.lift(g.Gs, g.cs, T)
    lhs = gj.discretize(*gj.linear_gauge_transform(w, b, lifted.G, lifted.c), T, N)
    rhs = gj.discrete_gauge_transform(net.weights, net.biases, g.Gs, g.cs)
    thm = max(_max(lhs[0] - rhs[0]), _max(lhs[1] - rhs[1]))
    flip = g.Gs.at[1].set(g.Gs[1] @ jnp.diag(jnp.array([-1.0] + [1.0] * (cfg.dim - 1))))
    try:
        gj.lift(flip, g.cs, T)
        refused = False
    except ValueError:
        refused = True
    rows = [
        claim("eq32",
              "The integrated relation (Wilson line per layer + integrated bias) reproduces x(T) "
              f"exactly for every N in {list(cfg.layer_counts)}; Euler does not", "Eq. 31-32",
              max(exact),
              max(exact) < cfg.tolerance and in_band(p_euler, -1, 0.2) and batched_gap < 1e-12,
              f"< {cfg.tolerance:g}; Euler slope (N >= 4) -1 +- 0.2",
              f"Euler error {euler[0]:.2e} (N={cfg.layer_counts[0]}) to {euler[-1]:.2e} "
              f"(N={cfg.layer_counts[-1]}), slope {p_euler:.2f}; discretize vs batched layers "
              f"{batched_gap:.1e}"),
        below("eq33",
              f"Discrete gauges (G_n, c_n) with fixed ends leave the linear network's output "
              f"unchanged ({cfg.num_samples} samples, N={N})", "Eq. 33-34",
              float(res.max_rel.max()), cfg.identity_tolerance,
              tolerance=f"relative < {cfg.identity_tolerance:g}"),
        below("thm31",
              "Theorem 3.1: the lifted continuous gauge, discretised, equals the discrete gauge of "
              "the discretised network; a G_n with det < 0 is refused (no lift exists in GL+)",
              "Thm 3.1, Eq. 46", thm, cfg.tolerance, f"det < 0 refused: {refused}", ok=refused),
    ]  # fmt: skip
    data = {"layers": list(cfg.layer_counts), "exact": exact, "euler": euler, "eq33": res.max_rel}
    return rows, data


def check_rescaling(cfg, key, setup):
    x = setup.inputs
    ks = jax.random.split(key, 6)
    d, h = cfg.dim, cfg.hidden_width
    kw = dict(num_samples=cfg.num_samples, chunk_size=cfg.chunk_size)
    out, data = {}, {}
    for i, act in enumerate(("relu", "leaky_relu", "tanh", "gelu")):
        # positive bias offsets keep the ReLU units alive, so relative deviations are meaningful
        weights = jax.random.normal(ks[0], (4, d, d)) / np.sqrt(d)
        net = gj.FeedforwardNet(weights, 1.0 + jax.random.normal(ks[1], (4, d)), act)
        gauge = gj.RescalingGauge((d,) * 3, 0.7, require_symmetry=act in ("relu", "leaky_relu"))
        res = gj.sweep(net, gauge, x, key=ks[2 + i % 2], **kw)
        out[act] = res
        data[act] = res.max_rel
    mlp = eqx.nn.MLP(d, 2, h, 3, activation=jax.nn.relu, key=ks[4])
    res_mlp = gj.sweep(mlp, gj.RescalingGauge((h, h, h), 0.7), x, key=ks[5], **kw)
    data["eqx_mlp"] = res_mlp.max_rel
    exact = max(float(out[a].max_rel.max()) for a in ("relu", "leaky_relu"))
    exact = max(exact, float(res_mlp.max_rel.max()))
    broken = min(float(out[a].max_abs.min()) for a in ("tanh", "gelu"))
    rows = [
        below("eq29_relu",
              "Positive per-neuron rescaling leaves ReLU and leaky-ReLU networks unchanged "
              "(gaugejax FeedforwardNet and eqx.nn.MLP)", "Eq. 29-30", exact,
              cfg.identity_tolerance, tolerance=f"relative < {cfg.identity_tolerance:g}"),
        above("eq29_broken",
              "Negative control: for tanh and GELU (not positively homogeneous) the same rescaling "
              "changes the output (min over samples)", "Eq. 30", broken, 1e-3,
              tolerance="> 1e-3"),
    ]  # fmt: skip
    return rows, data


def check_cnn_gnn(cfg, key, setup):
    """App. C: per-channel rescaling of CNNs with L_s pooling, broken by normalisation; GNNs."""
    ks = jax.random.split(key, 6)
    kw = dict(num_samples=cfg.num_samples, chunk_size=cfg.chunk_size)
    images = jax.random.normal(ks[0], (cfg.num_inputs, 2, 8, 8))
    channels = (3, 4)
    gauge = gj.RescalingGauge(channels, 0.7)
    pools = {"none": None, "L1": 1.0, "L2": 2.0, "Linf": float("inf")}
    devs = {}
    for name, pool in pools.items():
        net = gj.ConvNet(2, channels, 8, 2, key=ks[1], pool=pool)
        devs[name] = gj.sweep(net, gauge, images, key=ks[2], **kw).max_rel
    normed = gj.ConvNet(2, channels, 8, 2, key=ks[1], pool=1.0, norm="instance")
    loose = gj.RescalingGauge(channels, 0.7, require_symmetry=False)
    devs["instance_norm"] = gj.sweep(normed, loose, images, key=ks[2], **kw).max_rel
    upper = jnp.triu((jax.random.uniform(ks[3], (6, 6)) < 0.5).astype(float), 1)
    gnn = gj.GraphConvNet(upper + upper.T, (3, 5, 2), key=ks[4])
    feats = jax.random.normal(ks[5], (cfg.num_inputs, 6, 3))
    devs["gnn"] = gj.sweep(gnn, gj.RescalingGauge((5,), 0.7), feats, key=ks[2], **kw).max_rel
    exact = max(float(np.max(devs[n])) for n in (*pools, "gnn"))
    broken = float(np.min(devs["instance_norm"]))
    rows = [
        below("eq52_cnn",
              "Per-channel filter rescaling of consecutive conv layers leaves a ReLU CNN unchanged "
              "with no pooling and with L_1, L_2, L_inf pooling; likewise a graph-convolution pair",
              "App. C, Eq. 49-52", exact, cfg.identity_tolerance,
              ", ".join(f"{n} {float(np.max(devs[n])):.1e}" for n in (*pools, "gnn")),
              tolerance=f"relative < {cfg.identity_tolerance:g}"),
        above("eq52_norm",
              "Negative control: inserting a per-channel (instance) normalisation breaks the "
              "rescaling symmetry (min relative change over samples)", "App. C", broken, 1e-2,
              tolerance="> 1e-2"),
    ]  # fmt: skip
    return rows, devs


CHECKS = [
    ("wilson", check_wilson),
    ("linear_gauge", check_linear_gauge),
    ("eq27", check_eq27),
    ("discrete", check_discrete),
    ("rescaling", check_rescaling),
    ("cnn_gnn", check_cnn_gnn),
]
EXPENSIVE_FIRST = ["linear_gauge", "discrete", "wilson"]


def run(config: Config, run_dir: Path) -> dict:
    """Run every Section 2.3 / 3 check; write results, metrics and figures under `run_dir`."""
    setup = build_setup(config, jax.random.key(config.seed))
    return run_checks("linear_symmetry", CHECKS, config, setup, run_dir, plot, EXPENSIVE_FIRST)


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    """Figures from saved `results.json` content."""
    fig_dir = Path(fig_dir)
    out = []
    if {"discrete", "wilson"} <= results.keys():
        out.append(_discretisation_figure(results, fig_dir))
    groups = [
        ("Eq. 25 linear gauges (abs)", [("expm", "linear_gauge", "deviation_expm"),
                                        ("Cayley", "linear_gauge", "deviation_cayley")]),
        ("Eq. 33 discrete gauges (rel)", [("Eq. 33", "discrete", "eq33")]),
        ("Eq. 29 rescaling (rel)", [("ReLU net", "rescaling", "relu"),
                                    ("eqx.nn.MLP", "rescaling", "eqx_mlp"),
                                    ("tanh: broken", "rescaling", "tanh")]),
        ("App. C CNN rescaling (rel)", [("L_inf pooling", "cnn_gnn", "Linf"),
                                        ("instance norm: broken", "cnn_gnn", "instance_norm")]),
    ]  # fmt: skip
    panels = [
        (title, [(label, results[check][entry]) for label, check, entry in entries])
        for title, entries in groups
        if all(check in results for _, check, _ in entries)
    ]
    if panels:
        out.append(
            small_multiples_figure(
                fig_dir / "sweeps.png",
                panels,
                xlabel="log10 max deviation per sample",
                title="Linear and rescaling gauge sweeps (float64)",
            )
        )
    return out


def _discretisation_figure(results, fig_dir) -> Path:
    d, w = results["discrete"], results["wilson"]
    layers = [
        ("Euler: w_n = 1 + Delta w(n Delta)", d["layers"], d["euler"]),
        ("integrated (Eq. 32)", d["layers"], d["exact"]),
    ]
    magnus = [
        ("Magnus order 2", w["magnus_steps"], w["magnus2"]),
        ("Magnus order 4", w["magnus_steps"], w["magnus4"]),
    ]
    panels = [
        (
            "Linear network from a linear neural ODE",
            "number of layers N",
            "max |x_N - x(T)|",
            layers,
        ),
        ("Wilson line: Magnus vs adaptive diffrax", "steps", "max |W - W_ref|", magnus),
    ]
    # the values run are the ticks, not powers of ten
    return loglog_figure(fig_dir / "discretisation.png", panels, ticks=True)
