"""Symmetry teleportation (gaugejax.teleport) and its experiment (experiments.teleportation).

float64 throughout (conftest). The teleported model computes the same sums as the input with
every term multiplied by alpha / alpha, so losses and outputs agree to rounding (~1e-16 per
operation, ~1e-15 after a few layers and the loss's reduction): asserted to 1e-12 relative.
A move that changed the function (the `control()` family) changes the loss at O(1).
"""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaugejax as gj
from experiments import teleportation
from gaugejax import TeleportResult, io, load_config, make_config, teleport


# rounding of the rescaled network's sums (see the module docstring)
KEEPS = 1e-12
STEPS = 4  # ascent steps of every teleport below (calls share one compiled program)


def _loss(model, batch):
    x, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y))


def _problem(activation=jax.nn.relu):
    kx, ky, km = jax.random.split(jax.random.key(3), 3)
    model = eqx.nn.MLP(4, 3, 6, 2, activation=activation, key=km)
    batch = (jax.random.normal(kx, (16, 4)), jax.random.randint(ky, (16,), 0, 3))
    return model, batch


def _arrays(model) -> list:
    return jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))


@eqx.filter_jit
def _grad_norm(model, batch):
    g = eqx.filter_grad(_loss)(model, batch)
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))


# the tests' own evaluations, each one compiled program per structure (eagerly, every op of the
# network at every shape was a program of its own)
_outputs = eqx.filter_jit(lambda model, x: jax.vmap(model)(x))
_act = eqx.filter_jit(lambda gauge, g, model: gauge.act(g, model))


# member `s` of a stacked model (`s` traced: one program for every member)
_member = eqx.filter_jit(
    lambda stack, s: jax.tree.map(lambda a: a[s] if eqx.is_array(a) else a, stack)
)


def _max_abs_log(element) -> float:
    """The largest |log alpha| over an element's factors (numpy: test-side arithmetic)."""
    return max(float(np.max(np.abs(np.log(np.asarray(a))))) for a in element)


def _rel_change(out1, out0) -> float:
    out1, out0 = np.asarray(out1), np.asarray(out0)
    return float(np.max(np.abs(out1 - out0)) / np.max(np.abs(out0)))


def test_teleport_keeps_the_function_and_raises_the_gradient_norm():
    model, batch = _problem()
    gauge = gj.RescalingGauge.from_model(model)
    res = teleport(model, _loss, batch, num_steps=STEPS, learning_rate=1.0, max_log_step=0.25)
    assert isinstance(res, TeleportResult) and res.num_objective_evaluations == STEPS + 1
    # the function: loss and every output agree to rounding
    assert float(res.relative_loss_change) <= KEEPS
    out0, out1 = _outputs(model, batch[0]), _outputs(res.model, batch[0])
    assert _rel_change(out1, out0) <= KEEPS
    # the parameters moved (factors up to e^1), and the gradient norm rose: measured 1.60x
    assert _max_abs_log(res.element) > 0.5
    before, after = float(_grad_norm(model, batch)), float(_grad_norm(res.model, batch))
    assert after > 1.2 * before
    # the reported numbers are the independently recomputed ones (1e-12: rounding of the sums)
    np.testing.assert_allclose(
        [float(res.grad_norm_before), float(res.grad_norm_after)], [before, after], rtol=KEEPS
    )
    assert res.objective_history.shape == (STEPS + 1,) and int(res.num_accepted) == STEPS
    np.testing.assert_allclose(res.objective_history[0], math.log(before**2), rtol=KEEPS)
    np.testing.assert_allclose(res.objective_history[-1], math.log(after**2), rtol=KEEPS)
    # the element maps the input to the result (another compiled program: rounding)
    moved = _act(gauge, res.element, model)
    for a, b in zip(_arrays(moved), _arrays(res.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=KEEPS, atol=0)
    # the bounded step: |log alpha| <= num_steps * max_log_step (to rounding of exp and log)
    assert _max_abs_log(res.element) <= 1.0 + 1e-12
    # the charges are the library's and a teleport changes them (O(1) here): the same sums in
    # another compiled program, equal with the tests' compile flags, 6.5e-16 apart (relative)
    # with XLA's default optimisations (measured)
    for q, want in zip(res.charges_before, gj.rescaling_conserved_quantity(model), strict=True):
        np.testing.assert_allclose(q, want, rtol=5e-15, atol=0)
    jump = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(res.charges_after, res.charges_before, strict=True)
    )
    assert jump > 0.1
    # the negative case: the same factors without compensation change the outputs at O(1)
    # (measured 0.5 relative; the check above would see it at 1e-12)
    out2 = _outputs(_act(gauge.control(), res.element, model), batch[0])
    assert _rel_change(out2, out0) > 0.1


def test_zero_steps_change_nothing_and_the_step_is_bounded():
    model, batch = _problem()
    still = teleport(model, _loss, batch, num_steps=0)
    for a, b in zip(_arrays(still.model), _arrays(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(bool(jnp.all(a == 1.0)) for a in still.element)
    assert float(still.grad_norm_after) == float(still.grad_norm_before)
    # an enormous learning rate is clipped: STEPS steps of at most 0.02 in log alpha each
    far = teleport(model, _loss, batch, num_steps=STEPS, learning_rate=1e6, max_log_step=0.02)
    largest = _max_abs_log(far.element)
    assert abs(largest - 0.02 * STEPS) <= 1e-12  # the clip binds (unclipped: ~1e5)
    assert float(far.relative_loss_change) <= KEEPS


def test_teleport_under_vmap_and_jit_and_the_curvature_objective():
    model, batch = _problem()
    stack = eqx.filter_vmap(lambda k: eqx.nn.MLP(4, 3, 6, 2, activation=jax.nn.relu, key=k))(
        jax.random.split(jax.random.key(5), 2)
    )
    gauge = gj.RescalingGauge.from_model(model)

    @eqx.filter_jit
    def stacked(models, lr):
        one = lambda m: teleport(m, _loss, batch, gauge=gauge, num_steps=STEPS, learning_rate=lr)  # noqa: E731
        return eqx.filter_vmap(one)(models)

    res = stacked(stack, jnp.asarray(1.0))
    for s in range(2):
        alone = teleport(
            _member(stack, jnp.asarray(s)),
            _loss,
            batch,
            num_steps=STEPS,
            learning_rate=1.0,
        )
        # vmapped vs single compiled programs: rounding
        np.testing.assert_allclose(res.grad_norm_after[s], alone.grad_norm_after, rtol=1e-10)
    assert bool(jnp.all(res.relative_loss_change <= KEEPS))
    # a non-positive traced learning rate is refused at run time
    with pytest.raises(eqx.EquinoxRuntimeError, match="learning_rate"):
        stacked(stack, jnp.asarray(-1.0))
    # the curvature along the gradient, ascended
    up = teleport(model, _loss, batch, num_steps=STEPS, objective="curvature", max_log_step=0.1)
    h = up.objective_history
    assert float(h[-1]) > float(h[0]) and float(up.relative_loss_change) <= KEEPS


def test_adam_aware_teleport_raises_the_gain_of_adams_next_step():
    """`objective="adam_step"` ascends `log(L - L(after a fresh Adam's first step))`: the
    function is kept, the objective rises at every step, and optax's own Adam (a fresh state,
    lr 1e-2) then gains more from its first step on the teleported model (measured 0.01501 ->
    0.01593). The objective needs the Adam learning rate, and only it takes one."""
    model, batch = _problem()
    lr = 1e-2
    res = teleport(model, _loss, batch, num_steps=STEPS, learning_rate=1.0, max_log_step=0.25,
                   objective="adam_step", adam_learning_rate=lr)  # fmt: skip
    assert float(res.relative_loss_change) <= KEEPS
    history = np.asarray(res.objective_history)
    assert np.all(np.diff(history) > 0) and int(res.num_accepted) == STEPS

    @eqx.filter_jit  # one program for both models (eagerly, a program per op and shape)
    def gain(m):  # the loss decrease of optax.adam's first step from a fresh state
        params = eqx.filter(m, eqx.is_inexact_array)
        opt = optax.adam(lr)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: float ** int
            updates, _ = opt.update(eqx.filter_grad(_loss)(m, batch), opt.init(params), params)
        return _loss(m, batch) - _loss(eqx.apply_updates(m, updates), batch)

    before, after = float(gain(model)), float(gain(res.model))
    np.testing.assert_allclose(np.log(before), history[0], rtol=1e-10)  # the objective is it
    assert 1.03 < after / before < 1.3  # measured 1.061
    with pytest.raises(ValueError, match="`adam_learning_rate` is the step size"):
        teleport(model, _loss, batch, objective="adam_step")
    with pytest.raises(ValueError, match="`adam_learning_rate` is the step size"):
        teleport(model, _loss, batch, adam_learning_rate=lr)


def test_teleport_refuses_bad_input():
    model, batch = _problem()
    tanh_model, _ = _problem(jnp.tanh)
    with pytest.raises(ValueError, match="homogeneous"):  # tanh: no rescaling symmetry
        teleport(tanh_model, _loss, batch)
    gauge = gj.RescalingGauge.from_model(model)
    with pytest.raises(ValueError, match="compensating"):
        teleport(model, _loss, batch, gauge=gauge.control())
    # (the message is gaugejax's, or the runtime type checker's where one runs: both name it)
    with pytest.raises(TypeError, match="gauge"):
        teleport(model, _loss, batch, gauge=gj.UnitPermutationGauge.from_model(model))
    with pytest.raises(TypeError, match="acts on"):
        teleport(lambda x: x, _loss, batch)
    for kwargs, message in [
        ({"num_steps": -1}, r"`num_steps` must be an int >= 0; received -1"),
        ({"learning_rate": -0.1}, r"`learning_rate` must be a finite number > 0\. Received -0\.1"),
        ({"max_log_step": float("inf")}, "`max_log_step` must be a finite number > 0"),
        (
            {"objective": "hessian"},
            r"`objective` must be one of \['grad_norm', 'curvature', 'adam_step'\]",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            teleport(model, _loss, batch, **kwargs)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        teleport(model, "loss", batch)
    with pytest.raises(TypeError, match="num_steps"):
        teleport(model, _loss, batch, num_steps=2.0)


def test_transported_adam_moments_are_those_of_the_history_seen_in_the_new_coordinates():
    """`transport_adam_state` maps an AdamW state (found inside optax's chain) after 3 steps
    to the moments of a fresh AdamW fed the gradients taken at the moved models (autodiff in
    the new coordinates, not `grad / s`): measured 2.4e-16 (mu) and 6.5e-16 (nu) relative to
    the largest entry; the untransported moments are off at O(1) (0.44, 0.69). The moved model
    keeps the function (loss and outputs: measured 0 and 3.1e-16 relative). Refusals name the
    argument."""
    model, batch = _problem()
    gauge = gj.RescalingGauge.from_model(model)
    g = gauge.sample(jax.random.key(7))  # factors exp(0.5 z): up to ~e^1.5
    opt, moved = optax.adamw(1e-2), lambda m: gauge.act(g, m)  # noqa: E731

    @eqx.filter_jit
    def history(model):
        params = lambda m: eqx.filter(m, eqx.is_inexact_array)  # noqa: E731
        state, fresh, m = opt.init(params(model)), opt.init(params(moved(model))), model
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: float ** int
            for _ in range(3):
                updates, state = opt.update(eqx.filter_grad(_loss)(m, batch), state, params(m))
                new = eqx.filter_grad(_loss)(moved(m), batch)
                _, fresh = opt.update(new, fresh, params(moved(m)))
                m = eqx.apply_updates(m, updates)
        loss = jnp.abs(_loss(moved(m), batch) / _loss(m, batch) - 1)
        out0, out1 = jax.vmap(m)(batch[0]), jax.vmap(moved(m))(batch[0])
        return m, state, fresh, loss, jnp.max(jnp.abs(out1 - out0)) / jnp.max(jnp.abs(out0))

    m, state, fresh, loss_change, out_change = history(model)
    assert float(loss_change) <= 1e-14 and float(out_change) <= 1e-14  # the function kept
    carried = gj.transport_adam_state(state, gauge, g, m)
    assert jax.tree.structure(carried) == jax.tree.structure(state)
    adam = lambda s: s[0]  # noqa: E731  (optax.adamw: scale_by_adam first in its chain)
    assert int(adam(carried).count) == 3

    def off(a, b):  # the largest deviation relative to the largest entry, over the leaves
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return max(_rel_change(x, y) for x, y in pairs)

    for name in ("mu", "nu"):
        want = getattr(adam(fresh), name)
        assert off(getattr(adam(carried), name), want) <= 5e-15
        assert off(getattr(adam(state), name), want) > 0.2  # the negative case: not carried
    # refusals: no Adam inside, a mixing family, the control, moments of another model
    params = eqx.filter(m, eqx.is_inexact_array)
    with pytest.raises(TypeError, match="`opt_state` must be the state of an optax Adam"):
        gj.transport_adam_state(optax.sgd(0.1, momentum=0.9).init(params), gauge, g, m)
    perm = gj.UnitPermutationGauge.from_model(m)
    with pytest.raises(ValueError, match="received UnitPermutationGauge, whose action mixes"):
        gj.transport_adam_state(state, perm, perm.identity(), m)
    with pytest.raises(ValueError, match="`gauge` must keep the function"):
        gj.transport_adam_state(state, gauge.control(), g, m)
    other = eqx.nn.MLP(4, 3, 5, 2, activation=jax.nn.relu, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`opt_state`'s Adam `mu` must have the structure"):
        gj.transport_adam_state(opt.init(eqx.filter(other, eqx.is_inexact_array)), gauge, g, m)
    with pytest.raises(TypeError, match="gauge"):
        gj.transport_adam_state(state, "rescaling", g, m)


# ---------------------------------------------------------------------------- the experiment

TINY = {
    "width": 8,
    "num_seeds": 2,
    "batch_size": 16,
    "num_steps": 20,
    "teleport_every": 10,
    "steps_per_chunk": 5,
    "teleport_steps": 2,
    "teleport_batch_size": 64,
}
TIMINGS = ("seconds", "wall_time_s")
ARMS_SGD = ("plain", "teleport", "balance", "early")  # adam_step, carry, kept: Adam only


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def test_experiment_writes_claims_and_figure_and_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    cfg = make_config(teleportation.Config, TINY)
    full = teleportation.run(cfg, tmp_path / "full")
    ids = [c["id"] for c in full["claims"]]
    assert ids == [
        "teleport_keeps_function",
        "teleport_raises_grad_norm",
        "sgd_keeps_teleported_charges",
        "fewer_steps_sgd",
        "final_loss_sgd",
        "sgd_speedup",
        "fewer_steps_adam",
        "final_loss_adam",
        "adam_90pct_teleport",
        "adam_90pct_adam_step",
        "adam_90pct_early",
        "adam_90pct_carry",
    ]
    assert full["figures"] == ["figures/teleportation.png"]
    assert (tmp_path / "full" / "figures" / "teleportation.png").stat().st_size > 10_000
    results = io.read_json(tmp_path / "full" / "results.json")
    curves = {k: np.asarray(v) for k, v in results["curves"]["sgd"].items()}
    assert all(c.shape == (2, 21) for c in curves.values())
    # a teleport keeps the loss: step 0 of every arm is the same loss (rounding, see KEEPS)
    np.testing.assert_allclose(curves["teleport"][:, 0], curves["plain"][:, 0], rtol=KEEPS)
    # ...and the claim measures it; the teleports moved something (the ratio is not 1)
    keeps = full["claims"][0]
    assert keeps["verdict"] == "pass" and keeps["measured"] <= KEEPS
    assert full["claims"][1]["measured"] != 1.0
    # the training losses differ after the move at step 10 (the arms are not the same run)
    assert not np.allclose(curves["teleport"][:, 15], curves["plain"][:, 15], rtol=1e-6)
    # the reach step is the first step where the seed-mean curve is at the plain final loss
    row = results["summary"]["sgd"]
    mean = curves["teleport"].mean(0)
    target = curves["plain"][:, -1].mean()
    reach = float(row["reach_mean"])
    assert (math.isinf(reach) and mean.min() > target) or (
        mean[int(reach)] <= target and np.all(mean[: int(reach)] > target)
    )
    # the cost is counted: 2 teleports x (2 + 1) objective evaluations on 64 examples
    assert results["cost"]["sgd"]["teleport"]["teleport_objective_evaluations"] == 6
    assert results["cost"]["sgd"]["plain"]["teleport_objective_evaluations"] == 0
    # ...and in gradient evaluations (minibatch gradients: 20 steps of 16 examples; a teleport
    # 2 x 3 evaluations on 64 examples = 24): teleport arms 2 moves, early 1, balance none
    want = {"plain": 20, "balance": 20, "teleport": 68, "early": 44, "adam_step": 68, "carry": 68,
            "kept": 20}  # fmt: skip
    # kept is plain Adam without its restarts: the same losses until plain's first (step 10)
    adam = {k: np.asarray(v) for k, v in results["curves"]["adam"].items()}
    np.testing.assert_array_equal(adam["kept"][:, :11], adam["plain"][:, :11])
    assert not np.allclose(adam["kept"][:, 15], adam["plain"][:, 15], rtol=1e-6)
    for opt in ("sgd", "adam"):
        got = {a: c["gradient_evaluations"] for a, c in results["cost"][opt].items()}
        assert got == {a: v for a, v in want.items() if opt == "adam" or a in ARMS_SGD}
        evals = np.asarray(results["grad_evals"][opt]["early"])
        assert evals[0] == 24 and evals[-1] == 44 and np.all(np.diff(evals) == 1)
    assert [m["step"] for m in results["moves"]["adam"]["early"]] == [0]
    # carry makes teleport's moves but carries Adam's moments through the move at step 10
    # where teleport restarts Adam: the same curve up to step 10, another one after
    adam = {k: np.asarray(v) for k, v in results["curves"]["adam"].items()}
    np.testing.assert_array_equal(adam["carry"][:, :11], adam["teleport"][:, :11])
    assert np.all(np.abs(adam["carry"][:, 12:] / adam["teleport"][:, 12:] - 1) > 1e-6)

    # a simulated kill: the second arm (sgd/teleport) stops after its checkpoint at step 15,
    # inside its second segment (after the move at step 10, whose record is already saved)
    real_train = gj.train
    calls = []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            advance = kwargs["on_chunk"]

            def interrupt(step, metrics):
                advance(step, metrics)
                if step == 15:
                    raise KeyboardInterrupt

            kwargs["on_chunk"] = interrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(gj, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        teleportation.run(cfg, tmp_path / "part")
    monkeypatch.setattr(gj, "train", real_train)
    part = tmp_path / "part"
    arm = part / "sgd" / "teleport"
    assert (arm / "checkpoints" / "LATEST").read_text() == "step_00000015.eqx"
    assert sorted(io.read_json(arm / "moves.json")) == ["0", "10"]  # the hook's records so far
    assert not (part / "results.json").exists()
    resumed = teleportation.run(cfg, part)
    assert _strip(io.read_json(part / "results.json")) == _strip(results)
    assert _strip(resumed["claims"]) == _strip(full["claims"])
    a = (tmp_path / "full" / "figures" / "teleportation.png").read_bytes()
    assert (part / "figures" / "teleportation.png").read_bytes() == a
    steps = [r["step"] for r in io.read_jsonl(arm / "metrics.jsonl")]
    assert steps == list(range(20))  # each step logged once, one log for the whole arm
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 11 and {r["arm"] for r in rows} == set(teleportation.ARMS)


def test_experiment_divergence_stops_at_the_last_good_checkpoint(tmp_path):
    # SGD at lr 1e300: step 0's update is finite (|g| < 1.8e8), step 1's loss is not (NaN)
    cfg = make_config(
        teleportation.Config,
        {**TINY, "optimizers": ["sgd"], "num_steps": 4, "teleport_every": 2,
         "steps_per_chunk": 1, "sgd_learning_rate": 1e300},
    )  # fmt: skip
    with pytest.raises(gj.TrainingDiverged, match="at step 1: sgd/plain: ") as info:
        teleportation.run(cfg, tmp_path)
    ckpt = tmp_path / "sgd" / "plain" / "checkpoints"
    assert "LATEST still names step_00000001.eqx" in str(info.value) and info.value.step == 1
    assert (ckpt / "LATEST").read_text() == "step_00000001.eqx"
    assert isinstance(info.value.__cause__, gj.TrainingDiverged)
    assert not (tmp_path / "results.json").exists()
    assert sorted(p.name for p in ckpt.glob("*.eqx")) == ["step_00000001.eqx"]


def test_bad_config_is_refused():
    for override, message in [
        ("num_steps=25", r"`teleport_every` must divide `num_steps`=25"),
        ("steps_per_chunk=30", r"`steps_per_chunk` must divide `teleport_every`=100"),
        ('arms=["plain", "balance"]', "including 'plain', 'teleport'"),
        ('optimizers=["sgd", "rmsprop"]', r"`optimizers` must name distinct entries of"),
        ('optimizers=["sgd", "sgd"]', r"`optimizers` must name distinct entries of"),
        ("sgd_learning_rate=-0.1", r"`sgd_learning_rate` must be a finite number > 0"),
        ("max_log_step=0.0", r"`max_log_step` must be a finite number > 0"),
        ("width=0", r"`width` must be an int >= 1"),
        ("depth=-1", r"`depth` must be an int >= 1"),
        ("teleport_batch_size=0", r"`teleport_batch_size` must be an int >= 1"),
        (
            'objective="hessian"',
            r"`objective` must be one of \['grad_norm', 'curvature', 'adam_step'\]",
        ),
        ("num_seeds=2.5", "`num_seeds` expects an int"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(teleportation.Config, overrides=[override])
    # the presets are configs/teleportation/*.toml (tests/test_experiments.py checks them)
