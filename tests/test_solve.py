"""The diffrax wrapper: evaluation counts, result codes, validation, NeuralODE."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def counting_field():
    calls = [0]

    def bump():
        calls[0] += 1

    def field(t, y, args):
        jax.debug.callback(bump)
        return -y + jnp.sin(t) * jnp.roll(y, 1)

    return field, calls


@pytest.mark.parametrize(
    "solver, controller, dt0",
    [
        (diffrax.Tsit5(), diffrax.PIDController(rtol=1e-6, atol=1e-6), None),
        (diffrax.Dopri5(), diffrax.PIDController(rtol=1e-7, atol=1e-7), 0.05),
        (diffrax.Heun(), diffrax.ConstantStepSize(), 0.1),
        (diffrax.Euler(), diffrax.ConstantStepSize(), 0.1),
        (diffrax.Bosh3(), diffrax.PIDController(rtol=1e-5, atol=1e-5), None),
        (gj.RK4(), diffrax.ConstantStepSize(), 0.1),
    ],
)
def test_evaluation_count_matches_counted_calls(solver, controller, dt0):
    field, calls = counting_field()
    y, stats = gj.solve(
        field, jnp.array([1.0, 0.5]), t1=2.0, solver=solver, stepsize_controller=controller, dt0=dt0
    )
    jax.effects_barrier()
    assert int(stats.num_evaluations) == calls[0], (int(stats.num_steps), calls[0])
    assert int(stats.num_steps) == int(stats.num_accepted_steps) + int(stats.num_rejected_steps)


@pytest.mark.parametrize("solver", [diffrax.Kvaerno5(), diffrax.ReversibleHeun()])
def test_uncountable_solvers_solve_and_say_not_counted(solver):
    """Implicit and reversible solvers run (no refusal); their evaluations are "not counted"
    (-1), never a guess. Kvaerno5 at rtol 1e-10 is accurate to ~1e-9 on exp(-2t); ReversibleHeun
    with 1000 constant steps (second order, error ~ h^2 = 1e-6) to 1.3e-6: bound 5e-6."""
    assert gj.evaluations_per_step(solver) is None
    if isinstance(solver, diffrax.ReversibleHeun):
        opts = dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=1e-3)
        tol = 5e-6
    else:
        opts = dict(stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10))
        tol = 1e-8
    y, stats = gj.solve(lambda t, y, a: -2.0 * y, jnp.ones(2), t1=1.0, solver=solver, **opts)
    np.testing.assert_allclose(y, jnp.exp(-2.0) * jnp.ones(2), rtol=tol)
    assert int(stats.num_evaluations) == gj.NOT_COUNTED
    assert gj.result_name(stats.result) == "successful"


def test_failed_solve_reports_result_instead_of_raising():
    _, stats = gj.solve(lambda t, y, a: -y, jnp.ones(2), t1=1.0, max_steps=2, throw=False)
    assert gj.result_name(stats.result) == "max_steps_reached"
    assert isinstance(stats.result, gj.SolveStatus)
    _, ok = gj.solve(lambda t, y, a: -y, jnp.ones(2), t1=1.0)
    assert gj.result_name(ok.result) == "successful"


def test_solve_accuracy_linear():
    y, _ = gj.solve(lambda t, y, a: -2.0 * y, jnp.array([1.0, 3.0]), t1=1.5)
    np.testing.assert_allclose(y, jnp.array([1.0, 3.0]) * jnp.exp(-3.0), rtol=1e-7)


def test_rk4_is_fourth_order():
    # y' = sin(t) y - y^3 / 2 has no closed form: compare with Tsit5 at rtol 1e-12. Errors of
    # 4th order fall 16x per halving (slope 4 within 0.15); Heun (order 2) on the same grid
    # gives slope 2, so a wrong tableau would be caught.
    def field(t, y, args):
        return jnp.sin(t) * y - 0.5 * y**3

    y0 = jnp.array([0.7, -0.3])
    tight = diffrax.PIDController(rtol=1e-12, atol=1e-12)
    exact, _ = gj.solve(field, y0, t1=2.0, stepsize_controller=tight)

    def errors(solver):
        out = []
        for n in (8, 16, 32, 64):
            y, _ = gj.solve(
                field,
                y0,
                t1=2.0,
                solver=solver,
                stepsize_controller=diffrax.ConstantStepSize(),
                dt0=2.0 / n,
            )
            out.append(float(jnp.max(jnp.abs(y - exact))))
        return out

    steps = np.array([8, 16, 32, 64])
    assert abs(-gj.loglog_slope(steps, errors(gj.RK4())) - 4) < 0.15
    assert abs(-gj.loglog_slope(steps, errors(diffrax.Heun())) - 2) < 0.15


def test_solve_default_controller_follows_the_state_dtype():
    """`gj.solve` without a controller solves at the state's default, as `SolveOptions` does:
    rtol = atol = 1e-5 in float32 (it took 1e-8, below what float32 resolves), 1e-8 in float64
    (unchanged): the same steps as the explicit controller, and fewer in float32."""
    field = lambda t, y, args: jnp.tanh(2.0 * y) - y  # noqa: E731

    def steps(y0, controller=None):
        return int(gj.solve(field, y0, t1=3.0, stepsize_controller=controller)[1].num_steps)

    pid = diffrax.PIDController
    with jax.enable_x64(False):
        y32 = jnp.ones(3, jnp.float32)
        assert steps(y32) == steps(y32, pid(rtol=1e-5, atol=1e-5))
        assert steps(y32) < steps(y32, pid(rtol=1e-8, atol=1e-8))
    y64 = jnp.ones(3)
    assert steps(y64) == steps(y64, pid(rtol=1e-8, atol=1e-8))


def test_solve_validation():
    f = lambda t, y, a: -y  # noqa: E731
    with pytest.raises(ValueError, match="t1"):
        gj.solve(f, jnp.ones(2), t0=1.0, t1=1.0)
    back, _ = gj.solve(f, jnp.ones(2), t0=1.0, t1=0.0)  # backwards: x(0) = e^{+1} x(1)
    np.testing.assert_allclose(back, jnp.exp(1.0) * jnp.ones(2), rtol=1e-7)
    with pytest.raises(ValueError, match="dt0"):
        gj.solve(f, jnp.ones(2), t1=1.0, stepsize_controller=diffrax.ConstantStepSize())
    with pytest.raises(ValueError, match="field"):
        gj.solve(lambda t, y, a: y[:1], jnp.ones(2), t1=1.0)
    with pytest.raises(ValueError, match="max_steps"):
        gj.solve(f, jnp.ones(2), t1=1.0, max_steps=0)


def test_neural_ode_single_batched_and_validation(getkey):
    F = gj.MLPField(3, 8, 1, key=getkey())
    model = gj.NeuralODE(F, t1=1.0)
    x = jax.random.normal(getkey(), (5, 3))
    batched = jax.jit(jax.vmap(model))(x)
    np.testing.assert_allclose(batched[2], model(x[2]), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="t1"):
        gj.NeuralODE(F, t1=0.0)
    with pytest.raises(ValueError, match="dim"):
        gj.MLPField(0, 8, 1, key=getkey())
    with pytest.raises(ValueError, match="field"):
        model(jnp.ones(4))
    with pytest.raises(ValueError, match="unknown option"):
        model.with_options(tolerance=1.0)


def test_solve_tangent_is_the_flow_jvp(getkey):
    """The sensitivity system's tangent equals a jvp through a tightly solved flow (1e-8)."""
    F = gj.MLPField(3, 8, 1, key=getkey())
    model = gj.NeuralODE(F, t1=1.0)
    x, v = jax.random.normal(getkey(), (2, 3))
    (y, dy), _ = model.solve_tangent(x, v)
    tight = model.with_options(
        adjoint=diffrax.ForwardMode(),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
    )
    y_ref, dy_ref = jax.jvp(tight, (x,), (v,))
    np.testing.assert_allclose(y, y_ref, atol=1e-8)
    np.testing.assert_allclose(dy, dy_ref, atol=1e-8)


def test_solve_options_are_one_module_the_models_hold(getkey):
    """One `SolveOptions` per neural ODE: given one by one or whole (the same solve, bit for
    bit), read through as attributes, replaced by `with_options`, kept by `with_field`."""
    F = gj.MLPField(2, 4, 1, key=getkey())
    x = jax.random.normal(getkey(), (2,))
    pid = diffrax.PIDController(rtol=1e-7, atol=1e-9)
    model = gj.NeuralODE(F, t1=1.0, solver=diffrax.Dopri5(), stepsize_controller=pid, throw=False)
    opts = gj.SolveOptions(solver=diffrax.Dopri5(), stepsize_controller=pid, throw=False)
    whole = gj.NeuralODE(F, t1=1.0, solve_options=opts)
    assert model.solve_options == opts and whole.solve_options is opts
    assert model.stepsize_controller is pid and model.throw is False
    assert isinstance(model.solver, diffrax.Dopri5) and model.dt0 is None
    assert model.max_steps == 4096 and isinstance(model.adjoint, diffrax.RecursiveCheckpointAdjoint)
    np.testing.assert_array_equal(model(x), whole(x))
    with pytest.raises(ValueError, match="not both"):
        gj.NeuralODE(F, t1=1.0, max_steps=8, solve_options=opts)
    with pytest.raises(TypeError, match="SolveOptions"):
        gj.NeuralODE(F, t1=1.0, solve_options={"max_steps": 8})
    moved = model.with_options(t1=2.0, max_steps=8)
    assert (moved.t1, moved.max_steps, moved.solver) == (2.0, 8, model.solver)
    with pytest.raises(ValueError, match="unknown option"):
        opts.replace(tolerance=1.0)
    basis = gj.FourierBasis(1.0, 1)
    linear = gj.LinearNODE(
        gj.BasisLinearField(basis, jnp.zeros((3, 2, 2)), jnp.zeros((3, 2))),
        t1=1.0,
        solve_options=opts,
    )
    assert linear.solve_options is opts and linear.with_field(F).solve_options is opts
    for m in (model, linear):
        assert isinstance(m, gj.AbstractSolvedModel)


def test_solve_options_answer_the_sweeps_questions():
    """Tightened copies (PID tolerances / 1000 floored at eps, a constant step / 8, none for
    other controllers), the requested accuracy, traced tolerances of one structure, and
    validation of tolerances."""
    pid = gj.SolveOptions(stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-9))
    tight, how = pid.tightened(1e-12)
    assert (float(tight.stepsize_controller.rtol), float(tight.stepsize_controller.atol)) == (
        pytest.approx(1e-9),
        1e-12,  # atol / 1000 = 1e-12 is floored at eps = 1e-12
    )
    assert how == "at rtol 1.0e-09, atol 1.0e-12"
    assert pid.requested_accuracy(scale=1e-2) == pytest.approx(1e-6)  # max(1e-6, 1e-9 / 1e-2)
    assert pid.requested_accuracy(scale=1e-4) == pytest.approx(1e-5)
    fixed = gj.SolveOptions(stepsize_controller=diffrax.ConstantStepSize(), dt0=0.1)
    smaller, how = fixed.tightened(1e-12)
    assert smaller.dt0 == pytest.approx(0.0125) and how == "with dt0 / 8 = 0.0125"
    assert fixed.requested_accuracy(1.0) == 0.0  # a step, not an accuracy
    clip = diffrax.ClipStepSizeController(diffrax.PIDController(rtol=1e-6, atol=1e-6))
    assert gj.SolveOptions(stepsize_controller=clip).tightened(1e-12) == (
        None,
        "no tighter solve for ClipStepSizeController",
    )
    # traced: arrays of the dtype, so the tightened copy has the same structure (one program)
    traced = pid.traced(jnp.float32)
    assert traced.stepsize_controller.rtol.dtype == jnp.float32
    assert jax.tree.structure(traced.tightened(1e-6)[0]) == jax.tree.structure(traced)
    assert fixed.traced(jnp.float64).dt0.dtype == jnp.float64
    bad = gj.SolveOptions(stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9))
    with pytest.raises(ValueError, match="below the epsilon of float32"):
        bad.check_tolerances(jnp.float32)
    bad.check_tolerances(jnp.float64)
