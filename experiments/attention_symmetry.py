"""Section 4 of the paper, checked numerically: attention gauge symmetries (Eq. 35-37) per
activation and alpha, the printed Eq. 36 against the derived condition, multi-head attention
with residual and LayerNorm, W_qk merging (footnote 10), the cubic neural ODE (Eq. 38) and
attention as an integrated neural ODE with its diffeomorphism correspondence (Eq. 39-42)."""

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
    io,
    loglog_figure,
    pyplot,
    validate_checks,
)

from ._common import run_checks


FAST_COMPILE = True  # many programs, each run briefly: gj.use_fast_compile in its process


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `attention_symmetry` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    dim: int = 4
    num_tokens: int = 6
    num_sequences: int = 8
    num_heads: int = 2
    head_dim: int = 3
    num_samples: int = 64
    chunk_size: int = 16
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    scales: tuple[float, ...] = (1e-2, 5e-3, 2.5e-3)
    tolerance: float = 1e-8
    identity_tolerance: float = 1e-12
    slope_band: float = 0.15
    workers: int = 2
    checks: tuple[str, ...] = ()  # run only these checks (all when empty)

    def __post_init__(self):
        validate_checks(self.checks, CHECKS)


class _Setup(eqx.Module):
    x: jax.Array
    Wq: jax.Array
    Wk: jax.Array
    Wv: jax.Array


def build_setup(cfg: Config, key) -> _Setup:
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (cfg.num_sequences, cfg.num_tokens, cfg.dim))
    Wq, Wk, Wv = jax.random.normal(kw, (3, cfg.dim, cfg.dim)) / np.sqrt(cfg.dim)
    return _Setup(x, Wq, Wk, Wv)


def check_table(cfg, key, setup):
    """Max relative deviation per activation x alpha x condition over random A."""
    table = {}
    for act in ("relu", "identity", "softmax"):
        model = gj.SelfAttention(setup.Wq, setup.Wk, setup.Wv, act)
        for condition in ("derived", "printed"):
            for alpha in cfg.alphas:
                # fixed_alpha is an array: every alpha shares one compiled sweep program
                gauge = gj.AttentionGauge(
                    cfg.dim,
                    condition=condition,
                    require_symmetry=False,
                    fixed_alpha=jnp.asarray(alpha),
                )
                res = gj.sweep(
                    model,
                    gauge,
                    setup.x,
                    key=key,
                    num_samples=cfg.num_samples,
                    chunk_size=cfg.chunk_size,
                )
                table[f"{act}/{condition}/{alpha:g}"] = res.max_rel
    worst = {k: float(np.max(v)) for k, v in table.items()}
    best = {k: float(np.min(v)) for k, v in table.items()}
    exact_keys = [
        k
        for k in table
        if k.split("/")[1] == "derived"
        and (k.split("/")[0] != "softmax" or float(k.split("/")[2]) == 1.0)
    ]
    broken_soft = [
        k for k in table if k.startswith("softmax/derived/") and float(k.split("/")[2]) != 1.0
    ]
    printed = [k for k in table if k.split("/")[1] == "printed"]
    exact = max(worst[k] for k in exact_keys)
    rows = [
        below("eq36_derived",
              "With A B^T = alpha I: ReLU and identity attention are invariant for every alpha "
              f"in {list(cfg.alphas)}, softmax for alpha = 1 ({cfg.num_samples} random A each)",
              "Eq. 35-37", exact, cfg.identity_tolerance,
              tolerance=f"relative < {cfg.identity_tolerance:g}"),
        above("eq36_softmax_alpha",
              "Softmax attention is not invariant for alpha != 1 (min relative change)", "Eq. 37",
              min(best[k] for k in broken_soft), 1e-3, tolerance="> 1e-3"),
        above("eq36_verdict",
              "The printed Eq. 36 (A B = alpha I) does not leave Eq. 35 invariant for general A "
              "(min relative change over samples, every activation and alpha); the derived "
              "condition A B^T = alpha I does", "Eq. 36", min(best[k] for k in printed), 1e-3,
              ok=exact < cfg.identity_tolerance, tolerance="printed: > 1e-3"),
    ]  # fmt: skip
    return rows, {"table": table}


def check_multihead(cfg, key, setup):
    ks = jax.random.split(key, 3)
    x, d = setup.x, cfg.dim
    devs = {}
    for residual, ln in [(False, False), (True, True)]:
        mh = gj.MultiHeadAttention(
            d,
            cfg.num_heads,
            cfg.head_dim,
            key=ks[0],
            activation="relu",
            residual=residual,
            layer_norm=ln,
        )
        gauge = gj.AttentionGauge(cfg.head_dim, num_heads=cfg.num_heads, value_output=True)
        devs[f"mh residual={residual} ln={ln}"] = gj.sweep(
            mh, gauge, x, key=ks[1], num_samples=cfg.num_samples, chunk_size=cfg.chunk_size
        ).max_rel
    exact = max(float(np.max(v)) for v in devs.values())
    scale = {}
    for residual, ln, eps in [
        (False, True, 1e-12),
        (False, True, 1e-5),
        (True, True, 1e-12),
        (False, False, 0.0),
    ]:
        mh = gj.MultiHeadAttention(
            d,
            cfg.num_heads,
            cfg.head_dim,
            key=ks[2],
            residual=residual,
            layer_norm=ln,
            norm_eps=eps,
        )
        scaled = eqx.tree_at(lambda m: m.Wo, mh, 3.0 * mh.Wo)
        out, ref = jax.vmap(scaled)(x), jax.vmap(mh)(x)
        scale[(residual, ln, eps)] = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    merged_err, merged_inv = 0.0, 0.0
    A = jax.random.normal(ks[2], (d, d))
    for act in ("softmax", "relu"):
        model = gj.SelfAttention(setup.Wq, setup.Wk, setup.Wv, act, scaled=True)
        merged = gj.MergedAttention.from_attention(model)
        ref = jax.vmap(model)(x)
        merged_err = max(
            merged_err, float(jnp.max(jnp.abs(jax.vmap(merged)(x) - ref)) / jnp.max(jnp.abs(ref)))
        )
        gauged = gj.SelfAttention(
            *gj.attention_gauge(setup.Wq, setup.Wk, setup.Wv, A, 1.0), act, scaled=True
        )
        merged_inv = max(
            merged_inv,
            float(jnp.max(jnp.abs(gj.MergedAttention.from_attention(gauged).Wqk - merged.Wqk))),
        )
    ok_scale = (
        scale[(False, True, 1e-12)] < 1e-9
        and scale[(True, True, 1e-12)] > 1e-3
        and scale[(False, False, 0.0)] > 1e-3
    )
    rows = [
        below("multihead",
              "Multi-head attention: per-head A_h, alpha_h and the value/output mixing "
              "(Wv_h M_h, M_h^-1 Wo_h) leave ReLU multi-head attention unchanged, also with the "
              "residual and LayerNorm (both act outside the heads)", "Eq. 37 per head", exact,
              cfg.identity_tolerance, tolerance=f"relative < {cfg.identity_tolerance:g}"),
        claim("layernorm_residual",
              "An output scale Wo -> 3 Wo is a symmetry only with LayerNorm and no residual "
              "(relative change shown for LN eps = 1e-12); the residual breaks it",
              "Sec. 4 (beyond the paper)", scale[(False, True, 1e-12)], ok_scale,
              "< 1e-9 with LN, > 1e-3 otherwise",
              f"LN eps 1e-5: {scale[(False, True, 1e-5)]:.1e}; residual + LN: "
              f"{scale[(True, True, 1e-12)]:.2e}; no LN: {scale[(False, False, 0.0)]:.2e}"),
        below("wqk_merge",
              "Merging W_qk = Wq Wk^T computes the same attention and is invariant under the "
              "GL(d) part of the gauge", "footnote 10", merged_err, cfg.identity_tolerance,
              f"W_qk change under the gauge {merged_inv:.1e}",
              ok=merged_inv < cfg.identity_tolerance,
              tolerance=f"relative < {cfg.identity_tolerance:g}"),
    ]  # fmt: skip
    return rows, {k: v for k, v in devs.items()}


def check_cubic(cfg, key, setup):
    k1, k2, k3 = jax.random.split(key, 3)
    d = cfg.dim
    A0 = 0.3 * jax.random.normal(k1, (d, d))
    lam0 = 0.3 * jax.random.normal(k2, (d, d, d, d))
    x0 = jax.random.normal(k3, (d,))

    def w(t):
        return A0 * jnp.cos(jnp.pi * t)

    def lam(t):
        return lam0 * (1.0 + t)

    W, Lam = gj.integrated_cubic(w, lam, 1.0)
    tight = diffrax.PIDController(rtol=1e-12, atol=1e-12)

    @jax.jit
    def err(eps):
        xe, _ = gj.solve(gj.CubicField(w, lam, eps), x0, t1=1.0, stepsize_controller=tight)
        return jnp.max(jnp.abs(xe - (W @ x0 + eps * jnp.einsum("ijkl,j,k,l->i", Lam, x0, x0, x0))))

    errs = [float(err(jnp.asarray(s))) for s in cfg.scales]
    p = gj.loglog_slope(cfg.scales, errs)
    row = slope_claim(
        "eq38", "The cubic neural ODE's solution agrees with W_{T:0} x0 + Lambda x0^3 up to "
        "O(lambda^2)", "Eq. 38", p, 2, cfg.slope_band,
        "errors " + ", ".join(f"{e:.1e}" for e in errs),
    )  # fmt: skip
    return [row], {"scales": list(cfg.scales), "errors": errs}


def check_attention_node(cfg, key, setup):
    x, Wq, Wk, Wv = setup.x[0], setup.Wq, setup.Wk, setup.Wv
    h = gj.attention(x, Wq, Wk, Wv, "identity")
    errs = [
        float(jnp.max(jnp.abs(gj.attention_as_node(Wq, Wk, Wv, scale=s)(x) - (x + s * h))))
        for s in cfg.scales
    ]
    p = gj.loglog_slope(cfg.scales, errs)
    node = gj.attention_as_node(Wq, Wk, Wv, scale=cfg.scales[0])
    eq41 = float(
        jnp.max(jnp.abs(gj.attention(x, *node.weights(), "identity") - h)) / jnp.max(jnp.abs(h))
    )
    gauge = gj.LinearGauge(cfg.dim, node.t1)
    G = gauge.to_map(gauge.sample(key)).G
    new = node.diffeomorphism(G)
    Gt0 = G(jnp.asarray(node.t0))
    expected = gj.attention_gauge(*node.weights(), jnp.linalg.inv(Gt0).T, 1.0)
    corr = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(new.weights(), expected, strict=True))
    outputs = float(jnp.max(jnp.abs(new(x) - node(x))))
    printed = gj.attention_gauge(*node.weights(), jnp.linalg.inv(Gt0).T, 1.0, condition="printed")
    printed_gap = float(jnp.max(jnp.abs(new.weights()[1] - printed[1])))
    q, kk, v = node.rescale(2.0).weights()
    q0, k0, v0 = node.weights()
    alpha_gap = max(float(jnp.max(jnp.abs(kk - 2.0 * k0))), float(jnp.max(jnp.abs(v - v0 / 2.0))))
    rows = [
        claim("eq39_42",
              f"Attention without activation is an integrated neural ODE: {cfg.num_tokens} tokens "
              "(index structure of Eq. 42), instantaneous cubic nonlinearity, W_{T:0} = 1; the "
              "output is x + attention(x) + O(lambda^2)", "Eq. 39-42", p,
              in_band(p, 2, cfg.slope_band) and eq41 < cfg.identity_tolerance,
              f"slope 2 +- {cfg.slope_band}; Eq. 41 weights exact",
              f"Eq. 41 weights reproduce attention to {eq41:.1e} (relative)"),
        below("diffeo_to_gauge",
              "A spatial diffeomorphism G(t) with G(0) = G(T) = 1 changes the Eq. 41 weights by "
              "the attention gauge with alpha = 1, A = G(t0)^-T, B = G(t0) (so A B^T = 1, not "
              "the printed A B = 1), and leaves the output unchanged; alpha is the "
              "lambda -> lambda/alpha, lambda~ -> alpha lambda~ redundancy", "Sec. 4.2", corr,
              cfg.tolerance,
              f"outputs {outputs:.1e}; printed-condition mismatch {printed_gap:.2e}; "
              f"alpha part {alpha_gap:.1e}", ok=outputs < cfg.tolerance and printed_gap > 1e-3
              and alpha_gap < cfg.identity_tolerance),
    ]  # fmt: skip
    return rows, {"scales": list(cfg.scales), "errors": errs}


CHECKS = [
    ("table", check_table),
    ("multihead", check_multihead),
    ("cubic", check_cubic),
    ("attention_node", check_attention_node),
]
EXPENSIVE_FIRST = ["table", "attention_node", "multihead"]


def run(config: Config, run_dir: Path) -> dict:
    """Run every Section 4 check; write results, metrics and figures under `run_dir`."""
    setup = build_setup(config, jax.random.key(config.seed))
    return run_checks("attention_symmetry", CHECKS, config, setup, run_dir, plot, EXPENSIVE_FIRST)


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    """Figures from saved `results.json` content."""
    plt = pyplot()
    fig_dir = Path(fig_dir)
    out = []
    if "table" in results:
        out.append(_table_figure(plt, results["table"]["table"], fig_dir))
    if {"cubic", "attention_node"} <= results.keys():
        out.append(_integrated_figure(results, fig_dir))
    if "multihead" in results:
        out.append(
            histogram_figure(
                fig_dir / "multihead.png",
                list(results["multihead"].items()),
                xlabel="log10 max relative deviation",
                title="Multi-head attention gauge sweeps",
            )
        )
    return out


def _table_figure(plt, table, fig_dir) -> Path:
    keys = list(table)
    worst = [np.log10(max(float(np.max(table[k])), 1e-17)) for k in keys]
    fig, ax = plt.subplots(figsize=(10, 4))
    colors = ["tab:green" if v < -10 else "tab:red" for v in worst]
    ax.bar(range(len(keys)), worst, color=colors)
    ax.set_xticks(range(len(keys)), keys, rotation=70, fontsize=7)
    ax.set_ylabel("log10 max relative deviation")
    ax.set_title("Attention gauge: activation / condition / alpha (green: symmetry holds)")
    return io.save_figure(fig, fig_dir / "attention_table.png", close=True)


def _integrated_figure(results, fig_dir) -> Path:
    panels = []
    for name, title in [
        ("cubic", "Eq. 38: cubic ODE vs leading order"),
        ("attention_node", "Eq. 39-42: NODE vs x + attention"),
    ]:
        r = results[name]
        label = f"slope {gj.loglog_slope(r['scales'], r['errors']):.2f}"
        panels.append((title, "lambda scale", "max abs error", [(label, r["scales"], r["errors"])]))
    return loglog_figure(fig_dir / "integrated.png", panels)
