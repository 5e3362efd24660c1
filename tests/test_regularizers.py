"""The `regularizers` experiment and its library parts: the neural-ODE classifier, a run at
tiny sizes that resumes to the same numbers, refusals, and a diverging run stopping cleanly."""

import json
import os
import shutil
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from experiments import regularizers
from gaugejax import io, make_config


TINY = {
    "datasets": ["moons"],
    "arms": ["none", "uniform_motion+kinetic"],
    "num_seeds": 1,
    "width": 8,
    "num_steps": 20,
    "steps_per_chunk": 10,
    "batch_size": 16,
    "trajectory_examples": 4,
    "moons_samples": 64,
}
# measured on every run, so they differ between two runs of the same numbers
TIMES = ("seconds", "wall_time_s", "train_step_s", "train_time_s", "compile_s",
         "inference_s_per_example")  # fmt: skip


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def test_classifier_pads_the_state_and_counts_its_solver():
    clf = gj.ODEClassifier.mlp(2, 3, key=jax.random.key(0), augment=2, width=8,
                               **gj.fixed_steps(5))  # fmt: skip
    x = jnp.array([0.3, -1.0])
    np.testing.assert_array_equal(clf.initial_state(x), jnp.array([0.3, -1.0, 0.0, 0.0]))
    logits, stats = clf.solve(x)
    assert logits.shape == (3,) and int(stats.num_steps) == 5
    assert int(stats.num_evaluations) == 5 * 4  # RK4: 4 stages a step, no FSAL
    # the adaptive test solver gives the same logits to its tolerance (1e-6 against rtol 1e-9:
    # five RK4 steps of a field with |F| ~ 1 are accurate to ~1e-5 relative, not the solver)
    test = clf.with_node(clf.node.with_options(**gj.adaptive(1e-9)))
    np.testing.assert_allclose(test(x), logits, rtol=1e-3)
    with pytest.raises(ValueError, match="`augment` must be an int >= 0; received -1"):
        gj.ODEClassifier.mlp(2, 3, key=jax.random.key(0), augment=-1)
    with pytest.raises(ValueError, match="`num_steps` must be a positive int; received 0"):
        gj.fixed_steps(0)
    with pytest.raises(ValueError, match="`rtol` must be in \\(0, 1\\); received 0.0"):
        gj.adaptive(0.0)


def test_saveat_returns_one_solve_at_more_times():
    """`NeuralODE.solve(x0, saveat=SaveAt(ts=...))`: the states at ts of one solve (Tsit5 at
    rtol 1e-8, 4 steps), by the solver's dense interpolation: against separate solves to each
    t they deviate by 8.5e-8 (measured; asserted < 5e-7), the last one is x(t1) to rounding
    (2.2e-16), and the steps and evaluations are the plain solve's. A `saveat` that is not a
    `diffrax.SaveAt` is refused."""
    node = gj.NeuralODE(gj.MLPField(3, 8, key=jax.random.key(0)), t1=1.0)
    x0 = jnp.array([0.3, -0.5, 1.0])
    ts = jnp.linspace(0.1, 1.0, 10)
    ys, stats = node.solve(x0, saveat=diffrax.SaveAt(ts=ts))
    x1, plain = node.solve(x0)
    assert ys.shape == (10, 3) and float(jnp.max(jnp.abs(ys[-1] - x1))) <= 1e-15
    assert int(stats.num_steps) == int(plain.num_steps) == 4
    assert int(stats.num_evaluations) == int(plain.num_evaluations)
    # array end times: one compiled program for the ten separate solves
    separate = jnp.stack([node.with_options(t1=jnp.asarray(t)).solve(x0)[0] for t in ts])
    assert float(jnp.max(jnp.abs(ys - separate))) < 5e-7
    with pytest.raises(TypeError, match="saveat"):  # the annotation's check, or the method's
        node.solve(x0, saveat=ts)


def test_classifier_evaluate_and_the_fixed_step_adjoint():
    """`ODEClassifier.evaluate`: accuracy and solver cost of a batch (RK4, 4 steps: 16
    evaluations per example); `fixed_steps` keeps every step for the backward pass, which gives
    the gradient of diffrax's default adjoint bit for bit (measured: difference 0)."""
    clf = gj.ODEClassifier.mlp(2, 3, key=jax.random.key(1), augment=1, width=8,
                               **gj.fixed_steps(4))  # fmt: skip
    x = jax.random.normal(jax.random.key(2), (6, 2))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    ev = clf.evaluate(x, y)
    predicted = np.argmax(np.asarray(jax.vmap(clf)(x)), -1)
    assert float(ev["accuracy"]) == pytest.approx(np.mean(predicted == np.asarray(y)), rel=1e-15)
    assert float(ev["steps"]) == 4 and int(ev["max_steps"]) == 4
    assert float(ev["evaluations"]) == 16 and int(ev["failed"]) == 0
    with pytest.raises(TypeError, match="'y'|`y`"):  # the annotation's check, or the method's
        clf.evaluate(x, y[:5])
    assert clf.node.adjoint.checkpoints == 4

    def loss(c):
        return jnp.sum(jax.vmap(c)(x) ** 2)

    default = clf.with_node(clf.node.with_options(adjoint=diffrax.RecursiveCheckpointAdjoint()))
    for a, b in zip(
        jax.tree.leaves(eqx.filter(eqx.filter_grad(loss)(clf), eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(eqx.filter_grad(loss)(default), eqx.is_inexact_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # `adaptive` puts diffrax's default adjoint back: it replaces every option fixed_steps sets
    assert set(gj.adaptive(1e-6)) == set(gj.fixed_steps(4))
    assert gj.adaptive(1e-6)["adjoint"].checkpoints is None


def test_tiny_run_writes_every_number_and_resumes_to_them(tmp_path):
    cfg = make_config(regularizers.Config, TINY)
    full = tmp_path / "full"
    summary = regularizers.run(cfg, full)
    results = io.read_json(full / "results.json")
    arms = results["moons"]["arms"]
    assert sorted(arms) == ["none", "uniform_motion+kinetic"]
    for row in arms.values():
        # measured: accuracy 1.0 and 19 evaluations per example (3 Dopri5 steps) in both arms
        assert row["accuracy"] >= 0.95 and 10 < row["evaluations"] < 40
        assert row["failed_solves"] == 0 and row["train_step_s"] > 0
        assert set(row["regularizer_sizes"]) == {"kinetic", "jacobian", "uniform_motion"}
        assert [c["step"] for c in row["nfe_curve"]] == [10, 20]
    assert len(arms["uniform_motion+kinetic"]["training_curve"]["kinetic"]) == 20
    # Dopri5 (FSAL): 6 evaluations per attempted step and 1 at the start, per example
    steps = arms["none"]["steps"]
    assert arms["none"]["evaluations"] == pytest.approx(6 * steps + 1, rel=1e-12)
    assert {c["id"] for c in summary["claims"]} == {
        "moons_learns",
        "moons_nfe_reduction",
        "moons_wall_time",
    } or len(summary["claims"]) == 2
    traj = np.asarray(results["moons"]["trajectories"]["none"])
    assert traj.shape == (20, 4, 2 + 4) and np.all(np.isfinite(traj))
    assert (full / "figures" / "regularizers.png").stat().st_size > 10_000
    assert (full / "figures" / "trajectories_moons.png").exists()
    # a kill after the second arm's first checkpoint: that arm resumes from step 10
    part = tmp_path / "part"
    shutil.copytree(full, part)
    ckpt = part / "moons" / "uniform_motion+kinetic" / "checkpoints"
    (ckpt / "step_00000020.eqx").unlink()
    io.atomic_write_bytes(ckpt / "LATEST", b"step_00000010.eqx")
    for name in ("results.json", "metrics.jsonl"):
        (part / name).unlink()
    regularizers.run(cfg, part)
    assert _strip(io.read_json(part / "results.json")) == _strip(results)
    logged = io.read_jsonl(part / "moons" / "uniform_motion+kinetic" / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(20))  # each step logged once


def test_config_refusals_name_the_key():
    with pytest.raises(ValueError, match=r"`datasets`.*\['digits', 'moons', 'circles'\].*mnist"):
        make_config(regularizers.Config, {"datasets": ["mnist"]})
    with pytest.raises(ValueError, match="`kinetic_weight` must be a finite number >= 0; rec"):
        make_config(regularizers.Config, {"kinetic_weight": -0.1})
    with pytest.raises(ValueError, match="including 'none'"):
        make_config(regularizers.Config, {"arms": ["kinetic"]})
    with pytest.raises(ValueError, match="multiple of `steps_per_chunk`"):
        make_config(regularizers.Config, {"num_steps": 150})
    # without the NFE curve (no checkpoint is read) any chunking is accepted
    no_curve = make_config(regularizers.Config, {"num_steps": 150, "curve_examples": 0})
    assert no_curve.num_steps == 150 and no_curve.curve_examples == 0
    for bad in ({"weight_scales": [1.0, 0.0]}, {"steer_width": 1.0}):
        with pytest.raises(ValueError, match=r"`steer_width` must be in \(0, t1 = 1\).*received"):
            make_config(regularizers.Config, bad)


def test_a_diverging_run_stops_at_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A learning rate of 1e300: step 0 moves the weights to ~1e300 (finite), step 1's loss
    overflows. The CLI (in this process: the same `main` as `python -m experiments`) returns
    exit code 3, names step 1, marks the run diverged, and LATEST still names the checkpoint
    after step 0 (all finite)."""
    from experiments.__main__ import main

    monkeypatch.setenv("GAUGEJAX_JAX_CACHE", "")  # no persistent cache for this process
    monkeypatch.setenv("NPROC", os.environ.get("NPROC", "8"))  # main only sets a default
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    overrides += ['arms=["none"]', "learning_rate=1e300", "steps_per_chunk=1", "num_steps=4"]
    code = main(["regularizers", *overrides, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "training diverged at step 1" in err and "nothing after step 1 was written" in err
    (run_dir,) = tmp_path.glob("regularizers/*")
    assert io.read_json(run_dir / "status.json") == {
        "experiment": "regularizers", "status": "diverged", "step": 1}  # fmt: skip
    ckpt = run_dir / "moons" / "none" / "checkpoints"
    assert (ckpt / "LATEST").read_text() == "step_00000001.eqx"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000001.eqx"]
    assert not (run_dir / "summary.json").exists()


def test_frontier_smoke_trains_every_arm_at_each_weight(tmp_path):
    """The frontier's smoke preset: R_3 and the local error at two weight scales, STEER once.
    The 30x weight shrinks its own regulariser (measured: R_3 1.41 -> 0.060) and the local
    error's test NFE (24.6 -> 19.0); that arm trains with Dopri5, whose estimate is positive
    (RK4's is exactly 0: the reason it does not train with RK4); STEER's draws change the
    training (its losses differ from the baseline's)."""
    preset = (
        Path(__file__).resolve().parents[1] / "configs" / "regularizers" / "frontier_smoke.toml"
    )
    cfg = gj.load_config(regularizers.Config, preset)
    regularizers.run(cfg, tmp_path)
    runs = io.read_json(tmp_path / "results.json")["moons"]["arms"]
    assert sorted(runs) == ["local_error@1x", "local_error@30x", "none", "r3@1x", "r3@30x", "steer"]
    r3 = [runs[f"r3@{s}x"]["regularizer_sizes"]["r3"] for s in (1, 30)]
    assert r3[1] < 0.1 * r3[0], r3
    nfe = [runs[f"local_error@{s}x"]["evaluations"] for s in (1, 30)]
    assert nfe[1] < 0.9 * nfe[0], nfe
    for s in (1, 30):
        assert min(runs[f"local_error@{s}x"]["training_curve"]["local_error"]) > 0
    assert runs["steer"]["training_curve"]["loss"] != runs["none"]["training_curve"]["loss"]
    assert all(r["accuracy"] >= 0.9 and r["failed_solves"] == 0 for r in runs.values())
    model = gj.NeuralODE(lambda t, y, args: -(y**2), t1=1.0, **gj.fixed_steps(8))
    _, rk4 = gj.integrate_regularizers(model, jnp.array([0.5]), ("local_error",))
    assert float(rk4["local_error"]) == 0.0
    assert (tmp_path / "figures" / "regularizers.png").stat().st_size > 10_000
