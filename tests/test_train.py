"""Training loop: optimisation, regularisers, one compilation, checkpoints, exact resume."""

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaugejax as gj


ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def problem():
    """Noisy samples of y = A x + c fitted by a linear layer (deterministic from fixed keys).
    One set of objects per process: `train` keys its compiled chunk on the functions, so the
    runs of this file that share an optimiser object share their programs."""
    ka, kc = jax.random.split(jax.random.key(0))
    A, c = jax.random.normal(ka, (3, 3)), jax.random.normal(kc, (3,))

    def batch_fn(key):
        kx, kn = jax.random.split(key)
        x = jax.random.normal(kx, (16, 3))
        return x, x @ A.T + c + 0.01 * jax.random.normal(kn, (16, 3))

    def loss_fn(model, batch):
        x, y = batch
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    import equinox as eqx

    return eqx.nn.Linear(3, 3, key=jax.random.key(1)), batch_fn, loss_fn


def test_training_reduces_loss_compiles_once_and_logs_terms(tmp_path):
    model, batch_fn, loss_fn = problem()
    penalty = lambda m, b: jnp.sum(m.weight**2)  # noqa: E731
    l2 = (1e-3, penalty)
    optimizer = optax.adam(5e-2)
    res = gj.train(
        loss_fn,
        model,
        optimizer,
        batch_fn,
        key=jax.random.key(2),
        num_steps=205,
        steps_per_chunk=20,
        regularizers={"l2": l2},
        run_dir=tmp_path,
    )
    assert res.num_compilations == 1  # 11 chunks, the last one padded: no recompilation
    assert len(res.history) == 205 and res.history[-1]["step"] == 204
    assert res.history[-1]["loss"] < 0.1 * res.history[0]["loss"]
    last = res.history[-1]
    np.testing.assert_allclose(last["total"], last["loss"] + 1e-3 * last["l2"], rtol=1e-12)
    assert len(gj.io.read_jsonl(tmp_path / "metrics.jsonl")) == 205
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step_00000205.eqx"
    # another weight, the same functions and optimiser: the compiled chunk is reused, and the
    # new weight (a traced argument, not a baked constant) is the one applied
    again = gj.train(
        loss_fn,
        model,
        optimizer,
        batch_fn,
        key=jax.random.key(2),
        num_steps=40,
        steps_per_chunk=20,
        regularizers={"l2": (0.5, penalty)},
    )
    assert again.num_compilations == 0
    last = again.history[-1]
    np.testing.assert_allclose(last["total"], last["loss"] + 0.5 * last["l2"], rtol=1e-12)
    assert again.history[0]["total"] == pytest.approx(
        res.history[0]["loss"] + 0.5 * res.history[0]["l2"], rel=1e-12
    )
    # a new optimiser object is a new program (the counter sees it)
    fresh = gj.train(
        loss_fn,
        model,
        optax.adam(5e-2),
        batch_fn,
        key=jax.random.key(2),
        num_steps=20,
        steps_per_chunk=20,
        regularizers={"l2": l2},
    )
    assert fresh.num_compilations == 1


ADAM = optax.adam(1e-2)  # one object: the in-process runs below share one compiled chunk


def resumable_run(run_dir, on_chunk=None):
    """The run that `test_killed_run_resumes_to_the_same_result` kills and resumes (its child
    process runs it too)."""
    model, batch_fn, loss_fn = problem()
    return gj.train(loss_fn, model, ADAM, batch_fn, key=jax.random.key(2), num_steps=300,
                    steps_per_chunk=10, checkpoint_every=10, run_dir=run_dir,
                    config={"lr": 1e-2, "steps": 300}, on_chunk=on_chunk)  # fmt: skip


SCRIPT = """
import sys, time
import jax
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {root!r})
from tests.test_train import resumable_run
resumable_run(sys.argv[1], on_chunk=lambda s, m: time.sleep(0.05))
"""


def test_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL mid-run (a child process, killed once its first checkpoint is written), then the
    same run resumes from the checkpoint it left: the same final weights, bit for bit, as an
    uninterrupted run, and each step logged once. The uninterrupted and the resumed run run in
    this process (the same XLA program as the child's)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    reference = resumable_run(tmp_path / "a")
    assert reference.resumed_from is None
    b = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(b)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (b / "checkpoints" / "LATEST").exists() and time.time() < deadline:
        assert proc.poll() is None, f"the child exited ({proc.returncode}) before a checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int((b / "checkpoints" / "LATEST").read_text()[5:13])
    assert 0 < killed_at < 300  # really interrupted mid-run
    resumed = resumable_run(b)
    assert resumed.resumed_from is not None and resumed.resumed_from >= killed_at
    np.testing.assert_array_equal(resumed.model.weight, reference.model.weight)
    np.testing.assert_array_equal(resumed.model.bias, reference.model.bias)
    steps = [r["step"] for r in gj.io.read_jsonl(b / "metrics.jsonl")]
    assert steps == list(range(300))


SGD = optax.sgd(1e-2)  # one object: the runs below that take it share one compiled chunk
ADAM5 = optax.adam(5e-2)  # as ADAM, for the runs below at 5e-2 (share the optimiser's programs)


def test_refuses_other_config_and_corrupt_checkpoints(tmp_path):
    model, batch_fn, loss_fn = problem()
    kw = dict(key=jax.random.key(2), steps_per_chunk=10, checkpoint_every=10, run_dir=tmp_path)
    gj.train(loss_fn, model, SGD, batch_fn, num_steps=20, config={"lr": 0.01}, **kw)
    with pytest.raises(ValueError, match=r"different config \(lr: 0.01 -> 0.1\)"):
        gj.train(loss_fn, model, optax.sgd(1e-1), batch_fn, num_steps=40, config={"lr": 0.1}, **kw)
    ckpt = tmp_path / "checkpoints" / "step_00000020.eqx"
    ckpt.write_bytes(ckpt.read_bytes()[:-7])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        gj.train(loss_fn, model, SGD, batch_fn, num_steps=40, config={"lr": 0.01}, **kw)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a gaugejax checkpoint"):
        gj.train(loss_fn, model, SGD, batch_fn, num_steps=40, config={"lr": 0.01}, **kw)


def _run(tmp_path, optimizer=None, num_steps=20, key=2, loss=None, **kw):
    model, batch_fn, loss_fn = problem()
    return gj.train(
        loss or loss_fn,
        model,
        optimizer or SGD,
        batch_fn,
        key=jax.random.key(key),
        num_steps=num_steps,
        steps_per_chunk=10,
        checkpoint_every=10,
        run_dir=tmp_path,
        **kw,
    )


def test_divergence_stops_at_the_last_good_state(tmp_path):
    # lr 1e-2 for 20 steps (two finite checkpoints), then 1e6: the parameters overflow
    lr = optax.piecewise_constant_schedule(1e-2, {20: 1e8})
    with pytest.raises(gj.TrainingDiverged, match=r"diverged at step (\d+)") as info:
        _run(tmp_path, optax.sgd(lr), num_steps=100)
    err = info.value
    # measured: the objective overflows at step 46; the checkpoint of step 40 is the last one
    assert 40 < err.step < 60
    last = f"step_{10 * (err.step // 10):08d}.eqx"
    assert f"LATEST still names {last}" in str(err) and "objective is inf" in str(err)
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == last
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.eqx"))[-1] == last
    model, _, _ = problem()
    like = (eqx.filter(model, eqx.is_inexact_array), optax.sgd(lr).init(model))
    step, (p, _) = gj.read_checkpoint(tmp_path / "checkpoints" / last, like)
    assert step == 10 * (err.step // 10) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(err.result.model))
    rows = gj.io.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(err.step)) + [err.step]
    assert rows[-1]["diverged"] == 1
    # metrics are numbers, never strings ("nan")
    assert all(isinstance(v, int | float) for r in rows for v in r.values())
    assert all(np.isfinite(r["loss"]) for r in rows[:-1])


def test_nan_loss_with_finite_gradients_stops_at_once(tmp_path):
    model, batch_fn, loss_fn = problem()
    nan_loss = lambda m, b: loss_fn(m, b) + jax.lax.stop_gradient(jnp.nan)  # noqa: E731
    with pytest.raises(gj.TrainingDiverged, match="step 0: the objective is nan") as info:
        _run(tmp_path, loss=nan_loss)
    assert info.value.result.history == []
    assert not (tmp_path / "checkpoints" / "LATEST").exists()


def test_any_damage_to_a_checkpoint_is_refused(tmp_path):
    _run(tmp_path)
    ckpt = tmp_path / "checkpoints" / "step_00000020.eqx"
    good = ckpt.read_bytes()
    model, _, _ = problem()
    like = (eqx.filter(model, eqx.is_inexact_array), optax.sgd(1e-2).init(model))
    assert gj.read_checkpoint(ckpt, like)[0] == 20
    # the header's step edited: the checksum covers the header
    ckpt.write_bytes(good.replace(b'"step": 20', b'"step": 30', 1))
    with pytest.raises(ValueError, match="corrupt"):
        _run(tmp_path, num_steps=40)
    # one flipped bit anywhere (every byte, one bit each) is refused by read_checkpoint
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 1 << (i % 8)
        ckpt.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=str(ckpt.name)):
            gj.read_checkpoint(ckpt, like)
    ckpt.write_bytes(good)


@pytest.mark.parametrize(
    "latest, message",
    [
        (b"", "must hold the name"),
        (b"\xff\xfe\x00", "cannot be read"),
        (b"../../etc/passwd", "must hold the name"),
        (b"step_00000099.eqx", "not a file"),
        (None, "no LATEST"),
    ],
    ids=["empty", "binary", "outside", "missing", "deleted"],
)
def test_damaged_or_missing_latest_is_refused(tmp_path, latest, message):
    _run(tmp_path)
    pointer = tmp_path / "checkpoints" / "LATEST"
    if latest is None:
        pointer.unlink()
    else:
        pointer.write_bytes(latest)
    with pytest.raises(ValueError, match=message):
        _run(tmp_path)
    rows = gj.io.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(20))  # nothing appended


def test_resume_with_other_run_settings_is_refused(tmp_path):
    _run(tmp_path)
    with pytest.raises(ValueError, match=r"different run \(key: "):
        _run(tmp_path, key=3)
    with pytest.raises(ValueError, match=r"different run \(num_steps: 20 -> 40\)"):
        _run(tmp_path, num_steps=40)
    with pytest.raises(ValueError, match="optimizer_state"):
        _run(tmp_path, optimizer=ADAM)
    # the same optimiser with another learning rate: its state has the same structure, its
    # first update of a probe gradient (sum -0.12 = -lr x 12 parameters) does not
    with pytest.raises(ValueError, match=r"optimizer_probe: \['-0.12', '0.0012'\] -> \['-1.2',"):
        _run(tmp_path, optimizer=optax.sgd(1e-1))
    assert _run(tmp_path).resumed_from == 20  # the same run resumes
    assert _run(tmp_path, optimizer=optax.sgd(1e-2)).resumed_from == 20  # another object


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    """No checkpoint (killed in its first chunk): training restarts at step 0 and the rows the
    killed run had logged are dropped, not appended to (the log is each step once)."""
    for step in range(7):  # as the killed run left them
        gj.io.append_jsonl(tmp_path / "metrics.jsonl", {"step": step, "loss": 1.0})
    res = _run(tmp_path)
    assert res.resumed_from is None
    assert [r["step"] for r in gj.io.read_jsonl(tmp_path / "metrics.jsonl")] == list(range(20))


def test_train_validation():
    model, batch_fn, loss_fn = problem()
    kw = dict(key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_steps"):
        gj.train(loss_fn, model, optax.sgd(0.1), batch_fn, num_steps=0, **kw)
    with pytest.raises(ValueError, match="weight >= 0"):
        gj.train(
            loss_fn,
            model,
            optax.sgd(0.1),
            batch_fn,
            num_steps=5,
            regularizers={"r": (-1.0, loss_fn)},
            **kw,
        )
    with pytest.raises(ValueError, match="checkpoint_every"):
        gj.train(
            loss_fn,
            model,
            optax.sgd(0.1),
            batch_fn,
            num_steps=5,
            steps_per_chunk=4,
            checkpoint_every=6,
            run_dir=".",
            **kw,
        )
    with pytest.raises(ValueError, match="run_dir"):
        gj.train(
            loss_fn,
            model,
            optax.sgd(0.1),
            batch_fn,
            num_steps=5,
            steps_per_chunk=5,
            checkpoint_every=5,
            **kw,
        )


def test_terms_returned_by_the_loss_are_weighted_like_regularisers():
    """A loss returning `(loss, {name: term})` and regularisers `(weight, None)`: the same
    objective as separate regulariser functions (rtol 1e-12: the same float64 arithmetic in
    another order), one pass; a missing term is refused before a step runs."""
    model, batch_fn, loss_fn = problem()
    penalty = lambda m, b: jnp.sum(m.weight**2)  # noqa: E731
    both = lambda m, b: (loss_fn(m, b), {"l2": penalty(m, b)})  # noqa: E731
    kw = dict(key=jax.random.key(2), num_steps=20, steps_per_chunk=10)
    separate = gj.train(loss_fn, model, ADAM5, batch_fn, **kw,
                        regularizers={"l2": (0.3, penalty)})  # fmt: skip
    shared = gj.train(both, model, ADAM5, batch_fn, **kw,
                      regularizers={"l2": (0.3, None)})  # fmt: skip
    for a, b in zip(separate.history, shared.history, strict=True):
        assert a["total"] == pytest.approx(b["total"], rel=1e-12) and a["l2"] > 0
    np.testing.assert_allclose(shared.model.weight, separate.model.weight, rtol=1e-12)
    with pytest.raises(ValueError, match=r"'kinetic' has no fn.*returned the terms \['l2'\]"):
        gj.train(both, model, optax.sgd(0.1), batch_fn, **kw,
                 regularizers={"kinetic": (0.3, None)})  # fmt: skip


def _halve_bias(optimizer, calls):
    """A hook that records its steps and the models it sees, halves the bias (a deterministic
    move) and restarts the optimiser."""

    def hook(step, model, state):
        calls.append((step, model))
        moved = eqx.tree_at(lambda m: m.bias, model, 0.5 * model.bias)
        return moved, optimizer.init(eqx.filter(moved, eqx.is_inexact_array))

    return hook


@pytest.mark.parametrize("killed_at", [15, 20])
def test_hook_moves_the_state_every_k_steps_and_resumes_exactly(tmp_path, killed_at):
    """The hook runs at steps 0, 10, 20, 30 and 40 with the state reached there; the step after
    a hook trains the state it returned (the loss of step 10 is the moved model's). A run killed
    after its checkpoint at step 15 (inside a segment) or 20 (before that step's hook) resumes
    to the uninterrupted run's model bit for bit, calling the hook again where the checkpoint
    stands, and its history is the whole run's (steps 0-39, each once)."""
    model, batch_fn, loss_fn = problem()
    opt = ADAM5
    key = jax.random.key(2)
    kw = dict(key=key, num_steps=40, steps_per_chunk=5, checkpoint_every=5, hook_every=10)
    calls = []
    full = gj.train(loss_fn, model, opt, batch_fn, run_dir=tmp_path / "a",
                    hook=_halve_bias(opt, calls), **kw)  # fmt: skip
    assert [s for s, _ in calls] == [0, 10, 20, 30, 40]
    pre = calls[1][1]  # the model the hook saw at step 10
    moved = eqx.tree_at(lambda m: m.bias, pre, 0.5 * pre.bias)
    batch = batch_fn(jax.random.fold_in(key, 10))
    assert full.history[10]["loss"] == pytest.approx(float(loss_fn(moved, batch)), rel=1e-12)
    assert full.history[10]["loss"] != pytest.approx(float(loss_fn(pre, batch)), rel=1e-6)

    def interrupt(step, metrics):
        if step == killed_at:
            raise KeyboardInterrupt

    part, first = tmp_path / "b", []
    with pytest.raises(KeyboardInterrupt):
        gj.train(loss_fn, model, opt, batch_fn, run_dir=part, on_chunk=interrupt,
                 hook=_halve_bias(opt, first), **kw)  # fmt: skip
    assert [s for s, _ in first] == [s for s in (0, 10, 20) if s < killed_at]
    again = []
    resumed = gj.train(loss_fn, model, opt, batch_fn, run_dir=part,
                       hook=_halve_bias(opt, again), **kw)  # fmt: skip
    assert resumed.resumed_from == killed_at
    assert [s for s, _ in again] == [s for s in (10, 20, 30, 40) if s >= killed_at]
    np.testing.assert_array_equal(resumed.model.weight, full.model.weight)
    np.testing.assert_array_equal(resumed.model.bias, full.model.bias)
    assert [r["step"] for r in resumed.history] == list(range(40))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


def test_hook_refusals():
    model, batch_fn, loss_fn = problem()
    opt = optax.sgd(0.1)
    kw = dict(key=jax.random.key(0), num_steps=10, steps_per_chunk=5)
    with pytest.raises(ValueError, match="`hook_every` must be a positive multiple of"):
        gj.train(loss_fn, model, opt, batch_fn, hook=lambda *a: None, hook_every=7, **kw)
    with pytest.raises(ValueError, match="`hook_every` needs a `hook`"):
        gj.train(loss_fn, model, opt, batch_fn, hook_every=5, **kw)
    wider = eqx.nn.Linear(3, 4, key=jax.random.key(1))  # the same tree, other shapes

    def bad(step, m, state):
        return wider, opt.init(eqx.filter(wider, eqx.is_inexact_array))

    with pytest.raises(ValueError, match="the hook at step 0 returned a model or optimiser"):
        gj.train(loss_fn, model, opt, batch_fn, hook=bad, **kw)
    # the negative case of the positive one: a hook that returns None changes nothing
    plain = gj.train(loss_fn, model, opt, batch_fn, **kw)
    watched = gj.train(loss_fn, model, opt, batch_fn, hook=lambda *a: None, **kw)
    np.testing.assert_array_equal(watched.model.weight, plain.model.weight)


def test_stacked_members_train_as_if_alone():
    """Three linear models stacked and trained on the summed loss (`StackedLoss`, Adam) end
    where each ends trained alone on the same batches (measured: at most 2.2e-16 apart on
    weights of size ~1.5, float64 rounding of the batched matmul; asserted to 1e-15), with terms
    summed too."""
    _, batch_fn, loss_fn = problem()
    keys = jax.random.split(jax.random.key(5), 3)
    stack = gj.stack_models(lambda k: eqx.nn.Linear(3, 3, key=k), keys)
    assert stack.weight.shape == (3, 3, 3)
    kw = dict(key=jax.random.key(2), num_steps=30, steps_per_chunk=10)
    with_terms = lambda m, b: (loss_fn(m, b), {"w2": jnp.sum(m.weight**2)})  # noqa: E731
    res = gj.train(gj.StackedLoss(with_terms), stack, ADAM5, batch_fn, **kw,
                   regularizers={"w2": (0.0, None)})  # fmt: skip
    first = gj.unstack_model(stack, 0)
    assert res.history[0]["w2"] == pytest.approx(
        sum(float(jnp.sum(gj.unstack_model(stack, i).weight ** 2)) for i in range(3)), rel=1e-12
    )
    for i, k in enumerate(keys):
        alone = gj.train(loss_fn, eqx.nn.Linear(3, 3, key=k), ADAM5, batch_fn, **kw)
        member = gj.unstack_model(res.model, i)
        np.testing.assert_allclose(member.weight, alone.model.weight, rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(first.weight, stack.weight[0])
    np.testing.assert_array_equal(gj.unstack_model(stack, -1).bias, stack.bias[2])
    with pytest.raises(IndexError, match="member 3 of a stack of 3 models"):
        gj.unstack_model(stack, 3)
    with pytest.raises(TypeError):
        gj.stack_models(lambda k: eqx.nn.Linear(3, 3, key=k), jax.random.key(0))


# `eqx.tree_equal` (exact) as one program per structure, not a program per leaf op and shape
_tree_equal = eqx.filter_jit(eqx.tree_equal)


def test_solve_options_are_never_trained():
    """Array-valued solve options (a fixed-step `dt0`, PID tolerances) are not trainable leaves:
    the field learns, the options stay bitwise as given. The loss does depend on them (its
    gradient with respect to `dt0` is not zero), so training every inexact array would move
    them (Adam by about its learning rate a step, whatever the gradient's size): 4 RK4 steps
    would become another number of steps, another model (measured with every inexact array
    trained: `dt0` 0.25 -> 0.104 in these 4 Adam steps)."""
    import diffrax

    key = jax.random.split(jax.random.key(0), 3)
    field = gj.MLPField(2, 8, 1, key=key[0])
    x = jax.random.normal(key[1], (16, 2))
    target = jnp.flip(x, axis=1)

    def loss_fn(model, batch):
        return jnp.mean((jax.vmap(model)(batch) - target) ** 2)

    fixed = gj.NeuralODE(field, t1=1.0, solver=gj.RK4(), dt0=jnp.asarray(0.25),
                         stepsize_controller=diffrax.ConstantStepSize())  # fmt: skip
    adaptive = gj.NeuralODE(field, t1=1.0, stepsize_controller=diffrax.PIDController(
        rtol=jnp.asarray(1e-6), atol=jnp.asarray(1e-6)))  # fmt: skip
    grad = eqx.filter_jit(eqx.filter_grad(loss_fn))(fixed, x)  # one program, not op by op
    # measured 5.6e-7: the truncation error of 4 RK4 steps changes with the step
    assert 1e-7 < abs(float(grad.solve_options.dt0)) < 5e-6
    for model in (fixed, adaptive):
        res = gj.train(loss_fn, model, optax.adam(0.05), lambda k: x, key=key[2], num_steps=4,
                       steps_per_chunk=2)  # fmt: skip
        assert res.history[-1]["loss"] < res.history[0]["loss"]
        assert not bool(_tree_equal(res.model.field, model.field))  # the field learned
        assert bool(_tree_equal(res.model.solve_options, model.solve_options))  # bitwise
    spec = gj.trainable(adaptive)
    assert spec.solve_options is False  # the whole subtree, a prefix of the model
    assert jax.tree.leaves(spec.field) == [eqx.is_inexact_array(a) for a in jax.tree.leaves(field)]


def test_a_run_directory_has_one_writer(tmp_path):
    """A second process training into a run directory is refused, naming the holder's pid (two
    writers interleaved checkpoints and logged every step twice); once the holder is gone, its
    stale lock file does not block the run, and a finished run leaves the lock file empty."""
    model, batch_fn, loss_fn = problem()
    lock = tmp_path / "train.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(gj.RunLocked, match=f"process {holder.pid} holds train.lock"):
            gj.train(loss_fn, model, optax.sgd(0.1), batch_fn, key=jax.random.key(0),
                     num_steps=4, steps_per_chunk=2, run_dir=tmp_path)  # fmt: skip
        assert not (tmp_path / "metrics.jsonl").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    res = gj.train(loss_fn, model, optax.sgd(0.1), batch_fn, key=jax.random.key(0), num_steps=4,
                   steps_per_chunk=2, run_dir=tmp_path)  # fmt: skip
    assert len(res.history) == 4 and lock.read_bytes() == b""
    # in this process too: an open lock (another writer's) refuses a second
    with gj.io.run_lock(lock), pytest.raises(gj.RunLocked, match=f"process {os.getpid()}"):
        gj.train(loss_fn, model, optax.sgd(0.1), batch_fn, key=jax.random.key(0), num_steps=4,
                 steps_per_chunk=2, run_dir=tmp_path)  # fmt: skip


def test_a_diverging_neural_ode_stops_at_the_last_good_chunk(tmp_path):
    """A neural ODE trained at lr 1e-2 for 10 steps, then 1e6: its field blows up and the
    adaptive solver reaches `max_steps` inside the compiled chunk (before, an
    `EquinoxRuntimeError` escaped `train`). It stops as `TrainingDiverged` at the chunk's first
    step (10), with that state finite in `.result`, the solver's message in the cause and
    `LATEST` at step 10."""
    import diffrax

    key = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key[1], (16, 2))
    pid = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    model = gj.NeuralODE(gj.MLPField(2, 8, 1, key=key[0]), t1=1.0, max_steps=64,
                         stepsize_controller=pid)  # fmt: skip

    def loss_fn(m, batch):
        return jnp.mean((jax.vmap(m)(batch) - jnp.flip(batch, axis=1)) ** 2)

    lr = optax.piecewise_constant_schedule(1e-2, {10: 1e8})
    with pytest.raises(gj.TrainingDiverged, match=r"diverged at step 10: .*max_steps") as info:
        gj.train(loss_fn, model, optax.sgd(lr), lambda k: x, key=key[2], num_steps=30,
                 steps_per_chunk=5, run_dir=tmp_path, checkpoint_every=5)  # fmt: skip
    err = info.value
    assert err.latest == "step_00000010.eqx" and len(err.result.history) == 10
    assert all(
        np.all(np.isfinite(a))
        for a in jax.tree.leaves(eqx.filter(err.result.model, eqx.is_inexact_array))
    )


def test_optimizer_is_one_object_per_arguments_and_refuses_bad_input():
    adam = gj.optimizer("adam", 1e-3)
    assert gj.optimizer("adam", 1e-3) is adam  # one object: `train` reuses its compiled chunk
    assert gj.optimizer("adam", 2e-3) is not adam and gj.optimizer("sgd", 1e-3) is not adam
    # the transformation optax builds: sgd's step is -lr * grad
    sgd = gj.optimizer("sgd", 0.5)
    grads = {"w": jnp.array([0.5, 0.25], dtype=jnp.float64)}
    step, _ = sgd.update(grads, sgd.init(grads))
    np.testing.assert_array_equal(step["w"], [-0.25, -0.125])
    with pytest.raises(ValueError, match=r"`name` must be an optax optimiser, e.g. 'adam'"):
        gj.optimizer("adamw2", 1e-3)
    with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number > 0; received"):
        gj.optimizer("sgd", 0.0)
