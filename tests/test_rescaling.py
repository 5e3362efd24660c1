"""The positive per-unit rescaling family (Eq. 29-30, App. C), its Noether charge and balancing.

float64 throughout (conftest). Invariance is asserted to 1e-12 relative: the rescaled network
computes the same sums with every term multiplied by alpha / alpha, so outputs differ by
rounding only (~1e-16 per operation, ~1e-15 after a few layers), while a real violation (the
`control()` family, tanh, GELU) is >= 1e-3.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

from gaugejax import BalanceResult, RescalingGauge, balance, rescaling_conserved_quantity
from gaugejax.models import ConvNet, FeedforwardNet, GraphConvNet

from .conftest import CompileCounter


NUM_SAMPLES = 16
# the rescaled function agrees up to rounding (see the module docstring)
INVARIANT = 1e-12
# a symmetry-breaking family moves the outputs by O(log_scale) = O(1); 1e-3 is far from both
BROKEN = 1e-3

# One shape per model kind across the tests: compilations (eager kernels included) are shared.


@functools.cache
def feedforward_net() -> FeedforwardNet:
    kw, kb = jax.random.split(jax.random.key(20))
    return FeedforwardNet(jax.random.normal(kw, (4, 3, 3)), jax.random.normal(kb, (4, 3)), "relu")


@functools.cache
def graph_net() -> GraphConvNet:
    ka, kn = jax.random.split(jax.random.key(21))
    upper = jnp.triu((jax.random.uniform(ka, (5, 5)) < 0.5).astype(float), 1)
    return GraphConvNet(upper + upper.T, (3, 4, 4, 2), key=kn)


@functools.cache
def conv_net(pool: float | None = 1.0, norm: str | None = None) -> ConvNet:
    # 8 x 8 images, two 2 x 2 poolings: the readout sees 2 x 2 positions per channel
    return ConvNet(2, (3, 4), 8, 2, key=jax.random.key(22), pool=pool, norm=norm)


def inputs(model, key) -> jax.Array:
    """A small batch of inputs for one of the models above (or an MLP with 3 inputs)."""
    if isinstance(model, ConvNet):
        return jax.random.normal(key, (2, 2, 8, 8))
    if isinstance(model, GraphConvNet):
        return jax.random.normal(key, (2, 5, 3))
    return jax.random.normal(key, (6, 3))


def params_sq(model) -> float:
    """Sum of squares of the weights and biases (every inexact array but a GNN's adjacency)."""
    if isinstance(model, GraphConvNet):
        model = eqx.tree_at(lambda m: m.a_hat, model, jnp.zeros(()))
    return float(sum(jnp.sum(x**2) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))))


@eqx.filter_jit
def _rel_dev(model, other, x):
    y, y2 = jax.vmap(model)(x), jax.vmap(other)(x)
    return jnp.max(jnp.abs(y2 - y)) / jnp.max(jnp.abs(y))


def rel_dev(model, other, x) -> float:
    """max |f'(x) - f(x)| / max |f(x)| over a batch (compiled once per model structure)."""
    return float(_rel_dev(model, other, x))


def _orbit_devs(gauge, model, x, elements):
    y = jax.vmap(model)(x)

    def one(g):
        moved = gauge.act(g, model)
        return jnp.max(jnp.abs(jax.vmap(moved)(x) - y)) / jnp.max(jnp.abs(y))

    return jax.vmap(one)(elements)


def orbit_devs(gauge, model, x, key) -> jax.Array:
    """Per sampled element: max |f_g(x) - f(x)| / max |f(x)|, `act` vmapped over the elements.
    Eager for the small MLPs (they share the cached per-operation kernels across cases, cheaper
    than one compilation each), compiled for the other models (slow op by op)."""
    elements = jax.vmap(gauge.sample)(jax.random.split(key, NUM_SAMPLES))
    run = _orbit_devs if isinstance(model, eqx.nn.MLP) else eqx.filter_jit(_orbit_devs)
    return run(gauge, model, x, elements)


# (eqx.nn.MLP keyword arguments, depth)
MLP_CASES = {
    "relu": (dict(), 2),
    "depth_1": (dict(), 1),
    "no_bias": (dict(use_bias=False), 2),
    "no_final_bias": (dict(use_final_bias=False), 2),
    "no_biases_at_all": (dict(use_bias=False, use_final_bias=False), 2),
    "leaky_relu": (dict(activation=jax.nn.leaky_relu), 2),
    "lambda_relu": (dict(activation=lambda z: jax.nn.relu(z)), 2),
    "scan": (dict(scan=True), 3),
    "scan_depth_1": (dict(scan=True), 1),  # an empty stack of hidden layers
    "prelu": (dict(activation=eqx.nn.PReLU()), 2),
}


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_mlp_invariance_and_control(case):
    kw, depth = MLP_CASES[case]
    k = jax.random.split(jax.random.key(1), 3)
    mlp = eqx.nn.MLP(3, 2, 5, depth, key=k[0], **kw)
    x = jax.random.normal(k[1], (6, 3))
    gauge = RescalingGauge.from_model(mlp, 0.7)
    assert gauge.widths == (5,) * depth and gauge.compensate and gauge.require_symmetry
    assert jnp.max(orbit_devs(gauge, mlp, x, k[2])) < INVARIANT
    control = gauge.control()
    assert not control.compensate and control.widths == gauge.widths
    assert jnp.min(orbit_devs(control, mlp, x, k[2])) > BROKEN
    moved = gauge.act(gauge.sample(k[2]), mlp)
    assert jax.tree.structure(moved) == jax.tree.structure(mlp)  # None biases stay None


@pytest.mark.parametrize("kind", ["feedforward", "graph", "conv"])
def test_feedforward_graph_and_conv_invariance(kind):
    model = {"feedforward": feedforward_net, "graph": graph_net, "conv": conv_net}[kind]()
    if kind == "conv":  # L_s pooling with s = 2 (s = 1 in the balance tests)
        model = conv_net(2.0)
    k = jax.random.split(jax.random.key(2), 2)
    x = inputs(model, k[0])
    gauge = RescalingGauge.from_model(model, 0.7)
    assert gauge.widths == {"feedforward": (3, 3, 3), "graph": (4, 4), "conv": (3, 4)}[kind]
    assert jnp.max(orbit_devs(gauge, model, x, k[1])) < INVARIANT
    assert jnp.min(orbit_devs(gauge.control(), model, x, k[1])) > BROKEN
    if kind == "conv":
        # instance normalisation removes each channel's scale: refused, then measurably broken
        normed = conv_net(1.0, "instance")
        with pytest.raises(ValueError, match="norm='instance'"):
            gauge.check_model(normed)
        loose = RescalingGauge((3, 4), 0.7, require_symmetry=False)
        assert jnp.min(orbit_devs(loose, normed, x, k[1])) > BROKEN


@pytest.mark.parametrize("activation", [jnp.tanh, jax.nn.gelu, jax.nn.softplus])
def test_non_homogeneous_activations_are_refused(activation):
    k = jax.random.split(jax.random.key(3), 3)
    mlp = eqx.nn.MLP(3, 2, 5, 2, activation=activation, key=k[0])
    x = jax.random.normal(k[1], (6, 3))
    name = activation.__name__
    with pytest.raises(ValueError, match=f"activation '{name}' is not positively homogeneous"):
        RescalingGauge.from_model(mlp)
    with pytest.raises(ValueError, match="not positively homogeneous"):
        RescalingGauge((5, 5)).act(RescalingGauge((5, 5)).identity(), mlp)
    loose = RescalingGauge.from_model(mlp, 0.7, require_symmetry=False)
    assert loose.control().require_symmetry is False
    assert jnp.min(orbit_devs(loose, mlp, x, k[2])) > BROKEN


def test_homogeneity_is_checked_numerically():
    k = jax.random.split(jax.random.key(4), 2)
    # homogeneous compositions of differently named functions pass; near-misses do not: a
    # relative deviation of 1e-6 is 10^10 times the 100 eps bound of the check in float64
    for phi in (
        lambda z: z,
        lambda z: 2.0 * jax.nn.relu(z) - 0.1 * jax.nn.relu(-z),
        jnp.abs,
    ):
        RescalingGauge.from_model(eqx.nn.MLP(3, 2, 4, 1, activation=phi, key=k[0]))
    for phi in (lambda z: jax.nn.relu(z) + 1e-6, lambda z: z * (1 + 1e-6 * jnp.tanh(z))):
        with pytest.raises(ValueError, match="<lambda>"):
            RescalingGauge.from_model(eqx.nn.MLP(3, 2, 4, 1, activation=phi, key=k[0]))
    # FeedforwardNet names its activation by a string
    w, b = jnp.ones((3, 2, 2)), jnp.zeros((3, 2))
    for name in ("identity", "relu", "leaky_relu"):
        RescalingGauge.from_model(FeedforwardNet(w, b, name))
    for name in ("tanh", "gelu"):
        with pytest.raises(ValueError, match=f"activation '{name}' is not positively"):
            RescalingGauge((2, 2)).check_model(FeedforwardNet(w, b, name))
    # the final activation acts after the last layer, outside the gauge: anything goes
    mlp = eqx.nn.MLP(3, 2, 4, 1, final_activation=jnp.tanh, key=k[0])
    x = jax.random.normal(k[1], (5, 3))
    assert jnp.max(orbit_devs(RescalingGauge.from_model(mlp), mlp, x, k[1])) < INVARIANT


class ScaledTanh(eqx.Module):
    """A learnable activation without the symmetry."""

    c: jax.Array

    def __call__(self, z):
        return jnp.tanh(self.c * z)


def test_learnable_activation_checked_under_jit():
    """A learnable activation's arrays are traced under filter_jit: the check still runs, as a
    runtime error; PReLU (homogeneous per unit) passes."""
    k = jax.random.split(jax.random.key(5), 2)
    bad = eqx.nn.MLP(3, 2, 4, 2, activation=ScaledTanh(jnp.array(1.5)), key=k[0])
    gauge = RescalingGauge((4, 4))
    with pytest.raises(ValueError, match="'ScaledTanh' is not positively homogeneous"):
        gauge.check_model(bad)
    with pytest.raises(Exception, match="'ScaledTanh' is not positively homogeneous"):
        jax.block_until_ready(eqx.filter_jit(gauge.act)(gauge.identity(), bad))
    good = eqx.nn.MLP(3, 2, 4, 2, activation=eqx.nn.PReLU(), key=k[0])
    moved = eqx.filter_jit(gauge.act)(gauge.sample(k[1]), good)
    x = jax.random.normal(k[1], (5, 3))
    assert rel_dev(good, moved, x) < INVARIANT


def test_wrong_models_and_widths():
    key = jax.random.key(6)
    gauge = RescalingGauge((5, 5))
    others = (eqx.nn.Linear(3, 5, key=key), eqx.nn.MultiheadAttention(2, 4, key=key))
    e = gauge.identity()
    for other in others:
        for call in (
            lambda: gauge.check_model(other),
            lambda: gauge.act(e, other),
            lambda: gauge.tangent(other, e),
            lambda: RescalingGauge.from_model(other),
            lambda: rescaling_conserved_quantity(other),
            lambda: balance(other),
        ):
            with CompileCounter() as counter, pytest.raises(TypeError) as info:
                call()
            message = str(info.value)
            assert "a FeedforwardNet, eqx.nn.MLP, GraphConvNet or ConvNet" in message
            assert f"received {type(other).__name__}" in message
            assert counter.count == 0  # raised before anything was traced or compiled
        with pytest.raises(TypeError, match="^RescalingGauge acts on"):
            gauge.check_model(other)
    mlp = eqx.nn.MLP(3, 2, 4, 3, key=key)
    with CompileCounter() as counter, pytest.raises(ValueError) as info:
        gauge.check_model(mlp)
    assert "(5, 5)" in str(info.value) and "(4, 4, 4)" in str(info.value)
    assert counter.count == 0
    with pytest.raises(ValueError, match="no hidden layer"):
        RescalingGauge.from_model(eqx.nn.MLP(3, 2, 4, 0, key=key))
    with pytest.raises(ValueError, match="widths"):
        RescalingGauge(())
    with pytest.raises(ValueError, match="widths"):
        RescalingGauge((4, 0))


def test_factor_checks():
    k = jax.random.split(jax.random.key(7), 2)
    mlp = eqx.nn.MLP(3, 2, 4, 2, key=k[0])
    gauge = RescalingGauge.from_model(mlp)
    g = gauge.sample(k[1])
    for bad in (g[1].at[2].set(0.0), g[1].at[0].set(-1.0), g[1].at[3].set(jnp.nan)):
        # eagerly: a ValueError naming the layer
        with pytest.raises(ValueError, match=r"> 0.*`g\[1\]`"):
            gauge.act((g[0], bad), mlp)
        # under jit (and vmap) the factors are tracers: eqx.error_if raises at run time
        with pytest.raises(Exception, match="> 0"):
            jax.block_until_ready(
                jax.jit(lambda h: eqx.filter(gauge.act(h, mlp), eqx.is_array))((g[0], bad))
            )
        batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), g, (g[0], bad))
        with pytest.raises(Exception, match="> 0"):
            jax.block_until_ready(
                jax.jit(jax.vmap(lambda h: eqx.filter(gauge.act(h, mlp), eqx.is_array)))(batch)
            )
    # a valid element passes the runtime check
    jax.block_until_ready(jax.jit(lambda h: eqx.filter(gauge.act(h, mlp), eqx.is_array))(g))
    with pytest.raises(ValueError, match="2 factor vectors"):
        gauge.act(g[:1], mlp)
    with pytest.raises(ValueError, match=r"`g\[0\]` must have shape \(4,\)"):
        gauge.act((jnp.ones(5), g[1]), mlp)


def test_group_laws_and_tangent():
    k = jax.random.split(jax.random.key(8), 5)
    mlp = eqx.nn.MLP(3, 2, 4, 2, key=k[0])
    gauge = RescalingGauge.from_model(mlp, 0.7)
    params = lambda m: eqx.filter(m, eqx.is_inexact_array)  # noqa: E731
    # identity: multiplying and dividing by 1.0 is exact in IEEE arithmetic
    same = gauge.act(gauge.identity(), mlp)
    assert all(
        jnp.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params(same)), jax.tree.leaves(params(mlp)), strict=True)
    )

    def max_diff(m1, m2):
        diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), params(m1), params(m2))
        return float(max(jax.tree.leaves(diffs)))

    g1, g2 = gauge.sample(k[1]), gauge.sample(k[2])
    # a few roundings on O(1) parameters: 1e-14
    assert (
        max_diff(gauge.act(gauge.compose(g1, g2), mlp), gauge.act(g2, gauge.act(g1, mlp))) < 1e-14
    )
    assert max_diff(gauge.act(gauge.inverse(g1), gauge.act(g1, mlp)), mlp) < 1e-14
    assert max_diff(gauge.act(g1, mlp), mlp) > 1e-2  # the element does move the parameters

    # tangent at the identity along v: rows of W_l and b_l get +v_l, columns of W_{l+1} -v_l
    v = jax.tree.map(jnp.subtract, gauge.sample(k[3]), gauge.identity())
    tangent = gauge.tangent(mlp, v)
    w = [lay.weight for lay in mlp.layers]
    expected_w = [
        v[0][:, None] * w[0],
        v[1][:, None] * w[1] - w[1] * v[0][None, :],
        -w[2] * v[1][None, :],
    ]
    expected_b = [v[0] * mlp.layers[0].bias, v[1] * mlp.layers[1].bias]
    for lay, ew in zip(tangent.layers, expected_w, strict=True):
        assert jnp.max(jnp.abs(lay.weight - ew)) < 1e-14  # exact up to rounding
    for lay, eb in zip(tangent.layers[:2], expected_b, strict=True):
        assert jnp.max(jnp.abs(lay.bias - eb)) < 1e-14
    assert jnp.max(jnp.abs(tangent.layers[2].bias)) == 0  # the output bias does not move
    # the control's tangent lacks the outgoing part
    control_tangent = gauge.control().tangent(mlp, v)
    assert jnp.max(jnp.abs(control_tangent.layers[2].weight)) == 0
    assert jnp.max(jnp.abs(control_tangent.layers[1].weight - v[1][:, None] * w[1])) < 1e-14


def test_conserved_quantity_matches_the_feedforward_formula():
    k = jax.random.split(jax.random.key(9), 2)
    w, b = jax.random.normal(k[0], (4, 3, 3)), jax.random.normal(k[1], (4, 3))
    q = rescaling_conserved_quantity(FeedforwardNet(w, b, "relu"))
    old = jnp.sum(w[:-1] ** 2, axis=2) + b[:-1] ** 2 - jnp.sum(w[1:] ** 2, axis=1)
    assert len(q) == 3 and all(a.shape == (3,) for a in q)
    assert jnp.max(jnp.abs(jnp.stack(q) - old)) < 1e-14  # the same sums, possibly reordered
    # the bias term counts: without it the values differ by b^2 = O(1)
    assert jnp.max(jnp.abs(jnp.stack(q) - (old - b[:-1] ** 2))) > 1e-3


@eqx.filter_jit
def _charge_rate(model, x, y):
    """d/dt Q along the gradient flow of an MSE loss: the jvp of Q along -grad, relative to
    |Q| + |grad| |params| (the scale of its terms)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p):
        return jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

    def charge(p):
        return jnp.concatenate(rescaling_conserved_quantity(eqx.combine(p, static)))

    grad = jax.grad(loss)(params)
    q, rate = jax.jvp(charge, (params,), (jax.tree.map(jnp.negative, grad),))
    norm = lambda t: jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(t)))  # noqa: E731
    return jnp.max(jnp.abs(rate)) / (jnp.max(jnp.abs(q)) + norm(grad) * norm(params))


@pytest.mark.parametrize("case", ["relu", "no_bias", "tanh", "conv", "graph"])
def test_conserved_quantity_is_conserved_by_gradient_flow(case):
    k = jax.random.split(jax.random.key(10), 4)
    if case in ("conv", "graph"):
        model = conv_net() if case == "conv" else graph_net()
        x = inputs(model, k[1])
        y = jax.random.normal(k[2], jax.eval_shape(jax.vmap(model), x).shape)
    else:
        activation = jnp.tanh if case == "tanh" else jax.nn.relu
        model = eqx.nn.MLP(3, 2, 5, 2, activation=activation, use_bias=case != "no_bias", key=k[0])
        x, y = jax.random.normal(k[1], (8, 3)), jax.random.normal(k[2], (8, 2))
    rate = float(_charge_rate(model, x, y))
    if case == "tanh":
        assert rate > BROKEN  # no symmetry, no conservation: the test can fail
    else:
        # dQ/dt = -<grad Q, grad L> = 0 exactly (grad L is orthogonal to the orbit); in float64
        # the sums cancel to ~1e-16 of their terms' scale
        assert rate < 1e-10


def _unbalance(model, factor=10.0):
    """Multiply hidden layer 0's incoming weights by `factor`, divide its outgoing ones."""
    gauge = RescalingGauge.from_model(model)
    g = gauge.identity()
    return gauge.act((factor * g[0], *g[1:]), model)


@pytest.mark.parametrize("case", ["mlp", "mlp_no_bias", "feedforward", "conv", "graph"])
def test_balance(case):
    k = jax.random.split(jax.random.key(11), 4)
    if case.startswith("mlp"):
        model = eqx.nn.MLP(3, 2, 5, 3, use_bias=case == "mlp", key=k[0])
    else:
        model = {"feedforward": feedforward_net, "graph": graph_net, "conv": conv_net}[case]()
    x = inputs(model, k[1])
    model = _unbalance(model)
    res = balance(model)
    assert isinstance(res, BalanceResult) and bool(res.converged)
    gauge = RescalingGauge.from_model(model)
    assert params_sq(res.model) < params_sq(model)
    assert rel_dev(model, res.model, x) < INVARIANT
    # the element reproduces the balanced model (the same operations)
    again = gauge.act(res.scales, model)
    assert all(
        jnp.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(eqx.filter(again, eqx.is_array)),
            jax.tree.leaves(eqx.filter(res.model, eqx.is_array)),
            strict=True,
        )
    )
    # every per-unit charge vanishes at the balanced point: tol = 1e-10 on the factors leaves
    # |Q| ~ 4e-10 of the unit's norm (O(1) here), so 1e-8 absolute is a safe bound
    charges = jnp.concatenate(rescaling_conserved_quantity(res.model))
    assert jnp.max(jnp.abs(charges)) < 1e-8 and float(res.max_charge) < 1e-8
    assert jnp.max(jnp.abs(jnp.concatenate(rescaling_conserved_quantity(model)))) > 1.0
    # a minimum along the orbit: every other point of it has a larger norm
    for key in jax.random.split(k[2], 4):
        assert params_sq(gauge.act(gauge.sample(key), res.model)) > params_sq(res.model)
    # balancing a balanced model is a no-op: factors 1 to 1e-10 (the tolerance)
    twice = balance(res.model)
    assert bool(twice.converged)
    assert max(float(jnp.max(jnp.abs(s - 1))) for s in twice.scales) < 1e-10


def test_balance_edge_cases():
    k = jax.random.split(jax.random.key(12), 3)
    mlp = _unbalance(eqx.nn.MLP(3, 2, 5, 2, key=k[0]))
    # jits (while_loop inside), and agrees with the eager call
    jitted = eqx.filter_jit(balance)(mlp)
    eager = balance(mlp)
    assert bool(jitted.converged) and int(jitted.num_iterations) == int(eager.num_iterations)
    assert (
        max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jitted.scales, eager.scales, strict=True)
        )
        < 1e-14
    )
    # too few sweeps: reported as not converged, with a charge left
    short = balance(mlp, max_iterations=1)
    assert not bool(short.converged) and int(short.num_iterations) == 1
    assert float(short.max_charge) > 1e-8
    # a dead unit (zero incoming weights and bias) keeps factor 1; the others balance
    dead = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias),
        mlp,
        (mlp.layers[0].weight.at[2].set(0.0), mlp.layers[0].bias.at[2].set(0.0)),
    )
    res = balance(dead)
    assert bool(res.converged) and float(res.scales[0][2]) == 1.0
    assert float(res.max_charge) < 1e-8
    # the control family is no orbit of the function; other gauges are refused
    with pytest.raises(ValueError, match="compensate"):
        balance(mlp, RescalingGauge.from_model(mlp).control())
    with pytest.raises(TypeError, match="RescalingGauge"):
        balance(mlp, object())
    with pytest.raises(ValueError, match="do not match"):
        balance(mlp, RescalingGauge((3, 3)))
