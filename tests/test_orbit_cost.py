"""orbit_cost: the composed gauge family's contract, the cheapest-lane rebuild, the element
charts, the estimated-steps proxy, gauge fixing by optimisation (and its negative control), the
experiment end to end with a resumed interruption, and its config checks."""

import dataclasses
import json
import warnings
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaugejax as gj
from experiments import orbit_cost
from gaugejax import gauge_search as gs, io, make_config
from gaugejax.gauges import ComposedElement, ComposedGauge

from .conftest import CompileCounter, small_node


ROOT = Path(__file__).resolve().parents[1]
D = 2


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(7), 4)
    model = small_node(k[0], D, rtol=1e-10)
    gauge = ComposedGauge(
        gj.SpatialDiffeoGauge(D, 1.0, key=k[1], num_features=4), gj.TimeReparamGauge(1.0)
    )
    x = jax.random.normal(k[2], (2, D))
    return model, gauge, x, k[3]


def test_composed_identity_compose_inverse(setup):
    """Identity, inverse (of base elements and of products) and the compose convention, for a
    composition of two reparametrisations (cheap to compile; they do not commute either; the
    diffeomorphism-then-reparametrisation family is swept below). The solves go through
    `element_cost` (the output deviation from the model)."""
    model, _, x, key = setup
    gauge = ComposedGauge(gj.TimeReparamGauge(1.0, num_modes=2), gj.TimeReparamGauge(1.0))
    # 1e-7 relative: two solves of one flow at rtol 1e-10 (each ~1e-9), fixed-point inverses
    # to 1e-16 (as tests/test_contract.py)
    assert gs.element_cost(model, gauge, gauge.identity(), x).max_rel < 1e-7
    g1, g2 = gauge.sample(jax.random.fold_in(key, 1)), gauge.sample(jax.random.fold_in(key, 2))
    assert gs.element_cost(model, gauge, gauge.compose(g1, gauge.inverse(g1)), x).max_rel < 1e-7
    # a product too: inverse(g1 g2) = inverse(g2) inverse(g1), a word of inverses
    both = gauge.compose(g1, g2)
    undone = gauge.compose(both, gauge.inverse(both))
    assert gs.element_cost(model, gauge, undone, x).max_rel < 1e-7
    # not vacuous: g1 moves the outputs of the boundary-free control (measured 1.5e-2)
    assert gs.element_cost(model, gauge.control(), g1, x).max_rel > 1e-4
    # the convention, on the fields: compose(g1, g2) acts as g1 then g2, not g2 then g1
    t, y = jnp.asarray(0.3), x[0]
    at = eqx.filter_jit(lambda m: m.field(t, y, None))  # one program per field structure
    first_then = at(gauge.act(g2, gauge.act(g1, model)))
    np.testing.assert_array_equal(at(gauge.act(both, model)), first_then)
    swapped = at(gauge.act(gauge.compose(g2, g1), model)) - first_then
    assert float(np.max(np.abs(swapped))) > 1e-6
    assert float(np.max(np.abs(at(gauge.act(g1, model)) - at(model)))) > 1e-3


def test_composed_tangent_and_sample(setup):
    model, gauge, x, key = setup
    v = gauge.sample(key)  # identity() is all zeros: the sample is a Lie-algebra direction
    t, y = jnp.asarray(0.37), x[0]

    def moved(a):
        g = jax.tree.map(lambda e, d: e + a * d, gauge.identity(), v)
        return gauge.act(g, model).field(t, y, None)

    expected = eqx.filter_jit(lambda: jax.jvp(moved, (0.0,), (1.0,))[1])()
    got = eqx.filter_jit(lambda m: m.field(t, y, None))(gauge.tangent(model, v))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)  # same jvp, reordered
    assert float(np.max(np.abs(got))) > 1e-6
    keys = jax.random.split(key, 3)
    batched = eqx.filter_jit(lambda ks: jax.vmap(gauge.sample)(ks))(keys)  # one program
    jitted = eqx.filter_jit(gauge.sample)
    for i in range(3):
        for a, b in zip(jax.tree.leaves(jitted(keys[i])), jax.tree.leaves(batched), strict=True):
            np.testing.assert_allclose(a, np.asarray(b)[i], rtol=1e-14, atol=1e-15)
    assert isinstance(batched, ComposedElement)
    first = np.asarray(batched.first)
    assert not np.allclose(first[0], first[1])


def test_composed_refusals(setup, getkey):
    model, gauge, x, key = setup
    mlp = eqx.nn.MLP(D, D, 4, 1, key=getkey())
    with CompileCounter() as counter, pytest.raises(TypeError, match="ComposedGauge"):
        gj.sweep(mlp, gauge, x, key=key, num_samples=2)
    assert counter.count == 0
    reparam = gj.TimeReparamGauge(1.0)
    with pytest.raises(TypeError, match="finite family"):
        ComposedGauge(gj.LieDeformationGauge(D, 1.0, key=getkey()), reparam)
    with pytest.raises(TypeError, match="LinearNODE only"):
        ComposedGauge(gj.LinearGauge(D, 1.0), reparam)
    with pytest.raises(TypeError, match="field gauge family"):
        ComposedGauge(gj.RescalingGauge((4,), 0.5), reparam)
    with pytest.raises(ValueError, match="same \\[0, t1\\]"):
        ComposedGauge(gj.TimeReparamGauge(2.0), reparam)
    assert ComposedGauge(reparam, reparam).control() is not None


def test_sweep_holds_control_breaks_and_cheapest_lane_rebuilds(setup):
    """The composed family's sweep holds, its control breaks; every lane's element rebuilt by
    `lane_element` gives the lane's NFE exactly and its deviation, and `cheapest_lane` picks
    the smallest NFE."""
    model, gauge, x, key = setup
    res = gj.sweep(model, gauge, x, key=key, num_samples=4, chunk_size=4, control_samples=4)
    assert res.verdict == "holds", res.verdict_reason
    # measured: control >= 1e-3, symmetric lanes <= 1e-9 (as the contract's families)
    assert res.control_max_rel.min() > max(1e-4, 1e3 * res.max_rel.max())
    costs = [gs.element_cost(model, gauge, gs.lane_element(gauge, key, i), x) for i in range(4)]
    assert [c.num_evaluations for c in costs] == res.num_evaluations.tolist()
    assert [c.num_steps for c in costs] == res.num_steps.tolist()
    # deviations: the same solves, one lane alone instead of vmapped with three others (XLA
    # may fuse differently): agree to 1e-6 of their size, far below the lanes' spread
    for c, dev in zip(costs, res.max_rel, strict=True):
        assert abs(c.max_rel - dev) <= 1e-6 * dev + 1e-15
    assert costs[0].reference_evaluations > 0 and costs[0].ok
    # not vacuous: the lanes differ in cost, so matching them all discriminates
    assert len(set(res.num_evaluations.tolist())) > 1
    best = gs.cheapest_lane(res, gauge, key)
    assert best.num_evaluations == res.num_evaluations.min() == costs[best.index].num_evaluations
    assert best.num_ok == 4
    by_steps = gs.cheapest_lane(res, gauge, key, by="num_steps")
    assert by_steps.num_steps == res.num_steps.min()
    with pytest.raises(ValueError, match="`by`"):
        gs.cheapest_lane(res, gauge, key, by="nfe")
    failed = dataclasses.replace(res, max_abs=np.full(4, np.nan))
    with pytest.raises(ValueError, match="no solved lane"):
        gs.cheapest_lane(failed, gauge, key)


def test_lipschitz_charts(getkey):
    diffeo = gj.SpatialDiffeoGauge(3, 1.0, key=getkey(), num_features=5)
    reparam = gj.TimeReparamGauge(1.0)
    chart = gs.element_chart(ComposedGauge(diffeo, reparam))
    bound = lambda g: (  # noqa: E731  (test-side arithmetic: numpy)
        float(np.linalg.norm(np.asarray(g.first), ord=2) * float(diffeo.features.lipschitz)),
        float(np.sum(np.abs(np.asarray(g.then)) * np.asarray(reparam.omega))),
    )
    element = eqx.filter_jit(lambda c, raw: c.element(raw))  # one program per structure
    huge = ComposedElement(100 * jax.random.normal(getkey(), (3, 5)), jnp.asarray([50.0, -9, 3]))
    # any raw gives a valid element: bound rho tanh(L / rho) <= rho (= rho once tanh rounds to 1)
    assert max(bound(element(chart, huge))) <= 0.5 * (1 + 1e-12)
    # the sampled elements (bound <= rho) lie in the image: element(to_raw(g)) = g, to 1e-12
    # (arctanh then tanh in float64)
    g = ComposedGauge(diffeo, reparam).sample(getkey())
    back = element(chart, chart.to_raw(g))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # value and gradient finite at the identity, where the chart is the identity map
    zero = jax.tree.map(jnp.zeros_like, g)
    grads = eqx.filter_jit(jax.grad(lambda r: jnp.sum(jax.tree.leaves(chart.element(r))[0])))(zero)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(grads))
    np.testing.assert_array_equal(jax.tree.leaves(grads)[0], np.ones((3, 5)))
    # outside the image: refused eagerly and under jit
    outside = ComposedElement(g.first, jnp.asarray([0.5, 0.0, 0.0]))  # bound pi/2 > 0.5
    with pytest.raises(ValueError, match="outside the chart's image"):
        chart.to_raw(outside)
    with pytest.raises(Exception, match="outside the chart's image"):
        jax.block_until_ready(eqx.filter_jit(chart.to_raw)(outside))
    with pytest.raises(TypeError, match="element_chart knows"):
        gs.element_chart(gj.LinearGauge(3, 1.0))


def test_estimated_steps_scaling_and_tracking(getkey):
    """The estimate is `sum r_n^(1/5)` with `r_n` proportional to 1/tolerance (rtol = atol):
    tolerance / 10^5 gives exactly 10x. A constant field has no truncation error (its estimate
    is rounding); a faster field gets more estimated and more actual steps."""
    x = jnp.asarray([0.3, -0.2])
    key = getkey()

    def node(scale, rtol):
        field = gj.MLPField(D, 16, 2, key=key, out_scale=scale)
        # array tolerances: one compiled program for every tolerance
        controller = diffrax.PIDController(rtol=jnp.asarray(rtol), atol=jnp.asarray(rtol))
        return gj.NeuralODE(field, t1=1.0, stepsize_controller=controller)

    est = eqx.filter_jit(gs.estimated_steps)
    loose, tight = est(node(1.0, 1e-5), x, 16), est(node(1.0, 1e-10), x, 16)
    np.testing.assert_allclose(float(tight / loose), 10.0, rtol=1e-9)  # float rounding only
    const = gj.NeuralODE(
        lambda t, y, args: jnp.ones_like(y),
        t1=1.0,
        stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5),
    )
    # a constant field's error estimate is float rounding only: measured 0.09x the MLP's
    assert float(est(const, x, 16)) < 0.2 * float(loose)
    fast = est(node(3.0, 1e-8), x, 16)
    slow = est(node(1.0, 1e-8), x, 16)
    solve = eqx.filter_jit(lambda m: m.solve(x)[1].num_steps)
    steps = [int(solve(node(s, 1e-8))) for s in (1.0, 3.0)]
    assert fast > slow and steps[1] > steps[0]
    with pytest.raises(TypeError, match="PIDController"):
        gs.estimated_steps(
            node(1.0, 1e-8).with_options(dt0=0.1, stepsize_controller=diffrax.ConstantStepSize()), x
        )


def test_optimise_gauge_lowers_its_objective_at_identical_outputs(tmp_path, getkey):
    """Adam on the kinetic energy of a time reparametrisation: the objective falls and the
    outputs stay (tight tolerance); the boundary-free control, optimised the same way, changes
    them (the check can fail)."""
    model = small_node(getkey(), D, rtol=1e-8)
    x = jax.random.normal(getkey(), (3, D))
    gauge = gj.TimeReparamGauge(1.0, num_modes=2)
    objective = gs.TrajectoryObjective("kinetic", x)
    controller = diffrax.PIDController(rtol=jnp.asarray(1e-11), atol=jnp.asarray(1e-12))
    tight = model.with_options(stepsize_controller=controller)
    kwargs = dict(optimizer=optax.adam(3e-2), num_steps=10, steps_per_chunk=5)
    res = gs.optimise_gauge(
        model, gauge, objective, **kwargs, checkpoint_every=5, run_dir=tmp_path / "sym"
    )
    ratio = res.final_objective / res.initial_objective
    # measured 0.992 (the random field's speed is nearly uniform already: a small gain)
    assert ratio < 0.995
    assert [s for s, _ in res.path] == [0, 5, 10]
    np.testing.assert_array_equal(res.path[-1][1], res.element)
    # 1e-8 relative: two solves of one flow at rtol 1e-11 (each ~1e-10)
    assert gs.element_cost(tight, gauge, res.element, x).max_rel < 1e-8
    assert float(jnp.sum(jnp.abs(res.element) * gauge.omega)) < gauge.rho  # a valid element
    control = gs.optimise_gauge(model, gauge.control(), objective, **kwargs)
    assert control.final_objective < control.initial_objective
    moved = gs.element_cost(tight, gauge.control(), control.element, x).max_rel
    assert moved > 1e-4, moved  # measured 2.4e-2 (and the objective falls to 0.64x)
    with pytest.raises(TypeError, match="GradientTransformation"):
        gs.optimise_gauge(model, gauge, objective, optimizer="adam", num_steps=2)
    with pytest.raises(ValueError, match="`name`"):
        gs.TrajectoryObjective("jacobian", x)


TINY = {
    "width": 8,
    "depth": 1,
    "train_steps": 10,
    "steps_per_chunk": 5,
    "batch_size": 8,
    "num_data": 64,
    "num_inputs": 4,
    "families": ["reparam"],
    "num_samples": 8,
    "chunk_size": 4,
    "optimise_family": "reparam",
    "proxies": ["adaptive"],
    "optimise_inputs": 4,
    "optimise_steps": 10,
    "optimise_chunk": 5,
    "proxy_grid": 8,
}
TIMING = ("compile_time_s", "num_programs", "run_time_s", "samples_per_s", "wall_time_s")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_experiment_writes_claims_and_resumes_to_the_same_numbers(tmp_path):
    """A run at tiny sizes writes its claims and figures; killed inside the gauge optimisation
    (its last checkpoint, a sweep and the final files not written) and run again in the same
    directory, it resumes to the same numbers and the same figures byte for byte."""
    cfg = make_config(orbit_cost.Config, TINY)
    a = orbit_cost.run(cfg, tmp_path)
    assert [c["id"] for c in a["claims"]] == [
        "orbit_keeps_function",
        "orbit_nfe_spread",
        "gauge_fixing_adaptive",
        "affine_null",
    ]
    assert all(c["verdict"] in ("pass", "FAIL", "missed") for c in a["claims"])
    assert a["claims"][-1]["verdict"] == "pass" and a["claims"][-1]["measured"] == 1.0
    assert all(np.isfinite(c["measured"]) for c in a["claims"])
    assert a["config"]["seed"] == 0 and a["seeds"]["seed"] == 0
    assert sorted(a["figures"]) == [
        "figures/gauge_optimisation.png",
        "figures/nfe_distribution.png",
    ]
    results = io.read_json(tmp_path / "results.json")
    figures = {f: (tmp_path / f).read_bytes() for f in a["figures"]}
    # as a kill inside the gauge optimisation leaves it
    arm = tmp_path / "optimise_adaptive" / "checkpoints"
    (arm / "step_00000010.eqx").unlink()
    (arm / "LATEST").write_text("step_00000005.eqx")
    for name in ("sweeps/reparam.json", "results.json", "metrics.jsonl", *figures):
        (tmp_path / name).unlink()
    b = orbit_cost.run(cfg, tmp_path)
    assert _strip(b) == _strip(a)
    assert _strip(io.read_json(tmp_path / "results.json")) == _strip(results)
    for name, data in figures.items():
        assert (tmp_path / name).read_bytes() == data, name
    steps = [r["step"] for r in io.read_jsonl(tmp_path / "optimise_adaptive" / "metrics.jsonl")]
    assert steps == list(range(10))  # each step logged once
    other = dataclasses.replace(cfg, seed=1)
    with pytest.raises(ValueError, match="another orbit_cost config"):
        orbit_cost.run(other, tmp_path)


def test_a_sweep_with_no_solved_lane_fails_its_rows_and_resumes(tmp_path):
    """measure_max_steps = 2: no lane of the orbit's sweep solves (each needs more steps): the
    run finishes with FAIL rows that say why (not a ValueError from the cheapest lane), and a
    resume that finds the saved sweep writes the same rows (it crashed again before)."""
    cfg = make_config(orbit_cost.Config, {**TINY, "measure_max_steps": 2})
    a = orbit_cost.run(cfg, tmp_path)
    rows = {c["id"]: c for c in a["claims"]}
    for name in ("orbit_keeps_function", "orbit_nfe_spread"):  # the spread is no "missed" aim
        assert rows[name]["verdict"] == "FAIL" and np.isnan(rows[name]["measured"]), rows[name]
        assert "no lane of 8 solved (failures {'max_steps_reached': 8}" in rows[name]["detail"]
    assert "sweeps/reparam.json" in {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    for name in ("results.json", "metrics.jsonl"):  # as a kill after the sweep leaves it
        (tmp_path / name).unlink()
    b = orbit_cost.run(cfg, tmp_path)
    assert _strip(b["claims"]) == _strip(a["claims"])


def test_tolerance_warning():
    # (the presets, configs/orbit_cost/*.toml, are checked in tests/test_experiments.py)
    with pytest.warns(UserWarning, match="looser than train_rtol"):
        make_config(orbit_cost.Config, {"measure_rtol": 1e-4, "train_rtol": 1e-5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the negative case: a tighter measurement is silent
        make_config(orbit_cost.Config, {"measure_rtol": 1e-8, "train_rtol": 1e-5})


@pytest.mark.parametrize(
    "values, match",
    [
        ({"families": ["diffeo", "lie"]}, "`families`"),
        ({"families": []}, "`families`"),
        ({"proxies": ["kinetic", "kinetic"]}, "`proxies`"),
        ({"optimise_family": "linear"}, "`optimise_family`"),
        ({"num_inputs": 200}, "`num_inputs` must be at most the 125 test"),
        ({"optimise_inputs": 400}, "`optimise_inputs`"),
        ({"num_samples": 0}, "`num_samples` must be an int >= 1"),
        ({"measure_max_steps": 0}, "`measure_max_steps` must be an int >= 1"),
        ({"tight_rtol": 1e-8}, "`tight_rtol`"),
        ({"spread_min": 1.0}, "`spread_min`"),
        ({"optimise_steps": 30}, "multiple of its chunk"),
        ({"rho": 1.5}, "`rho`"),
        ({"dataset": "digits"}, "`dataset`"),
        ({"train_rtol": 1.5}, "solver tolerance"),
    ],
)
def test_bad_config_is_refused(tmp_path, values, match):
    with pytest.raises(ValueError, match=match):
        make_config(orbit_cost.Config, values)
    assert not any(tmp_path.iterdir())  # nothing written


def test_results_are_json(tmp_path):
    """A sweep saved as orbit_cost saves it (`SweepResult.save`) round-trips (NaN-safe) to an
    equal SweepResult."""
    res = gj.SweepResult(
        mode="finite", max_abs=np.asarray([1.0, np.nan]), mean_abs=np.asarray([1.0, np.nan]),
        max_rel=np.asarray([0.5, np.nan]), result=np.asarray([0, 9], np.int32),
        num_steps=np.asarray([3, 4], np.int32), num_evaluations=np.asarray([19, 25], np.int32),
        parameter_growth=np.ones(2), reference_scale=2.0, noise_floor=0.0,
        solver_floor=float("nan"), floor=1e-15, control_max_rel=np.zeros(0), verdict="holds",
        verdict_reason="", dtype="float64", precision="highest", chunk_size=2, num_devices=1,
        compile_time_s=0.0, run_time_s=0.0, float_floor=5.7e-14, rounding_floor=5.7e-14,
        recheck_lanes=np.asarray([0]), recheck_loose_max_rel=np.asarray([0.5]),
        recheck_max_rel=np.asarray([np.nan]), recheck_floor=1e-11, recheck_how="at rtol 1e-11",
    )  # fmt: skip
    res.save(tmp_path / "s.json")
    json.loads((tmp_path / "s.json").read_text())
    back = gj.SweepResult.load(tmp_path / "s.json")
    for f in dataclasses.fields(res):
        np.testing.assert_array_equal(getattr(back, f.name), getattr(res, f.name))


def test_affine_gauge_moves_the_steps_only_through_the_error_norm(getkey):
    """Runge-Kutta methods are affine-equivariant: a constant gauge `x = A y + b`, `s = c t`
    keeps an explicit solve's steps once the controller's norm is pulled back through `A`
    (at rtol = 0, where the error weights are one number) and `dt0` is scaled by `c`: the same
    steps for every input and the outputs to rounding, for a general `A` (condition ~10), a
    shift and c = 3. The negative case: the controller's own RMS norm reads `A e` instead of
    `e`, and the same solve takes other steps (measured 1.2x the evaluations, 216 vs 180)."""
    model = small_node(getkey(), D).with_options(
        stepsize_controller=diffrax.PIDController(rtol=0.0, atol=1e-8), dt0=0.05
    )
    x = jax.random.normal(getkey(), (6, D))
    A = np.array([[3.0, 1.0], [0.5, 0.4]])
    gauge = dict(shift=np.array([1.0, -2.0]), time_scale=3.0)
    same = gj.affine_step_report(model, x, A, **gauge)
    assert same.status == "successful" and same.same_steps and same.ratio == 1.0
    assert same.plain_evaluations == same.gauged_evaluations > 6 * 6
    assert same.max_rel < 5e-14  # measured 5.8e-15
    plain_norm = gj.affine_step_report(model, x, A, pull_back_norm=False, **gauge)
    assert not plain_norm.same_steps and 1.1 < plain_norm.ratio < 1.3
    assert 5e-11 < plain_norm.max_rel < 5e-9  # other steps: the solver's error, measured 5.3e-10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(matrix=np.ones((2, 3))),
            r"`matrix` must be a square \(d, d\) array; received shape \(2, 3\)",
        ),
        (dict(matrix=np.ones((2, 2))), "`matrix` must be invertible"),
        (dict(shift=np.ones(3)), r"`shift` must have shape \(2,\); received shape \(3,\)"),
        (dict(time_scale=0.0), "`time_scale` must be a finite number > 0; received 0.0"),
        (
            dict(inputs=np.ones((4, 3))),
            r"`inputs` must have shape \(n >= 1, 2\); received \(4, 3\)",
        ),
        (
            dict(model=eqx.nn.Linear(2, 2, key=jax.random.key(0))),
            "neural ODE|AbstractNeuralODE",
        ),  # ours, or the hook's
        (dict(controller=diffrax.ConstantStepSize()), None),
    ],
)
def test_affine_gauge_refuses_bad_input_before_solving(kwargs, match):
    model = small_node(jax.random.key(0), D)
    if "controller" in kwargs:  # accepted: a fixed step scales with c; another kind is refused
        fixed = model.with_options(stepsize_controller=kwargs["controller"], dt0=0.1)
        assert gj.affine_gauge(fixed, np.eye(D), time_scale=2.0).node.dt0 == 0.2
        other = model.with_options(stepsize_controller=diffrax.StepTo(ts=[0.0, 0.5, 1.0]), dt0=None)
        with pytest.raises(ValueError, match="received stepsize_controller=StepTo"):
            gj.affine_gauge(other, np.eye(D))
        return
    args = dict(model=model, inputs=np.ones((4, D)), matrix=np.eye(D)) | kwargs
    with pytest.raises((TypeError, ValueError), match=match):
        gj.affine_step_report(args.pop("model"), args.pop("inputs"), args.pop("matrix"), **args)
