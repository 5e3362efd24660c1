"""Orbit geometry (paper Sec. 5 and Kunin et al. 2020): the gradient of a gauge-invariant loss is
orthogonal to the gauge orbit, for the MLP (ReLU rescaling), attention (A B^T = alpha I),
discrete linear network (Eq. 33) and linear neural ODE (Eq. 25, in function space) families;
the rescaling symmetry's conserved quantity drifts at O(learning rate) under gradient descent
and is destroyed by weight decay. Every family has a negative control that breaks the symmetry.
"""

import dataclasses
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gaugejax as gj
from gaugejax import (
    claim_above as above,
    claim_below as below,
    claim_slope as slope_claim,
    io,
    orbits,
    plain_log_ticks,
    pyplot,
    small_multiples,
    validate_checks,
)

from ._common import run_checks


FAST_COMPILE = True  # many programs, each run briefly: gj.use_fast_compile in its process


@dataclasses.dataclass(frozen=True)
class Config:
    """Config of `orbit_geometry` (the embedded defaults are the `default` preset)."""

    seed: int = 0
    dim: int = 4
    width: int = 16
    num_layers: int = 4
    num_tokens: int = 5
    num_data: int = 64
    num_directions: int = 32
    weight_decay: float = 0.1
    tolerance: float = 1e-10
    node_rtol: float = 1e-10
    node_tolerance: float = 1e-8
    num_knots: int = 32
    control_min: float = 1e-4
    learning_rates: tuple[float, ...] = (0.004, 0.002, 0.001, 0.0005)
    flow_time: float = 0.2
    decay: float = 0.5
    slope_band: float = 0.2
    workers: int = 2
    checks: tuple[str, ...] = ()  # run only these checks (all when empty)

    def __post_init__(self):
        validate_checks(self.checks, CHECKS)
        if len(self.learning_rates) < 2 or any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(
                "`learning_rates` must hold at least two values > 0 (a slope needs two); "
                f"received {list(self.learning_rates)}."
            )


class _Setup(eqx.Module):
    x: jax.Array
    y: jax.Array
    tokens: jax.Array
    token_targets: jax.Array


def _abs_max(a) -> float:
    return float(jnp.max(jnp.abs(a)))


def _cosine_rows(cfg, name, family, equation, invariant, control, control_text, tolerance):
    rows = [
        below(f"orthogonal_{name}",
              f"The gradient of an invariant loss is orthogonal to the gauge orbit: {family} "
              f"({cfg.num_directions} random orbit tangents)", equation, _abs_max(invariant),
              tolerance, tolerance=f"max |cos| < {tolerance:g}"),
        above(f"control_{name}",
              f"Negative control, {control_text}: the gradient gains a component along the orbit",
              equation, _abs_max(control), cfg.control_min,
              tolerance=f"max |cos| > {cfg.control_min:g}"),
    ]  # fmt: skip
    data = {"invariant": np.abs(np.asarray(invariant)), "control": np.abs(np.asarray(control))}
    return rows, data


def _mse(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _mlp_family(cfg, key, setup):
    mlp = eqx.nn.MLP(cfg.dim, cfg.dim, cfg.width, 2, activation=jax.nn.relu, key=key)
    return (
        mlp,
        gj.RescalingGauge((cfg.width, cfg.width), 0.5),
        lambda m: _mse(m, setup.x, setup.y),
        lambda m: sum(jnp.sum(lin.weight**2) for lin in m.layers),
        (f"ReLU MLP (width {cfg.width}), per-neuron rescaling", "Eq. 30", ""),
    )


def _attention_family(cfg, key, setup):
    att = gj.SelfAttention(
        *jax.random.normal(key, (3, cfg.dim, cfg.dim)) / np.sqrt(cfg.dim), "relu"
    )
    return (
        att,
        gj.AttentionGauge(cfg.dim),
        lambda m: jnp.mean((jax.vmap(m)(setup.tokens) - setup.token_targets) ** 2),
        lambda m: jnp.sum(m.Wq**2),
        (
            "ReLU self-attention, Q -> Q A, K -> K B with A B^T = alpha I",
            "Eq. 36 (derived form)",
            " on W_Q",
        ),
    )


def _linear_net_family(cfg, key, setup):
    W = jax.random.normal(key, (cfg.num_layers, cfg.dim, cfg.dim)) / np.sqrt(cfg.dim)
    return (
        gj.LinearNet(W, jnp.zeros((cfg.num_layers, cfg.dim))),
        gj.DiscreteLinearGauge(cfg.dim, cfg.num_layers),
        lambda m: _mse(m, setup.x, setup.y),
        lambda m: jnp.sum(m.weights**2),
        (f"linear network ({cfg.num_layers} layers), W_n -> G_n^-1 W_n G_(n-1)", "Eq. 33", ""),
    )


_FAMILIES = {"mlp": _mlp_family, "attention": _attention_family, "linear_net": _linear_net_family}


def _parameter_check(name):
    """The check of a family whose gauge acts on parameters: cosines of the invariant loss, and
    of the loss plus weight decay (the control)."""

    def check(cfg, key, setup):
        km, kc = jax.random.split(key)
        model, gauge, loss, squares, (family, equation, where) = _FAMILIES[name](cfg, km, setup)
        keys = jax.random.split(kc, cfg.num_directions)
        cosines = eqx.filter_jit(orbits.gradient_orbit_cosines)
        invariant = cosines(loss, model, gauge, keys)
        control = cosines(lambda m: loss(m) + cfg.weight_decay * squares(m), model, gauge, keys)
        control_text = f"weight decay {cfg.weight_decay:g}{where}"
        return _cosine_rows(
            cfg, name, family, equation, invariant, control, control_text, cfg.tolerance
        )

    return check


def check_linear_node(cfg, key, setup):
    km, kc = jax.random.split(key)
    tight = diffrax.PIDController(rtol=cfg.node_rtol, atol=cfg.node_rtol)
    model = gj.random_linear_node(cfg.dim, 1.0, key=km, stepsize_controller=tight)
    keys = jax.random.split(kc, cfg.num_directions)

    def loss(out):
        return jnp.mean((out - setup.y) ** 2)

    def cosines(gauge):
        fn = eqx.filter_jit(orbits.function_space_cosines)
        return fn(loss, model, gauge, setup.x, keys, num_knots=cfg.num_knots)

    # the control: the boundary-free family, G(T) != 1 and c(T) != 0
    gauge = gj.LinearGauge(cfg.dim, 1.0)
    return _cosine_rows(
        cfg,
        "linear_node",
        "linear neural ODE, x -> G(t) y + c(t) with G(0) = G(T) = 1 (function space, L2)",
        "Eq. 25",
        cosines(gauge),
        cosines(gauge.control()),
        "G(T) != 1",
        cfg.node_tolerance,
    )


def check_drift(cfg, key, setup):
    k1, k2 = jax.random.split(key)
    W = jax.random.normal(k1, (3, cfg.dim, cfg.dim)) / np.sqrt(cfg.dim)
    net = gj.FeedforwardNet(W, 1.0 + jax.random.normal(k2, (3, cfg.dim)), "relu")
    q0 = jnp.stack(orbits.rescaling_conserved_quantity(net))

    def drift(lr, decay=0.0):
        steps = int(round(cfg.flow_time / lr))  # the same gradient-flow time for every lr
        res = gj.train(
            lambda m, b: _mse(m, *b),
            net,
            optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr)),
            lambda k: (setup.x, setup.y),
            key=jax.random.key(0),
            num_steps=steps,
            steps_per_chunk=steps,
        )
        return _abs_max(jnp.stack(orbits.rescaling_conserved_quantity(res.model)) - q0)

    lrs = list(cfg.learning_rates)
    drifts = [drift(lr) for lr in lrs]
    fitted = gj.loglog_slope(lrs, drifts)
    middle = lrs[len(lrs) // 2]
    decayed = drift(middle, cfg.decay)
    plain = drifts[len(lrs) // 2]
    rows = [
        slope_claim(
            "conserved_drift",
            "The rescaling charge |w_in|^2 + b^2 - |w_out|^2 is conserved by gradient flow: "
            f"gradient descent drifts at O(lr) over flow time {cfg.flow_time:g}",
            "Eq. 30 (Noether)", fitted, 1.0, cfg.slope_band,
            f"drifts {', '.join(f'{d:.2e}' for d in drifts)} at lr {lrs}"),
        above("decay_breaks_charge",
              f"Weight decay {cfg.decay:g} breaks the symmetry: the charge moves O(1), not O(lr)",
              "Sec. 5", decayed / plain, 10, f"{decayed:.2e} vs {plain:.2e} at lr {middle:g}",
              tolerance="> 10x the drift without decay"),
    ]  # fmt: skip
    data = {"lrs": lrs, "drifts": drifts, "slope": fitted, "decayed": decayed, "lr_decay": middle}
    return rows, data


CHECKS = [
    ("mlp", _parameter_check("mlp")),
    ("attention", _parameter_check("attention")),
    ("linear_net", _parameter_check("linear_net")),
    ("linear_node", check_linear_node),
    ("drift", check_drift),
]
EXPENSIVE_FIRST = ["linear_node", "drift"]


def build_setup(cfg: Config, key) -> _Setup:
    kx, ky, kt, kT = jax.random.split(key, 4)
    shape = (cfg.num_data, cfg.num_tokens, cfg.dim)
    return _Setup(
        jax.random.normal(kx, (cfg.num_data, cfg.dim)),
        jax.random.normal(ky, (cfg.num_data, cfg.dim)),
        jax.random.normal(kt, shape),
        jax.random.normal(kT, shape),
    )


def run(config: Config, run_dir: Path) -> dict:
    """Run every orbit-geometry check; write results, metrics and figures under `run_dir`."""
    setup = build_setup(config, jax.random.key(config.seed))
    return run_checks("orbit_geometry", CHECKS, config, setup, run_dir, plot, EXPENSIVE_FIRST)


def plot(results: dict, fig_dir: Path, config: Config) -> list[Path]:
    """Cosine histograms (invariant vs control) and charge drift vs learning rate."""
    plt = pyplot()
    fig_dir = Path(fig_dir)
    titles = {
        "mlp": "ReLU MLP (Eq. 30)",
        "attention": "ReLU attention (Eq. 36)",
        "linear_net": "linear network (Eq. 33)",
        "linear_node": "linear NODE (Eq. 25, L2)",
    }
    panels = [
        (title, [("invariant loss", results[n]["invariant"]), ("control", results[n]["control"])])
        for n, title in titles.items()
        if n in results
    ]
    if not panels or "drift" not in results:  # both parts, or no figure
        return []
    fig, axes = plt.subplots(
        1, len(panels) + 1, figsize=(3.4 * (len(panels) + 1), 3.6), layout="constrained"
    )
    small_multiples(axes[:-1], panels, xlabel="log10 |cos(grad L, tangent)|")
    d = results["drift"]
    ax = axes[-1]
    ax.loglog(d["lrs"], d["drifts"], "o-", label=f"SGD (slope {d['slope']:.2f})")
    ax.loglog([d["lr_decay"]], [d["decayed"]], "rs", label=f"+ weight decay {config.decay:g}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("max |Q(T) - Q(0)|")
    ax.set_title(f"charge drift, flow time {config.flow_time:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    plain_log_ticks(ax)
    ax.set_xticks(d["lrs"], [f"{lr:g}" for lr in d["lrs"]], rotation=30)
    fig.suptitle("Gradient against gauge orbit tangents (float64), and the rescaling charge")
    return [io.save_figure(fig, fig_dir / "orbit_geometry.png", close=True)]
