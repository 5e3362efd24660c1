"""Linear neural ODEs, Wilson lines, discrete networks, Theorem 3.1, feedforward rescaling.

Solves use rtol = atol = 1e-11 (1e-10 for Wilson lines), so identities between solved
quantities are asserted to 1e-8: 10-100 x the accumulated tolerance of O(10) steps on O(1)
matrices. Algebraic identities (rescaling, Eq. 33) are asserted to 1e-12.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj

from .conftest import run_until_idle


D, T = 3, 1.0
TIGHT = diffrax.PIDController(rtol=1e-11, atol=1e-11)


@eqx.filter_jit
def _outputs(net, x):
    """`net` on a batch of inputs: one compiled program per structure and shapes."""
    return jax.vmap(net)(x)


@eqx.filter_jit
def _euler_error(w, b, num_layers, x, ref):
    """The largest deviation of the Euler-discretised network's outputs from `ref`."""
    euler = gj.LinearNet(*gj.euler_discretize(w, b, T, num_layers))
    return jnp.max(jnp.abs(jax.vmap(euler)(x) - ref))


@eqx.filter_jit
def _lifted_at(lifted, t):
    """`(G(t), c(t))` of a lifted gauge."""
    return lifted.G(t), lifted.c(t)


@pytest.fixture(scope="module")
def lin():
    k = jax.random.split(jax.random.key(42), 4)
    model = gj.random_linear_node(D, T, key=k[0], stepsize_controller=TIGHT)
    x = jax.random.normal(k[1], (4, D))
    return model, x, k


def test_time_bases_and_shapes(lin):
    model, x, k = lin
    pl = gj.PiecewiseLinearBasis(T, 5)
    np.testing.assert_allclose(pl(jnp.asarray(0.375)), [0, 0.5, 0.5, 0, 0], atol=1e-15)
    assert gj.FourierBasis(T, 2).size == 5 and pl.size == 5
    W = jax.random.normal(k[2], (5, D, D))
    field = gj.BasisLinearField(pl, W, jnp.zeros((5, D)))
    np.testing.assert_allclose(field.weight(jnp.asarray(0.25)), W[1], atol=1e-15)
    with pytest.raises(ValueError, match="weights"):
        gj.BasisLinearField(pl, W[:3], jnp.zeros((3, D)))
    with pytest.raises(TypeError, match="AbstractLinearField"):
        gj.LinearNODE(gj.MLPField(D, key=k[3]), t1=T)
    assert model.weight(0.3).shape == (D, D) and model.bias(0.3).shape == (D,)


def test_wilson_line_constant_and_both_orders():
    A = jax.random.normal(jax.random.key(1), (D, D))
    np.testing.assert_allclose(
        gj.wilson_line(lambda t: A, 0.7, 0.2), jax.scipy.linalg.expm(0.5 * A), atol=1e-10
    )
    back = gj.wilson_line(lambda t: A, 0.2, 0.7)
    np.testing.assert_allclose(back, jax.scipy.linalg.expm(-0.5 * A), atol=1e-10)
    np.testing.assert_array_equal(gj.wilson_line(lambda t: A, 0.4, 0.4), jnp.eye(D))
    with pytest.raises(ValueError, match="square"):
        gj.wilson_line(lambda t: jnp.ones((D, D + 1)), 1.0, 0.0)


def test_magnus_orders_and_eq22(lin):
    model, x, k = lin
    w, b = model.weight, model.bias
    ref = gj.wilson_line(w, T, 0.0)
    steps = [8, 16, 32]
    for order in (2, 4):
        errs = [
            float(
                jnp.max(jnp.abs(gj.wilson_line_magnus(w, T, 0.0, num_steps=n, order=order) - ref))
            )
            for n in steps
        ]
        assert abs(-gj.loglog_slope(steps, errs) - order) < 0.15, (order, errs)
    # backwards: the Magnus propagator from T to 0 inverts the forward one
    back = gj.wilson_line_magnus(w, 0.0, T, num_steps=64, order=4)
    np.testing.assert_allclose(back @ ref, jnp.eye(D), atol=1e-8)
    # Eq. 22: x(T) = W_{T:0} (x0 + int_0^T W_{0:t} b(t) dt), Gauss-Legendre quadrature (40 nodes)
    closed = ref @ (x[0] + gj.quadrature(lambda t: gj.wilson_line(w, 0.0, t) @ b(t), 0.0, T, 40))
    np.testing.assert_allclose(closed, model(x[0]), atol=1e-8)


def test_eq23_printed_second_case_is_not_the_propagator(lin):
    """Eq. 23 as printed for t1 < t2 (reverse-ordered exp of +w) is not the inverse propagator
    that Eq. 22 and Eq. 46 use; the reverse-ordered exp of -w is."""
    model, x, k = lin
    w = model.weight
    forward = gj.wilson_line(w, 0.8, 0.2)
    propagator_back = gj.wilson_line(w, 0.2, 0.8)
    printed = gj.wilson_line(lambda t: -w(t), 0.2, 0.8)  # = Tbar exp(+int_{0.2}^{0.8} w)
    np.testing.assert_allclose(propagator_back @ forward, jnp.eye(D), atol=1e-9)
    assert jnp.max(jnp.abs(printed @ forward - jnp.eye(D))) > 1e-2


@pytest.mark.parametrize("kind", ["expm", "cayley"])
def test_linear_gauge_leaves_output_intact(lin, kind):
    model, x, k = lin
    gauge = gj.LinearGauge(D, T, kind=kind)
    res = gj.sweep(model, gauge, x, key=k[2], num_samples=8, chunk_size=4)
    assert res.failures() == {} and res.max_abs.max() < 1e-8, res.summary()
    g = gauge.sample(k[3])
    mp = gauge.to_map(g)
    for t in (0.0, T):
        np.testing.assert_allclose(mp.G(jnp.asarray(t)), jnp.eye(D), atol=1e-15)
        np.testing.assert_allclose(mp.c(jnp.asarray(t)), jnp.zeros(D), atol=1e-15)
    # group laws are exact affine compositions
    both = gauge.act(gauge.compose(g, gauge.sample(k[1])), model)
    undo = gauge.act(gauge.inverse(gauge.compose(g, gauge.sample(k[1]))), both)
    np.testing.assert_allclose(undo.weight(0.37), model.weight(0.37), atol=1e-12)
    np.testing.assert_allclose(undo.bias(0.37), model.bias(0.37), atol=1e-12)


def test_gauge_with_G_T_not_one_changes_output(lin):
    model, x, k = lin
    A = 0.5 * jax.random.normal(k[2], (D, D))
    c0 = jax.random.normal(k[3], (D,))

    def G(t):
        return jax.scipy.linalg.expm(t * A)  # G(T) != 1

    def c(t):
        return jnp.sin(jnp.pi * t) * c0

    new = model.with_field(
        gj.FunctionLinearField(*gj.linear_gauge_transform(model.weight, model.bias, G, c))
    )
    out, old = _outputs(new, x), _outputs(model, x)
    assert jnp.max(jnp.abs(out - old)) > 1e-2
    np.testing.assert_allclose(out, jnp.linalg.solve(G(T), old.T).T, atol=1e-8)  # G(T)^-1 x(T)


def test_eq46_covariance(lin):
    model, x, k = lin
    gauge = gj.LinearGauge(D, T)
    g = gauge.sample(k[1])
    mp, new = gauge.to_map(g), gauge.act(g, model)
    for t1, t2 in [(0.9, 0.15), (0.15, 0.9)]:
        lhs = gj.wilson_line(new.weight, t1, t2)
        rhs = jnp.linalg.solve(mp.G(t1), gj.wilson_line(model.weight, t1, t2) @ mp.G(t2))
        np.testing.assert_allclose(lhs, rhs, atol=1e-8)


def test_eq27_time_reparametrisation_is_a_linear_gauge(lin):
    """G = 1 + h e w, c = h e b (Eq. 27) equals reparametrize with tau(s) = s - h e(s) to O(h^2)."""
    model, x, k = lin
    w, b, F = model.weight, model.bias, model.field

    def e(t):
        return 0.5 * jnp.sin(jnp.pi * t / T) + 0.3 * jnp.sin(2 * jnp.pi * t / T)

    @jax.jit
    def gaps(h):
        G = lambda t: jnp.eye(D) + h * e(t) * w(t)  # noqa: E731
        c = lambda t: h * e(t) * b(t)  # noqa: E731
        lg = gj.FunctionLinearField(*gj.linear_gauge_transform(w, b, G, c))
        minus = gj.reparametrize(F, lambda s: s - h * e(s))
        plus = gj.reparametrize(F, lambda s: s + h * e(s))
        pts = jnp.linspace(0.05, 0.95, 5)

        def gap(f):
            return jnp.max(
                jax.vmap(lambda t, y: jnp.abs(lg(t, y) - f(t, y, None)).max())(
                    pts, x[jnp.arange(5) % 4]
                )
            )

        return gap(minus), gap(plus)

    hs = [0.04, 0.02, 0.01]
    vals = np.array([[float(v) for v in gaps(h)] for h in hs])
    assert abs(gj.loglog_slope(hs, vals[:, 0]) - 2) < 0.15
    assert abs(gj.loglog_slope(hs, vals[:, 1]) - 1) < 0.15


def test_integrated_relation_is_exact_euler_is_not(lin):
    model, x, k = lin
    w, b = model.weight, model.bias
    ref = _outputs(model, x)
    euler = []
    Ns = [2, 4, 8, 16]
    for N in Ns:
        net = gj.LinearNet(*gj.discretize(w, b, T, N))
        np.testing.assert_allclose(_outputs(net, x), ref, atol=1e-8)
        euler.append(float(_euler_error(w, b, N, x, ref)))
    assert min(euler) > 1e-3
    assert abs(gj.loglog_slope(Ns, euler) + 1) < 0.2, euler


def test_discrete_gauge_invariance_and_group(lin):
    model, x, k = lin
    net = gj.LinearNet(*gj.euler_discretize(model.weight, model.bias, T, 5))
    gauge = gj.DiscreteLinearGauge(D, 5)
    res = gj.sweep(net, gauge, x, key=k[0], num_samples=16, chunk_size=8)
    assert res.max_rel.max() < 1e-12
    g1, g2 = gauge.sample(k[1]), gauge.sample(k[2])
    a = _outputs(gauge.act(gauge.compose(g1, g2), net), x)
    b2 = _outputs(gauge.act(g2, gauge.act(g1, net)), x)
    np.testing.assert_allclose(a, b2, atol=1e-12)
    back = gauge.act(gauge.inverse(g1), gauge.act(g1, net))
    np.testing.assert_allclose(back.weights, net.weights, atol=1e-12)
    # a 'gauge' with G_N != 1 is rejected, and one that is applied anyway changes the output
    bad = gj.gauges.DiscreteGaugeElement(g1.Gs.at[-1].set(2 * jnp.eye(D)), g1.cs)
    with pytest.raises(ValueError, match=r"Gs\[5\]"):
        gauge.act(bad, net)
    with pytest.raises(ValueError, match=r"cs\[0\]"):
        gauge.act(gj.gauges.DiscreteGaugeElement(g1.Gs, g1.cs.at[0].set(1.0)), net)
    with pytest.raises(ValueError, match="singular"):
        gauge.act(gj.gauges.DiscreteGaugeElement(g1.Gs.at[2].set(jnp.zeros((D, D))), g1.cs), net)


def test_theorem_31_lift(lin):
    model, x, k = lin
    w, b = model.weight, model.bias
    N = 4
    g = gj.DiscreteLinearGauge(D, N).sample(k[3])
    lifted = gj.lift(g.Gs, g.cs, T)
    for n in range(N + 1):
        G_n, c_n = _lifted_at(lifted, jnp.asarray(n * T / N))
        np.testing.assert_allclose(G_n, g.Gs[n], atol=1e-12)
        np.testing.assert_allclose(c_n, g.cs[n], atol=1e-12)
    lhs = gj.discretize(*gj.linear_gauge_transform(w, b, lifted.G, lifted.c), T, N)
    rhs = gj.discrete_gauge_transform(*gj.discretize(w, b, T, N), g.Gs, g.cs)
    np.testing.assert_allclose(lhs[0], rhs[0], atol=1e-8)
    np.testing.assert_allclose(lhs[1], rhs[1], atol=1e-8)
    # dG/dt vanishes at the nodes (C^1 lift)
    dG = jax.jvp(lifted.G, (jnp.asarray(T / N),), (jnp.asarray(1.0),))[1]
    assert jnp.max(jnp.abs(dG)) < 1e-10
    # no lift for det G_n < 0
    flip = g.Gs.at[2].set(g.Gs[2] @ jnp.diag(jnp.array([-1.0] + [1.0] * (D - 1))))
    with pytest.raises(ValueError, match=r"Gs\[2\].*det.*no continuous lift"):
        gj.lift(flip, g.cs, T)


def test_relu_version_of_theorem_31():
    """Diagonal positive G_n (ReLU rescalings) lift to diagonal positive G(t)."""
    alphas = jnp.exp(0.5 * jax.random.normal(jax.random.key(5), (3, D)))
    Gs = jnp.concatenate([jnp.eye(D)[None], jax.vmap(jnp.diag)(alphas), jnp.eye(D)[None]])
    lifted = gj.lift(Gs, jnp.zeros((5, D)), T)
    for t in (0.1, 0.3, 0.62, 0.9):
        G = _lifted_at(lifted, jnp.asarray(t))[0]
        assert jnp.max(jnp.abs(G - jnp.diag(jnp.diag(G)))) < 1e-12 and jnp.all(jnp.diag(G) > 0)


# s = 1 and 2, the other models, controls and refusals: tests/test_rescaling.py
@pytest.mark.parametrize("pool", [None, float("inf")])
def test_cnn_channel_rescaling_with_ls_pooling(pool):
    """App. C: per-channel filter rescaling survives L_s pooling (1e-12 relative, float64):
    no pooling and max pooling (s = inf)."""
    k = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(k[0], (3, 2, 8, 8))
    net = gj.ConvNet(2, (3, 4), 8, 2, key=k[1], pool=pool)
    res = gj.sweep(net, gj.RescalingGauge((3, 4), 0.7), x, key=k[2], num_samples=8, chunk_size=4)
    assert res.max_rel.max() < 1e-12


def test_model_constructors_refuse_bad_input():
    k = jax.random.split(jax.random.key(12), 2)
    with pytest.raises(ValueError, match="norm"):
        gj.ConvNet(2, (3,), 8, 2, key=k[0], norm="batch")
    # the jaxtyping hook of the test suite rejects the shape first (a TypeError)
    with pytest.raises((ValueError, TypeError), match="adjacency"):
        gj.GraphConvNet(jnp.ones((3, 4)), (3, 2), key=k[1])


def test_expm_adapts_its_squarings_and_matches_expm():
    """`gj.expm` (scaling and squaring, degree-12 Taylor, squarings from |S|_1 per matrix)
    against `jax.scipy.linalg.expm` over |S|_1 from 0 to ~930, vmapped over the norms (each
    matrix its own count, the batch running the largest): the bounds are a decade above the
    measured errors (0 .. 5e-13, rising with the squarings); `inverse=True` gives expm(-S)."""
    A = jax.random.normal(jax.random.key(1), (16, 16)) / 4
    scales = jnp.array([0.0, 1e-3, 0.1, 0.3, 1.0, 5.0, 50.0, 200.0])
    bounds = jnp.array([1e-15, 5e-15, 5e-15, 3e-14, 7e-14, 1.3e-13, 1.7e-13, 5e-12])
    ref = jax.vmap(jax.scipy.linalg.expm)(scales[:, None, None] * A)
    got = jax.vmap(gj.expm)(scales[:, None, None] * A)
    rel = jnp.max(jnp.abs(got - ref), axis=(1, 2)) / jnp.max(jnp.abs(ref), axis=(1, 2))
    assert bool(jnp.all(rel <= bounds)), (rel, bounds)
    E, E_inv = gj.expm(0.7 * A, inverse=True)
    np.testing.assert_allclose(E_inv @ E, jnp.eye(16), rtol=0, atol=1e-14)
    # negative cases: a huge or non-finite S is NaN, not garbage
    assert jnp.isnan(gj.expm(5e5 * jnp.eye(3))).all()
    assert jnp.isnan(gj.expm(jnp.full((3, 3), jnp.nan))).all()
    # differentiable in forward and reverse mode (the squaring loop is a bounded while loop)
    t = jnp.ones_like(A)
    got = jax.jvp(gj.expm, (0.3 * A,), (t,))[1]
    ref = jax.jvp(jax.scipy.linalg.expm, (0.3 * A,), (t,))[1]
    assert jnp.max(jnp.abs(got - ref)) < 1e-13
    grads = [jax.grad(lambda s, f=f: jnp.sum(f(s * A)))(2.0) for f in (gj.expm, jsl_expm)]
    np.testing.assert_allclose(*grads, rtol=1e-12)


def jsl_expm(S):
    return jax.scipy.linalg.expm(S)


@pytest.mark.parametrize("kind", ["expm", "cayley"])
def test_one_mode_gauge_has_closed_form_derivative(kind):
    """A one-mode `LinearGauge` element's dG/dt in closed form (`s'(t) A G` for the
    exponential, `s'(t) (1 - S)^-1 A (1 + G)` for Cayley) equals the jvp through G(t); two
    modes (no closed form) take the jvp, and so do compositions and inverses, by the product
    rule on their factors' derivatives."""
    gauge = gj.LinearGauge(D, T, num_modes=1, kind=kind)
    k = jax.random.split(jax.random.key(3), 2)
    G = gauge.base_map(gauge.sample(k[0])).G
    assert isinstance(G, gj.AbstractTimeFunction)
    for t in (0.0, 0.23, 0.5, 0.81):
        t = jnp.asarray(t)
        closed = gj.time_derivative(G, t)
        jvp = jax.jvp(G, (t,), (jnp.ones_like(t),))
        np.testing.assert_allclose(closed[0], jvp[0], rtol=0, atol=1e-14)
        np.testing.assert_allclose(closed[1], jvp[1], rtol=0, atol=1e-13)
    # the one-mode exponential's frame: G^-1 = expm(-s A) with the same G and dG/dt
    if kind == "expm":
        t = jnp.asarray(0.37)
        Gt, dG, G_inv = G.frame(t)
        np.testing.assert_allclose(G_inv @ Gt, jnp.eye(D), rtol=0, atol=1e-14)
        np.testing.assert_allclose(dG, gj.time_derivative(G, t)[1], rtol=0, atol=1e-15)
    else:  # Cayley: no inverse in closed form, Eq. 25 solves with G
        assert G.frame(jnp.asarray(0.37))[2] is None
    g1, g2 = gauge.sample(k[0]), gauge.sample(k[1])
    for word in (gauge.compose(g1, g2), gauge.inverse(g1)):
        Gw = gauge.to_map(word).G
        t = jnp.asarray(0.37)
        np.testing.assert_allclose(
            gj.time_derivative(Gw, t)[1], jax.jvp(Gw, (t,), (jnp.ones_like(t),))[1], atol=1e-13
        )


def test_gauged_field_fuses_weight_and_bias(lin):
    """`LinearGauge.act` gives a `GaugedLinearField`: one solve per evaluation equal to
    `w'(t) x + b'(t)` from the separate Eq. 25 weight and bias (1e-13: two LU solves of
    well-conditioned 3 x 3 systems against one)."""
    model, x, k = lin
    gauge = gj.LinearGauge(D, T)
    moved = gauge.act(gauge.sample(k[3]), model)
    assert isinstance(moved.field, gj.GaugedLinearField)
    for t in (0.1, 0.37, 0.9):
        for xi in x:
            separate = moved.field.weight(t) @ xi + moved.field.bias(t)
            np.testing.assert_allclose(moved.field(t, xi), separate, rtol=0, atol=1e-13)
    # the split a shared-stage solver asks for, `apply(coefficients(t), x)`, is the same field
    # to rounding (measured 2e-16): with a solve (two modes: no inverse in closed form) and
    # with expm's inverse (one mode)
    one_mode = gj.LinearGauge(D, T, num_modes=1)
    for field in (moved.field, one_mode.act(one_mode.sample(k[3]), model).field):
        for t in (0.1, 0.9):
            split = field.apply(field.coefficients(t), x[0])
            np.testing.assert_allclose(split, field(t, x[0]), rtol=0, atol=2e-15)
    # plain fields: the split is their evaluation, bit for bit
    assert bool(jnp.all(model.field(0.37, x[0]) == model.field.weight(0.37) @ x[0]
                        + model.field.bias(0.37)))  # fmt: skip
    # and it is not the old field: the gauge changes the field away from t = 0, T
    assert float(jnp.max(jnp.abs(moved.field(0.37, x[0]) - model.field(0.37, x[0])))) > 1e-3


W1_SWEEP = """
import jax, sys
jax.config.update("jax_enable_x64", True)
import diffrax, gaugejax as gj
k = jax.random.split(jax.random.key(0), 3)
model = gj.random_linear_node(16, 1.0, key=k[0], solver=gj.RK4(),
    stepsize_controller=diffrax.ConstantStepSize(), dt0=0.01)
gauge = gj.LinearGauge(16, 1.0, num_modes=1)
res = gj.sweep(model, gauge, jax.random.normal(k[1], (1, 16)), key=k[2], num_samples=128,
               chunk_size=128, chunks_per_block=1, recheck_samples=0)  # the chunk is the test
print(res.failures() == {} and float(res.max_abs.max()) < 1e-6)
"""


def test_hang_guard_flags_a_child_without_progress():
    import sys

    # negative case: a child that idles (CPU time flat) is flagged within idle_s
    code, _, _, hung = run_until_idle(
        [sys.executable, "-c", "import time; time.sleep(60)"], idle_s=2
    )
    assert hung and code != 0
    # a child that works, and one that finishes, are not
    busy = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\nprint('done')"
    code, out, _, hung = run_until_idle([sys.executable, "-c", busy], idle_s=2)
    assert not hung and code == 0 and out.strip() == "done"


def test_linear_gauge_sweep_of_128_lanes_returns_on_cpu():
    """A regression guard: with separate weight and bias solves, a vmapped chunk of about 100
    or more d = 16 linear-gauge lanes never returned on jaxlib 0.10.2's CPU runtime (threads
    idle, CPU time flat). Run in a subprocess that fails as hung when its CPU time stops
    growing for 60 s (progress, not wall time: a loaded machine slows it but does not trip it;
    the unfused field tripped it)."""
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    code, out, err, hung = run_until_idle([sys.executable, "-c", W1_SWEEP], cwd=root)
    assert not hung, "the sweep made no progress for 60 s (CPU time flat): hung"
    assert code == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == "True"


class _CountedG(gj.AbstractTimeFunction):
    """A gauge's G(t) that counts, on the host, how many G (with dG/dt) it computes."""

    inner: gj.AbstractTimeFunction
    counter: list = eqx.field(static=True)

    def __call__(self, t):
        return self.value_and_derivative(t)[0]

    def value_and_derivative(self, t):
        G, dG = self.inner.value_and_derivative(t)
        # one count per G computed: a vmapped callback sees a batch of them as one array
        jax.debug.callback(lambda v: self.counter.append(np.size(v)), jnp.sum(G))
        return G, dG


def test_lane_evaluates_the_gauge_once_per_stage_time_for_all_its_inputs():
    """G(t) and dG/dt do not depend on the state: one input's solve evaluates them once per
    stage, 4N times for N RK4 steps; a lane's `observe` of M inputs with constant steps once
    per distinct stage time for all of them, 2N + 1 times, not M times per stage; and the
    closed form for the one-mode element runs, not a jvp through the exponential. Negative
    case: inputs that carry their own gauge (a vmap over elements, not inputs) evaluate it
    once per stage per element."""
    N, M = 5, 4
    k = jax.random.split(jax.random.key(7), 3)
    fixed = dict(solver=gj.RK4(), stepsize_controller=diffrax.ConstantStepSize(), dt0=1.0 / N)
    model = gj.random_linear_node(D, T, key=k[0], **fixed)
    gauge = gj.LinearGauge(D, T, num_modes=1)
    counter = []

    def moved(g):
        m = gauge.act(g, model)
        return eqx.tree_at(lambda m: m.field.G, m, _CountedG(m.field.G, counter))

    x = jax.random.normal(k[1], (M, D))
    g = gauge.sample(k[2])
    one = eqx.filter_jit(lambda g: moved(g).solve(x[0])[0])(g)
    assert sum(counter) == 4 * N
    counter.clear()
    many, stats = eqx.filter_jit(lambda g: moved(g).observe(x))(g)
    # the M inputs as one state (gj.SharedStageRK): G at t0, then at t + h/2 and t + h per
    # step (t + h is carried to the next step's first stage), not 4 per step
    assert sum(counter) == 2 * N + 1
    np.testing.assert_allclose(many[0], one, rtol=0, atol=1e-15)
    # the stats stay per input, with the solver's evaluations (4 stages per RK4 step)
    assert stats.num_evaluations.tolist() == [4 * N] * M and stats.num_steps.tolist() == [N] * M
    counter.clear()
    gs = jax.vmap(gauge.sample)(jax.random.split(k[2], M))
    eqx.filter_jit(jax.vmap(lambda g, x0: moved(g).solve(x0)[0]))(gs, x)
    assert sum(counter) == 4 * N * M


def test_shared_stage_solver_is_the_wrapped_tableau_to_rounding(lin):
    """`gj.SharedStageRK` is its wrapped tableau's solve of `field(t, x)` to rounding (5e-15
    here; measured 2e-16 to 5e-16 on O(1) states): Tsit5 under a PID controller with rejected steps
    (the carried coefficients survive a rejection: same step counts) saving at times between
    steps (dense output), Dopri5 backwards in time; and `LinearNODE.observe` with constant
    steps equals the per-input solves, observation times included. Negative cases: solvers
    without one explicit tableau, fields without the split."""
    model, x, k = lin
    gauge = gj.LinearGauge(D, T, num_modes=1)
    field = gauge.act(gauge.sample(k[2]), model).field
    pid = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    ts = jnp.linspace(0.1, T, 6)

    def both(solver, t0, t1, saveat):
        def run(s):
            sol = diffrax.diffeqsolve(diffrax.ODETerm(field), s, t0, t1, None, x[0], saveat=saveat,
                                      stepsize_controller=pid)  # fmt: skip
            return sol.ys, sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]

        return eqx.filter_jit(run)(solver), eqx.filter_jit(run)(gj.SharedStageRK(solver, field))

    (ys, *steps), (ys_shared, *steps_shared) = both(diffrax.Tsit5(), 0.0, T, diffrax.SaveAt(ts=ts))
    assert int(steps[1]) > 0 and [int(n) for n in steps] == [int(n) for n in steps_shared]
    np.testing.assert_allclose(ys_shared, ys, rtol=0, atol=5e-15)
    (ys, *steps), (ys_shared, *steps_shared) = both(
        diffrax.Dopri5(), T, 0.0, diffrax.SaveAt(t1=True)
    )
    assert [int(n) for n in steps] == [int(n) for n in steps_shared]
    np.testing.assert_allclose(ys_shared, ys, rtol=0, atol=5e-15)
    fixed = model.with_options(solver=gj.RK4(), stepsize_controller=diffrax.ConstantStepSize(),
                               dt0=T / 8, observation_times=(0.3, 0.55, T))  # fmt: skip
    moved = gauge.act(gauge.sample(k[2]), fixed)
    together, stats = eqx.filter_jit(lambda m: m.observe(x))(moved)
    alone, alone_stats = eqx.filter_jit(lambda m: jax.vmap(m.solve)(x))(moved)
    assert together.shape == alone.shape == (len(x), 3, D)
    np.testing.assert_allclose(together, alone, rtol=0, atol=5e-15)
    assert stats.num_evaluations.tolist() == alone_stats.num_evaluations.tolist()
    with pytest.raises(TypeError, match="explicit Runge-Kutta"):
        gj.SharedStageRK(diffrax.Kvaerno5(), field)
    with pytest.raises(TypeError, match="lacks"):
        gj.SharedStageRK(gj.RK4(), gj.MLPField(D, key=k[0]))


def test_w1_sweep_deviations_are_the_per_input_solves():
    """A W1-shaped sweep (one-mode `LinearGauge`, RK4, constant steps; small: d = 3, 10
    steps, 3 inputs, 4 samples) solves each lane's inputs as one state (`gj.SharedStageRK`):
    its per-sample deviations are those of per-input solves of the same elements (what the
    sweep ran before, and the benchmark's naive side) to 1e-15, inside issue 23's 1e-13
    (measured 1.1e-16 on deviations of 6e-7 to 3e-6: the RK4 truncation error the gauge
    moves)."""
    k = jax.random.split(jax.random.key(3), 3)
    fixed = dict(solver=gj.RK4(), stepsize_controller=diffrax.ConstantStepSize(), dt0=T / 10)
    model = gj.random_linear_node(D, T, key=k[0], **fixed)
    gauge = gj.LinearGauge(D, T, num_modes=1)
    x = jax.random.normal(k[1], (3, D))
    res = gj.sweep(model, gauge, x, key=k[2], num_samples=4, recheck_samples=0, control_samples=0)

    @eqx.filter_jit
    def per_input(g):
        out = jax.vmap(gauge.act(g, model).solve)(x)[0]
        return jnp.max(jnp.abs(out - jax.vmap(model.solve)(x)[0]))

    keys = gj.sample_keys(k[2], 4)
    today = np.array([per_input(gauge.sample(key)) for key in keys])
    assert float(np.min(today)) > 1e-8  # the gauge does move the RK4 solution
    np.testing.assert_allclose(np.asarray(res.max_abs), today, rtol=0, atol=1e-15)
