"""Experiments layer: configs, presets, CLI, run directories, the report."""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import gaugejax as gj
from experiments import (
    EXPERIMENTS,
    attention_symmetry,
    benchmark_sweep,
    gauge_fixing,
    linear_symmetry,
    node_symmetry,
    orbit_geometry,
    reproduce,
    symmetry_census,
)
from experiments._config import presets
from gaugejax import io, load_config, make_config

from .conftest import COMPILE_FLAGS


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_presets_are_the_toml_files_and_default_toml_is_the_embedded_default(name):
    module = EXPERIMENTS[name]
    found = presets(name)
    assert {"default", "smoke"} <= set(found)
    assert set(found) == {p.stem for p in (ROOT / "configs" / name).glob("*.toml")}
    # the embedded defaults (the dataclass's) are the default run; default.toml says the same
    assert make_config(module.Config, found["default"]) == module.Config()
    for values in found.values():  # every preset is a valid config
        make_config(module.Config, values)
    with pytest.raises(ValueError, match=r"no presets for `nope`: .*configs/nope holds no"):
        presets("nope")


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['dimension'\].*valid keys"):
        load_config(node_symmetry.Config, overrides=["dimension=3"])
    with pytest.raises(ValueError, match="`dim` expects an int"):
        load_config(node_symmetry.Config, overrides=["dim=3.5"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(node_symmetry.Config, overrides=["dim"])
    cfg = load_config(node_symmetry.Config, overrides=["dim=5", "scales=[0.1, 0.05]", "rtol=1e-9"])
    assert cfg.dim == 5 and cfg.scales == (0.1, 0.05) and cfg.rtol == 1e-9
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3  # type: ignore[misc]
    # out of range, refused when the config is built (before any directory or compilation)
    for override, message in [
        ("num_samples=-3", "`num_samples` must be an int >= 1; received -3"),
        ("dim=0", "`dim` must be an int >= 1"),
        ("workers=0", "`workers` must be an int >= 1"),
        ("rtol=-1", r"`rtol` is a solver tolerance: it must be in \[2.2e-16, 1\)"),
        ("scales=[0.1, -0.05]", "`scales` must be a finite number > 0; received -0.05"),
        ("amplitude=inf", "`amplitude` must be a finite number > 0; received inf"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(node_symmetry.Config, overrides=[override])
    assert load_config(node_symmetry.Config, overrides=["seed=0"]).seed == 0
    with pytest.raises(ValueError, match="`num_seeds` must be an int >= 1"):
        load_config(gauge_fixing.Config, overrides=["num_seeds=0"])
    assert load_config(gauge_fixing.Config, overrides=["lambdas=[0.0, 1.0]"]).lambdas[0] == 0.0


@pytest.mark.parametrize("problem", ["directory", "not_utf8", "missing", "unwritable_out"])
def test_cli_refuses_bad_paths_in_one_line_before_any_directory(
    tmp_path, capsys, monkeypatch, problem
):
    from experiments.__main__ import main

    monkeypatch.setenv("GAUGEJAX_JAX_CACHE", "")  # in-process: leave the compilation cache off

    out = tmp_path / "runs"
    config = {
        "directory": tmp_path,
        "not_utf8": tmp_path / "bad.toml",
        "missing": tmp_path / "nope.toml",
        "unwritable_out": None,
    }[problem]
    (tmp_path / "bad.toml").write_bytes(b"dim = \xff\xfe\n")
    if problem == "unwritable_out":
        out.write_text("a file where the run root should be")
    args = ["node_symmetry", "--out", str(out)] + (
        [] if config is None else ["--config", str(config)]
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("--out" if problem == "unwritable_out" else "--config") in err
    assert not (out / "node_symmetry").exists()


def test_reproduce_refuses_a_bad_preset_before_any_directory(tmp_path, capsys, monkeypatch):
    """`reproduce preset=bogus` is a usage error naming the presets an experiment has, before
    the run directory exists (it created the directory, then failed with a traceback)."""
    from experiments.__main__ import main

    monkeypatch.setenv("GAUGEJAX_JAX_CACHE", "")
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--out", str(tmp_path), "preset=bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "`preset` must be one of ['default', 'smoke'] for node_symmetry; received 'bogus'" in err
    assert not (tmp_path / "reproduce").exists()
    assert make_config(reproduce.Config, {"preset": "smoke"}).preset == "smoke"


def test_atomic_writes_and_jsonl(tmp_path):
    io.write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": "nan", "y": [1, 2]}
    io.append_jsonl(tmp_path / "m.jsonl", {"step": 1})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 2')  # a torn last line, as a killed writer would leave
    assert io.read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}]
    assert not list(tmp_path.glob(".*tmp"))
    a, b = io.make_run_dir(tmp_path, "exp"), io.make_run_dir(tmp_path, "exp")
    assert a != b and a.is_dir() and b.is_dir()
    # results are readable by others (mkstemp alone writes 0600)
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~io._UMASK and mode & 0o044 == 0o044 & ~io._UMASK


def test_concurrent_run_dirs_are_distinct(tmp_path):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        dirs = list(pool.map(lambda _: io.make_run_dir(tmp_path, "exp"), range(200)))
    assert len(set(dirs)) == 200 and all(d.is_dir() for d in dirs)


def test_env_records_the_git_commit():
    info = io.env_info()
    assert set(info["git"]) == {"commit", "dirty"}
    if (ROOT / ".git").exists():  # a checkout (CI's fresh clone is one)
        assert len(info["git"]["commit"]) == 40 and isinstance(info["git"]["dirty"], bool)


# reproduce's plumbing at a small cost: one cheap check of each experiment with checks (every
# claim is a library test, and all 50 at full size are the main command); gauge_fixing has its
# own CLI test (killed and resumed)
PLUMBING = [
    "experiments=['node_symmetry', 'linear_symmetry', 'attention_symmetry', 'orbit_geometry']",
    "checks=['node_symmetry.eq20', 'linear_symmetry.eq27', 'attention_symmetry.cubic', "
    "'orbit_geometry.mlp', 'orbit_geometry.drift']",
]


def _report_without_timings(text: str) -> str:
    import re

    text = re.sub(r"^- date \(UTC\): .*$", "", text, flags=re.M)
    return re.sub(r"^(## \w+) \(\d+ s\)$", r"\1", text, flags=re.M)


def _cli(args: list[str], capfd) -> tuple[int, str, str]:
    """`python -m experiments ARGS` run in this process: `(exit code, stdout, stderr)`. The
    CLI's compilation cache is the test session's (`tests/conftest.py`; none by default),
    and the thread-pool size it sets for a fresh process (`NPROC`, read only when JAX starts)
    is not left behind for the subprocesses of later tests."""
    from experiments.__main__ import main

    nproc, cache = os.environ.get("NPROC"), os.environ.get("GAUGEJAX_JAX_CACHE")
    os.environ["GAUGEJAX_JAX_CACHE"] = os.environ.get("GAUGEJAX_TEST_JAX_CACHE", "")
    try:
        try:
            code = main(args)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    finally:
        for name, value in (("NPROC", nproc), ("GAUGEJAX_JAX_CACHE", cache)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    out, err = capfd.readouterr()
    return code, out, err


def test_reproduce_writes_the_report_and_resumes_an_interrupted_run(tmp_path, capfd):
    """`reproduce` through the CLI at the smoke preset (selected checks): the claims land in
    report.md with the checks left out and every disagreement with its evidence row; an
    interrupted run (one experiment unfinished, its last check not saved) resumed with
    `--resume` keeps the finished experiments and ends with the same report. Both runs in this
    process (`_cli`), and their experiments too (`workers = 1`: the resume runs the programs
    the first run compiled; the children of two workers are tested by
    `test_interrupted_reproduce_stops_its_child_processes`). The interruption is simulated,
    not a signal (a killed CLI and its resume:
    `test_killed_gauge_fixing_resumes_to_the_same_files`)."""
    code, out, err = _cli(
        ["reproduce", "--config", str(ROOT / "configs" / "reproduce" / "smoke.toml"), *PLUMBING,
         "workers=1", "--out", str(tmp_path / "runs")],
        capfd,
    )  # fmt: skip
    assert code == 0, out[-2000:] + err[-3000:]
    assert "[1/4] node_symmetry: 1 checks" in err
    (run_dir,) = (tmp_path / "runs" / "reproduce").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    ids = [c["id"] for c in summary["claims"]]
    assert ids[:3] == ["eq20_verdict", "eq27", "eq38"]
    assert {"orthogonal_mlp", "control_mlp", "conserved_drift", "decay_breaks_charge"} <= set(ids)
    assert summary["num_pass"] == summary["num_claims"] == len(ids) == 7
    report = (run_dir / "report.md").read_text()
    assert "7 of 7 claims pass" in report
    left = summary["checks_left_out"]
    assert "node_symmetry.thm21" in left and "linear_symmetry.rescaling" in left
    assert "checks left out" in report and "`node_symmetry.thm21`" in report
    # every disagreement with the printed paper is listed, with its evidence row where it ran
    for row_id, _ in reproduce.DISAGREEMENTS:
        assert f"`{row_id}` row:" in report
    assert "`eq20_verdict` row: measured" in report and "`eq27` row: measured" in report
    assert "`eq23_verdict` row: not run at this preset" in report
    # the checks a figure needs ran: it is drawn and the report shows it
    assert (run_dir / "orbit_geometry" / "figures" / "orbit_geometry.png").stat().st_size > 10_000
    assert "(orbit_geometry/figures/orbit_geometry.png)" in report
    env_json = json.loads((run_dir / "env.json").read_text())
    assert env_json["x64"] is True and env_json["versions"]["jax"]
    assert io.read_json(run_dir / "status.json")["status"] == "complete"

    # as an interruption inside node_symmetry leaves the run: its check and summary not saved
    for name in ("node_symmetry/summary.json", "node_symmetry/checks/eq20.json", "report.md",
                 "summary.json"):  # fmt: skip
        (run_dir / name).unlink()
    io.write_json(run_dir / "status.json", {"experiment": "reproduce", "status": "interrupted"})
    code, _, err = _cli(["reproduce", "--resume", str(run_dir)], capfd)
    assert code == 0, err[-3000:]
    assert "linear_symmetry: kept from the interrupted run" in err
    assert "[1/4] node_symmetry: 1 checks" in err
    assert io.read_json(run_dir / "status.json")["status"] == "complete"
    resumed = (run_dir / "report.md").read_text()
    assert _report_without_timings(resumed) == _report_without_timings(report)


def test_a_run_directory_has_one_process(tmp_path, capfd, monkeypatch):
    """A run directory is locked by the CLI process running in it (`gj.io.run_lock`): a second
    one (`--resume` of a running run) is refused at once, naming the holder's pid and host,
    and writes nothing (before, two processes both ran, interleaving their files). The lock is
    held for the whole run and released at its end; a stale lock file (a killed holder's pid
    left in it) does not block a resume. The experiment's run is replaced by a probe: no JAX
    work."""
    import platform

    from experiments import node_symmetry
    from experiments.__main__ import RUN_LOCK

    run_dir = tmp_path / "run"
    config = dataclasses.asdict(make_config(node_symmetry.Config, {"checks": ["eq20"]}))
    io.write_json(run_dir / "config.json", config)
    io.write_json(run_dir / "status.json", {"experiment": "node_symmetry", "status": "running"})
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    held = []

    def probe(cfg, directory):  # what the run sees: its directory locked by this process
        with pytest.raises(gj.RunLocked):
            with gj.io.run_lock(directory / RUN_LOCK):
                pass
        held.append((directory / RUN_LOCK).read_text())
        return {"claims": []}

    monkeypatch.setattr(node_symmetry, "run", probe)
    with gj.io.run_lock(run_dir / RUN_LOCK):  # the first process, still running
        code, _, err = _cli(["node_symmetry", "--resume", str(run_dir)], capfd)
        after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != RUN_LOCK}
    assert code == 2 and held == [], err
    holder = f"process {os.getpid()} on {platform.node()} holds {RUN_LOCK}"
    assert f"--resume {run_dir}: {run_dir} is in use: {holder}" in err.strip().splitlines()[-1]
    assert after == before  # env.json not written, status.json still the holder's
    (run_dir / RUN_LOCK).write_text("999999999 on a-killed-host")  # a killed holder's file
    code, out, err = _cli(["node_symmetry", "--resume", str(run_dir)], capfd)
    assert code == 0, err
    assert held == [f"{os.getpid()} on {platform.node()}"]
    assert (run_dir / RUN_LOCK).read_bytes() == b""  # released
    assert io.read_json(run_dir / "status.json")["status"] == "complete"


def test_cli_rejects_unknown_key_with_exit_code(tmp_path, capfd):
    code, _, err = _cli(["node_symmetry", "nonsense=1", "--out", str(tmp_path)], capfd)
    assert code == 2  # argparse's usage error: the exit status of `python -m experiments`
    assert "unknown config key(s) ['nonsense']" in err and "valid keys" in err
    assert not (tmp_path / "node_symmetry").exists()


def test_cli_lists_experiments_and_their_keys(capsys):
    from experiments.__main__ import main

    assert main([]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("node_symmetry", "reproduce", "benchmark_sweep"))
    assert main(["node_symmetry", "--help"]) == 0
    text = capsys.readouterr().out
    assert "num_samples = 128" in text and "checks (select" in text and "thm21" in text


def test_linear_symmetry_config_cross_checks():
    with pytest.raises(ValueError, match="theorem_layers"):
        make_config(linear_symmetry.Config, {"theorem_layers": 3, "layer_counts": [1, 4, 8]})
    with pytest.raises(ValueError, match="Euler rate"):
        make_config(linear_symmetry.Config, {"theorem_layers": 2, "layer_counts": [1, 2, 4]})


def test_gauge_fixing_config_validation():
    with pytest.raises(ValueError, match="lambdas"):
        make_config(gauge_fixing.Config, {"lambdas": [0.1, 1.0]})
    with pytest.raises(ValueError, match=">= 0"):
        make_config(gauge_fixing.Config, {"lambdas": [0.0, -1.0]})
    with pytest.raises(ValueError, match=r"`regularizer` must be one of \['eq45'"):
        make_config(gauge_fixing.Config, {"regularizer": "jacobian"})
    with pytest.raises(ValueError, match="regularizer_inputs"):
        make_config(gauge_fixing.Config, {"regularizer_inputs": 64})
    with pytest.raises(ValueError, match=r"`arms` must name distinct entries.*\['eq46'\]"):
        make_config(gauge_fixing.Config, {"arms": ["eq46"]})
    # a comparison measured at a looser tolerance than it trained at: warned, not refused
    with pytest.warns(UserWarning, match="test_rtol = 1e-05 is looser than train_rtol = 1e-06"):
        make_config(gauge_fixing.Config, {"test_rtol": 1e-5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_config(gauge_fixing.Config, {})  # 1e-8 at test, 1e-6 in training: silent
    with pytest.raises(ValueError, match="learning_rates"):
        make_config(orbit_geometry.Config, {"learning_rates": [0.001]})


def test_reproduce_config_validation():
    with pytest.raises(ValueError, match=r"unknown experiment\(s\) \['nope'\]"):
        make_config(reproduce.Config, {"experiments": ["nope"]})
    # the benchmark is not one of reproduce's experiments (it was accepted and ran 9 minutes)
    with pytest.raises(ValueError, match=r"unknown experiment\(s\) \['benchmark_sweep'\]"):
        make_config(reproduce.Config, {"experiments": ["benchmark_sweep"]})
    # a config.json holding `null` (a hand-edited run directory): named, not a TypeError
    with pytest.raises(ValueError, match=r"config values must be a mapping.*received None"):
        make_config(reproduce.Config, None)
    with pytest.raises(ValueError, match=r"'experiment.check'.*received 'eq16'"):
        make_config(reproduce.Config, {"checks": ["eq16"]})
    with pytest.raises(ValueError, match=r"received 'gauge_fixing.train'"):
        make_config(reproduce.Config, {"checks": ["gauge_fixing.train"]})
    with pytest.raises(ValueError, match=r"received 'node_symmetry.eq16'"):
        make_config(
            reproduce.Config, {"experiments": ["linear_symmetry"], "checks": ["node_symmetry.eq16"]}
        )
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['eq17'\].*valid checks"):
        make_config(reproduce.Config, {"checks": ["node_symmetry.eq17"]})
    with pytest.raises(ValueError, match="`workers` must be an int >= 1"):
        make_config(reproduce.Config, {"workers": 0})
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['nope'\] in `checks`"):
        make_config(orbit_geometry.Config, {"checks": ["nope"]})
    with pytest.raises(ValueError, match="twice"):
        make_config(attention_symmetry.Config, {"checks": ["cubic", "cubic"]})
    # an experiment at its own preset: the full preset's frontier; entries named or refused
    full = make_config(reproduce.Config, presets("reproduce")["full"])
    configs = full.experiment_configs()
    assert configs["regularizers"].weight_scales == (0.3, 1.0, 3.0, 10.0)
    assert configs["node_symmetry"] == node_symmetry.Config()  # the others at `preset`
    assert full.preset_of("regularizers") == "frontier" and full.preset_of("alignment") == "default"
    for bad in (["regularizers"], ["nope=smoke"], ["regularizers=smoke", "regularizers=frontier"]):
        with pytest.raises(ValueError, match=r"'experiment=preset', one per experiment.*received"):
            make_config(reproduce.Config, {"presets": bad})
    with pytest.raises(ValueError, match=r"one of \[.*'frontier'.*\] for regularizers; .*'huge'"):
        make_config(reproduce.Config, {"presets": ["regularizers=huge"]})
    # the smoke preset's selection is valid and covers every experiment
    smoke = make_config(reproduce.Config, presets("reproduce")["smoke"])
    with_checks = {n for n in smoke.experiments if hasattr(EXPERIMENTS[n], "CHECKS")}
    assert set(smoke.selection()) == with_checks and "gauge_fixing" not in with_checks


def test_reproduce_runs_a_selection_and_lists_what_it_left_out(tmp_path):
    """A selection runs just those checks, with the keys of a full run (same numbers), and the
    report names every check it left out."""
    cfg = make_config(
        reproduce.Config,
        {
            "preset": "smoke",
            "experiments": ["node_symmetry"],
            "checks": ["node_symmetry.eq16", "node_symmetry.lie_bracket"],
        },
    )
    summary = reproduce.run(cfg, tmp_path)
    assert [c["id"] for c in summary["claims"]] == ["lie_bracket", "eq16"]  # CHECKS order
    assert summary["num_pass"] == 2
    left = {name for name, _ in node_symmetry.CHECKS} - {"eq16", "lie_bracket"}
    assert summary["checks_left_out"] == [
        f"node_symmetry.{n}" for n, _ in node_symmetry.CHECKS if n in left
    ]
    report = (tmp_path / "report.md").read_text()
    assert f"checks left out at this preset ({len(left)}" in report and len(left) == 6
    assert "`node_symmetry.thm21`" in report and "`node_symmetry.thm21_trajectory`" in report
    # the figures need checks that did not run: none is drawn, and none is claimed
    assert json.loads((tmp_path / "node_symmetry" / "summary.json").read_text())["figures"] == []
    # a lone check reproduces the number it has in a run of both (its key does not change)
    alone = make_config(
        node_symmetry.Config, {**presets("node_symmetry")["smoke"], "checks": ["eq16"]}
    )
    rows = node_symmetry.run(alone, tmp_path / "alone")["claims"]
    assert rows[0]["measured"] == summary["claims"][1]["measured"]


def test_benchmark_sweep_measures_the_same_program_on_every_side(tmp_path):
    """Tiny sizes: one row per workload, batch size and side, compile and run times apart; the
    sides compute the same per-sample numbers from the same gauge elements (W1 and W2 to
    rounding; W3's naive jvp through an adaptive solve is not under error control, and its
    error shows); a side that is not installed is a row that says so."""
    # the smoke preset as its TOML gives it, on the sides every install has
    cfg = load_config(
        benchmark_sweep.Config,
        ROOT / "configs" / "benchmark_sweep" / "smoke.toml",
        # (the sharded side: test_benchmark_cli_shards_over_one_cpu_device_per_core, through the
        # CLI, and the sweep's own sharding tests)
        ['sides=["gaugejax", "naive_diffrax"]'],
    )
    summary = benchmark_sweep.run(cfg, tmp_path)
    rows = {(r["workload"], r["side"]): r for r in io.read_json(tmp_path / "results.json")["rows"]}
    # the sharded side on this process's device(s): shard_map over a mesh of one device is the
    # unsharded program, bit for bit (several devices: the same per-sample programs). Checked
    # here, not in a second CLI process, as its unsharded side is the w1 program `run` just
    # compiled (kept per process: read, not compiled again)
    devices = len(jax.devices())
    both = dataclasses.replace(cfg, sides=("gaugejax", "gaugejax_sharded"))
    w1_key = jax.random.split(jax.random.key(cfg.seed), len(cfg.workloads))[0]  # as `run`'s
    unsharded, sharded = benchmark_sweep.measure(both, "w1", w1_key, 4)
    assert unsharded["compile_s"] == 0.0 and sharded["status"] == "ok"
    assert sharded["num_devices"] == devices
    assert sharded["max_diff_vs_gaugejax"] <= (0.0 if devices == 1 else 1e-14)
    assert len(rows) == len(summary["rows"]) == 6
    for w in ("w1", "w2", "w3"):
        for side in ("gaugejax", "naive_diffrax"):
            r = rows[w, side]
            assert r["status"] == "ok" and r["num_samples"] == 4 and r["dtype"] == "float64"
            # a compile, not a reused program (gaugejax's sweep reports 0.0 for one; a
            # cached call returns in microseconds); measured 1.5 - 9 s and 130 - 780 samples/s
            # on the loaded 2-core machine (timings: bounds for any machine, not pinned)
            assert r["compile_s"] > 1e-3 and r["samples_per_s"] > 1
    # W1: RK4 with 10 steps on a gauge-transformed linear ODE, O(dt^4): well above 0, and the
    # naive diffeqsolve of the same transformed field gives the same numbers
    assert 5e-5 < rows["w1", "gaugejax"]["max_deviation"] < 5e-4  # measured 1.8e-4
    assert rows["w1", "naive_diffrax"]["max_diff_vs_gaugejax"] < 1e-14
    # W2 (10 fixed Tsit5 steps): the response is the truncation error (measured 6.0e-9), and
    # the sensitivity system and the jvp through the fixed-step solve agree to rounding
    assert 1e-9 < rows["w2", "gaugejax"]["max_deviation"] < 5e-8
    assert rows["w2", "naive_diffrax"]["max_diff_vs_gaugejax"] < 1e-14
    # W3 (adaptive): the tangent under error control stays near rtol; the jvp through the
    # adaptive solve does not (measured 7.4e-5 vs 2.4e-2 at the smoke sizes)
    assert 1e-5 < rows["w3", "gaugejax"]["max_deviation"] < 5e-4
    assert rows["w3", "naive_diffrax"]["max_deviation"] > 5e-3
    # measured 1.0: the 4 lanes take the same number of steps
    assert 0.9 < rows["w3", "gaugejax"]["lane_efficiency"] <= 1
    assert sum(rows["w3", "gaugejax"]["steps_histogram"].values()) == 4
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + 6 and "| w3 | 4 | naive_diffrax |" in table
    assert (tmp_path / summary["figures"][0]).is_file()
    # FLOP/s from each side's own op count (XLA's cost of one field evaluation times the
    # side's evaluations per sample): on the fixed-step workloads both JAX sides make the same
    # evaluations, so the ratio of their FLOP/s is the ratio of their rates; on w3 the naive
    # jvp through the adaptive solve takes fewer steps and is credited with fewer FLOPs. The
    # count is the field's: w1 at d = 3 costs at least one d x d matvec (2 d^2) per input and
    # evaluation
    ceiling = summary["env"]["ceiling"]
    assert ceiling["flop_per_s"] > 1e8 and ceiling["n"] == 1024  # a CPU matmul
    for w in ("w1", "w2"):
        a, b = rows[w, "gaugejax"], rows[w, "naive_diffrax"]
        assert a["flops_per_sample"] == b["flops_per_sample"] > 0
        assert a["flop_per_s"] / b["flop_per_s"] == pytest.approx(
            a["samples_per_s"] / b["samples_per_s"]
        )
        assert a["ceiling_fraction"] == pytest.approx(a["flop_per_s"] / ceiling["flop_per_s"])
    a, b = rows["w3", "gaugejax"], rows["w3", "naive_diffrax"]
    assert b["evaluations_mean"] < a["evaluations_mean"] and b["op_count"] == "own evaluations"
    assert b["flops_per_sample"] / a["flops_per_sample"] == pytest.approx(
        b["evaluations_mean"] / a["evaluations_mean"]
    )
    w1 = rows["w1", "gaugejax"]
    assert w1["evaluations_mean"] == 8 * 4 * 10  # 8 inputs, RK4, 10 fixed steps
    assert w1["flops_per_sample"] >= 8 * 40 * 2 * 3**2
    assert rows["w2", "gaugejax"]["evaluations_mean"] == 8 * (6 * 10 + 1)  # Tsit5 (FSAL)
    # past baseline_max_samples only gaugejax runs; the gpu preset's TOML is its embedded one
    capped = dataclasses.replace(cfg, baseline_max_samples=2)
    assert benchmark_sweep.skip_reason(capped, "w1", "naive_diffrax", 4).startswith("skipped: B >")
    assert benchmark_sweep.skip_reason(capped, "w1", "gaugejax", 4) is None
    # a side whose package is missing is a row that says so (whatever this environment has)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", lambda name: None)
        missing = benchmark_sweep.skip_reason(cfg, "w1", "gradsolve", 4)
        torch_missing = benchmark_sweep.skip_reason(cfg, "w1", "torchdiffeq", 4)
        closed_missing = benchmark_sweep.skip_reason(cfg, "w1", "torchdiffeq_closed_form", 4)
    assert missing.startswith("skipped: gradsolve is not installed")
    assert "torch, torchdiffeq not installed" in torch_missing
    assert "torch, torchdiffeq not installed" in closed_missing
    gpu = load_config(benchmark_sweep.Config, ROOT / "configs" / "benchmark_sweep" / "gpu.toml")
    assert gpu == make_config(benchmark_sweep.Config, presets("benchmark_sweep")["gpu"])
    with pytest.raises(ValueError, match=r"`workloads` must name distinct entries of .*\[.w4.\]"):
        make_config(benchmark_sweep.Config, {"workloads": ["w4"]})
    with pytest.raises(ValueError, match="batch_sizes"):
        make_config(benchmark_sweep.Config, {"batch_sizes": [0]})
    with pytest.raises(ValueError, match="`dtype` must be"):
        make_config(benchmark_sweep.Config, {"dtype": "float16"})


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# timing fields, the checksum of a file that holds one (it covers the timing too), and the
# records of a resumed run's earlier parts (env.json)
TIMINGS = ("seconds", "wall_time_s", "date_utc", "sha256", "earlier_parts")


def _without_timings(name: str, data: bytes):
    """A file's content with its timing fields (`TIMINGS`, at any depth of a JSON file or a
    JSONL row) removed: they differ between any two runs. Other files: the bytes."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    if name.endswith(".jsonl"):
        return [strip(json.loads(line)) for line in data.splitlines()]
    if name.endswith(".json"):
        return strip(json.loads(data))
    return data


def test_an_interrupted_experiment_resumes_to_the_same_files(tmp_path, monkeypatch):
    """What an interrupted run left (finished checks in checks/) is kept; the rest runs; every
    file but timings equals an uninterrupted run's (figures byte for byte). A failing plot
    raises and closes the figures it opened."""
    cfg = make_config(
        node_symmetry.Config,
        {**presets("node_symmetry")["smoke"], "checks": ["lie_bracket", "eq16"], "workers": 1},
    )
    full, part = tmp_path / "full", tmp_path / "part"
    for d in (full, part):
        io.write_json(d / "summary.json", node_symmetry.run(cfg, d))
    # as a kill after lie_bracket finished leaves it: eq16 and the final files missing
    for name in ("checks/eq16.json", "results.json", "metrics.jsonl", "summary.json"):
        (part / name).unlink()
    for fig in (part / "figures").glob("*"):
        fig.unlink()
    kept = (part / "checks" / "lie_bracket.json").read_bytes()
    io.write_json(part / "summary.json", node_symmetry.run(cfg, part))
    assert (part / "checks" / "lie_bracket.json").read_bytes() == kept  # not run again
    a, b = _files(full), _files(part)
    assert sorted(a) == sorted(b) and "checks/eq16.json" in a
    for name in a:
        assert _without_timings(name, a[name]) == _without_timings(name, b[name]), name
    # the saved checks belong to their config: another one is refused, never mixed in
    other = dataclasses.replace(cfg, seed=1)
    with pytest.raises(ValueError, match="another node_symmetry config"):
        node_symmetry.run(other, part)
    # a plot that fails (every check already saved: only the files and figures are redone)
    # raises, and leaves no figure of its own open in this process
    import matplotlib.pyplot as plt

    def failing_plot(results, fig_dir, config):
        plt.figure()
        raise RuntimeError("plot failed")

    before = plt.get_fignums()
    monkeypatch.setattr(node_symmetry, "plot", failing_plot)
    with pytest.raises(RuntimeError, match="plot failed"):
        node_symmetry.run(cfg, part)
    assert plt.get_fignums() == before


# A child's SIGINT set to its default and unblocked, then `python ARGS...` exec'd in its place
# (Python installs its own SIGINT handler only when it starts with the default). A
# `preexec_fn` would do the same between fork and exec, but it forks this multithreaded
# process and runs Python there (what CPython warns may deadlock: "os.fork() was called ...
# JAX is multithreaded"); this trampoline is an ordinary spawn.
DEFAULT_SIGINT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_interrupt_stops_within_seconds_and_marks_the_run(tmp_path, signum):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`) while a check runs: the CLI exits within
    10 s (the checks not started are
    cancelled), status "interrupted", nothing claimed, and it says how to resume (resuming to
    the same files: `test_an_interrupted_experiment_resumes_to_the_same_files` for checks,
    `test_killed_gauge_fixing_resumes_to_the_same_files` through the CLI). The CLI starts
    with SIGINT at its default and unblocked (`DEFAULT_SIGINT`): in full-suite runs the pytest
    worker could hand its children a SIGINT they ignored (every signal had no effect, even
    re-sent every 2 s; alone the test passes), which would test the worker's state, not the
    CLI's. The signal is still re-sent every 2 s (a user's second Ctrl-C); 10 s from the first
    bounds the exit, and a CLI that ignored SIGINT would run to completion and fail."""
    cmd = [sys.executable, "-c", DEFAULT_SIGINT, "-m", "experiments", "node_symmetry",
           "--config", "configs/node_symmetry/smoke.toml", 'checks=["thm21", "lie_bracket"]',
           "workers=1", "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, GAUGEJAX_JAX_CACHE="")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("node_symmetry/*/status.json")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # inside thm21 (about 10 s at smoke size)
    proc.send_signal(signum)
    sent = time.monotonic()
    while proc.poll() is None and time.monotonic() - sent < 60:
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10 and proc.returncode == 130, err[-2000:]
    (run_dir,) = tmp_path.glob("node_symmetry/*")
    assert io.read_json(run_dir / "status.json")["status"] == "interrupted"
    assert f"--resume {run_dir}" in err and not (run_dir / "summary.json").exists()
    assert not (run_dir / "checks" / "lie_bracket.json").exists()  # cancelled, never started


def test_interrupted_reproduce_stops_its_child_processes(tmp_path):
    """`reproduce` with two workers runs its experiments in child processes: SIGTERM to the
    CLI while both children run stops them too (the parent passes one stop request on; a
    Ctrl-C's SIGINT, which reaches every process of the terminal's group, is left to the
    parent), within 10 s: exit code 130, status "interrupted", no child left running, and
    the resume command printed. (Without the request passed on, node_symmetry ran thm21 to its
    end and wrote its summary: the test failed.)"""
    cmd = [sys.executable, "-m", "experiments", "reproduce", "--config",
           "configs/reproduce/smoke.toml", "experiments=['node_symmetry', 'linear_symmetry']",
           "checks=['node_symmetry.thm21', 'linear_symmetry.eq27']",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=dict(os.environ, GAUGEJAX_JAX_CACHE=""), stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300

    def experiment_children() -> list[int]:  # not multiprocessing's resource tracker
        listed = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in listed}
        return [int(pid) for pid, cmd in cmdlines.items() if b"spawn_main" in cmd]

    while len(pids := experiment_children()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(5.0)  # the children import JAX and start their checks (thm21: about 10 s)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 10 and proc.returncode == 130, err[-2000:]
    (run_dir,) = tmp_path.glob("reproduce/*")
    # node_symmetry stopped inside thm21, not run to its end (linear_symmetry's eq27 is short)
    assert not (run_dir / "node_symmetry" / "summary.json").exists(), err[-2000:]
    assert "leaked" not in err  # a stopped child leaves no semaphore behind
    assert io.read_json(run_dir / "status.json")["status"] == "interrupted"
    assert f"--resume {run_dir}" in err and not (run_dir / "report.md").exists()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # joined, not orphaned


def test_killed_gauge_fixing_resumes_to_the_same_files(tmp_path, capfd):
    """SIGKILL while the second lambda trains (its first checkpoint written, not its last), then
    `--resume`: the finished lambda is kept, the other continues from its checkpoint, and every
    file but timing fields equals an uninterrupted run's: checkpoints, logs (each step once),
    results and the figure byte for byte. The killed run is a process (a kill is what is
    tested); the uninterrupted run and the resume are the CLI in this process (`_cli`): the
    resume reads only what the killed process left on disk, and it runs the programs the
    uninterrupted run compiled here instead of tracing and compiling them in a third process
    (measured, the test's CPU 37.7 -> 30.3 s). With the session's compilation cache
    (conftest) the killed run reads it too."""
    args = ["gauge_fixing", "--config", "configs/gauge_fixing/smoke.toml", "num_steps=50",
            "steps_per_chunk=10", "arms=[]"]  # fmt: skip
    code, _, err = _cli([*args, "--out", str(tmp_path / "full")], capfd)
    assert code in (0, 1), err[-3000:]  # 1: a claim failed at this size
    assert "gauge_fixing: 100%" in err and "100/100" in err  # training progress
    env = dict(os.environ, GAUGEJAX_JAX_CACHE=os.environ.get("GAUGEJAX_TEST_JAX_CACHE", ""))
    cmd = [sys.executable, "-m", "experiments", *args]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "part")], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("part/gauge_fixing/*/lambda_0.1/checkpoints/LATEST")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = tmp_path.glob("part/gauge_fixing/*")
    killed_at = (run_dir / "lambda_0.1" / "checkpoints" / "LATEST").read_text()
    assert killed_at < "step_00000050.eqx" and not (run_dir / "summary.json").exists()
    assert io.read_json(run_dir / "status.json")["status"] == "running"  # as a kill leaves it
    resumed, _, err = _cli(["gauge_fixing", "--resume", str(run_dir)], capfd)
    assert resumed == code, err[-3000:]
    assert io.read_json(run_dir / "status.json")["status"] == "complete"
    (full_dir,) = tmp_path.glob("full/gauge_fixing/*")
    a, b = _files(full_dir), _files(run_dir)
    assert sorted(a) == sorted(b) and "figures/gauge_fixing.png" in a
    for name in a:
        assert _without_timings(name, a[name]) == _without_timings(name, b[name]), name
    steps = [r["step"] for r in io.read_jsonl(run_dir / "lambda_0.1" / "metrics.jsonl")]
    assert steps == list(range(50))
    # the killed part's record is kept beside the resumed part's
    (killed,) = io.read_json(run_dir / "env.json")["earlier_parts"]
    assert killed["x64"] is True and killed["date_utc"] <= io.env_info()["date_utc"]


def test_benchmark_cli_shards_over_one_cpu_device_per_core(tmp_path):
    """Through the CLI, benchmark_sweep exposes one CPU device per core by default (its sharded
    side then uses every core) on a pool of 4 (n + 1) threads; `--cpu-devices 1` keeps one, on
    a pool of 8. The sharded side computes the unsharded side's numbers (over several devices:
    the same per-sample programs; over a mesh of one device, the same program bit for bit:
    `test_benchmark_sweep_measures_the_same_program_on_every_side`, in process). The
    `--cpu-devices 1` process checks the devices and the pool the CLI configures, with the
    experiment's `run` replaced by a recorder: its sweep would repeat that test's programs."""
    cores = len(os.sched_getaffinity(0))
    # the caller's XLA_FLAGS (a device count) dropped, the suite's compile flags kept
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "XLA_FLAGS")}
    env["XLA_FLAGS"] = COMPILE_FLAGS
    cmd = [sys.executable, "-m", "experiments", "benchmark_sweep", "--config",
           "configs/benchmark_sweep/smoke.toml", 'workloads=["w1"]',
           'sides=["gaugejax", "gaugejax_sharded"]', "--out", str(tmp_path / "auto")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "auto").glob("benchmark_sweep/*")
    _, row = io.read_json(run_dir / "results.json")["rows"]
    assert row["side"] == "gaugejax_sharded" and row["status"] == "ok"
    assert row["num_devices"] == cores
    assert row["max_diff_vs_gaugejax"] <= (0.0 if cores == 1 else 1e-14)
    assert io.read_json(run_dir / "env.json")["intra_op_threads"] >= 4 * (cores + 1)
    # `--cpu-devices 1`: the CLI as `python -m experiments` runs it, recording the devices
    recorder = (
        "import sys, jax\n"
        "from experiments import benchmark_sweep\n"
        "from experiments.__main__ import main\n"
        "benchmark_sweep.run = lambda cfg, run_dir: {'claims': [], 'devices': len(jax.devices())}\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    one = tmp_path / "one"
    cmd = [sys.executable, "-c", recorder, "benchmark_sweep", "--cpu-devices", "1", "--out", one]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = one.glob("benchmark_sweep/*")
    assert io.read_json(run_dir / "summary.json")["devices"] == 1
    assert io.read_json(run_dir / "env.json")["intra_op_threads"] >= 4 * (1 + 1)


def test_benchmark_torchdiffeq_side_integrates_the_same_gauged_w1():
    """With the bench extra (skipped without torch): the torch port of W1 (same gauge elements,
    `matrix_exp` + `torch.func.jvp` for dG/dt, torchdiffeq's 3/8-rule `rk4`) gives per-sample
    deviations of the size of gaugejax's classic-RK4 ones, differing by less than the deviation
    itself (both are truncation errors of 10 steps; measured 2.6e-5 vs 3.7e-5, difference
    1.5e-5)."""
    pytest.importorskip("torchdiffeq")
    cfg = make_config(
        benchmark_sweep.Config,
        {"workloads": ["w1"], "batch_sizes": [4], "chunk_size": 2, "repeats": 1, "w1_dim": 3,
         "w1_steps": 10, "sides": ["gaugejax", "torchdiffeq", "torchdiffeq_closed_form"]},
    )  # fmt: skip
    import jax

    rows = benchmark_sweep.measure(cfg, "w1", jax.random.key(0), 4)
    ours, torch_row, closed = rows
    assert ours["status"] == torch_row["status"] == closed["status"] == "ok", closed["status"]
    # the closed form dG/dt = s'(t) A G is the jvp's value: the two torch sides agree to
    # rounding, not to truncation (the same 3/8-rule steps)
    assert abs(closed["max_deviation"] - torch_row["max_deviation"]) < 1e-13
    assert closed["dG_dt"].startswith("closed form") and closed["evaluations_mean"] > 0
    # W1's alone: W2 deforms an MLP field, no one-mode linear gauge (a row that says so)
    assert benchmark_sweep.skip_reason(cfg, "w2", "torchdiffeq_closed_form", 4).startswith(
        "skipped: the closed form"
    )
    # ours measured 3.7e-5 (without torch too); torch's within a decade of it
    assert 1e-5 < ours["max_deviation"] < 1e-4
    assert ours["max_deviation"] / 10 < torch_row["max_deviation"] < 10 * ours["max_deviation"]
    assert torch_row["max_diff_vs_gaugejax"] < ours["max_deviation"]
    assert torch_row["samples_per_s"] > 0 and torch_row["compile_s"] is None
    # the comparison can fail: torch on other gauge elements (another key) differs per sample
    # by more than the deviation itself (the bound the agreement above meets)
    w = benchmark_sweep.workload(cfg, "w1", jax.random.split(jax.random.key(0))[0])
    ks = jax.random.split(jax.random.key(0))[1]
    _, ours_per_sample = benchmark_sweep.run_side(cfg, "w1", w, "gaugejax", ks, 4)
    _, other = benchmark_sweep.run_side(cfg, "w1", w, "torchdiffeq", jax.random.fold_in(ks, 7), 4)
    assert abs(other - ours_per_sample).max() > ours["max_deviation"]


def test_benchmark_torchdiffeq_w2_is_the_same_sensitivity_system():
    """With the bench extra: torch's hand-written forward sensitivity system (two
    `torch.func.jvp`s for the deformation's first-order term) against a jvp through diffrax's
    fixed-step Tsit5 (the naive side), on the `boundary="free"` control, whose response is
    O(0.1) (no symmetry: a sign, scale or index error in the port would show). 20 steps of the
    3/8-rule RK4 against Tsit5: truncation differences measured 1e-7 relative; 1e-5 bounds
    them. For the symmetry itself both responses are truncation-sized (measured 1e-8 and 1e-10)."""
    pytest.importorskip("torchdiffeq")
    import jax

    cfg = make_config(
        benchmark_sweep.Config, {**presets("benchmark_sweep")["smoke"], "w2_steps": 20}
    )
    w = benchmark_sweep.workload(cfg, "w2", jax.random.key(1))
    control = benchmark_sweep.Workload(w.model, w.gauge.control(), w.inputs, {})
    ks = jax.random.key(2)
    _, naive = benchmark_sweep.run_side(cfg, "w2", control, "naive_diffrax", ks, 4)
    row, ported = benchmark_sweep.run_side(cfg, "w2", control, "torchdiffeq", ks, 4)
    assert naive.min() > 0.1 and row["method"] == "rk4" and row["batch_evaluations"] == 80
    np.testing.assert_allclose(ported, naive, rtol=1e-5)
    _, symmetric = benchmark_sweep.run_side(cfg, "w2", w, "torchdiffeq", ks, 4)
    assert symmetric.max() < 1e-6
    adaptive, _ = benchmark_sweep.run_side(cfg, "w3", w, "torchdiffeq", ks, 4)
    # dopri5 at the smoke rtol 1e-4, one step size for the whole batch: measured 2.5e-3
    assert adaptive["method"] == "dopri5" and adaptive["batch_evaluations"] > 6
    assert adaptive["max_deviation"] < 1e-2


def test_benchmark_gradsolve_side_integrates_the_same_fields():
    """With the bench extra: gradsolve's fixed-step engines on the same transformed fields (its
    problem protocol, the sample's inputs stacked into one state). W1 is classic RK4 on both
    sides, so per-sample deviations agree to rounding (1e-13 bound against deviations of 1e-5,
    the truncation error of 10 steps); W2's jvp through its fixed-step Tsit5 scan gives the
    same response; W3 says why it cannot run. The agreement can fail: other gauge elements
    differ per sample by more than the deviation itself."""
    pytest.importorskip("gradsolve")
    import jax

    cfg = make_config(
        benchmark_sweep.Config,
        {"batch_sizes": [4], "chunk_size": 2, "repeats": 1, "w1_dim": 3, "w1_steps": 10,
         "w2_dim": 2, "w2_width": 4, "w2_steps": 10, "sides": ["gaugejax", "gradsolve"]},
    )  # fmt: skip
    deviation = {}
    for name in ("w1", "w2"):
        ours, theirs = benchmark_sweep.measure(cfg, name, jax.random.key(0), 4)
        assert ours["status"] == theirs["status"] == "ok", theirs["status"]
        assert theirs["max_diff_vs_gaugejax"] < 1e-13 and theirs["samples_per_s"] > 0
        assert "fixed_step" in theirs["engine"]
        deviation[name] = ours["max_deviation"]
    assert 1e-5 < deviation["w1"] < 1e-4  # measured 3.7e-5 (the truncation error of 10 steps)
    w3 = benchmark_sweep.measure(cfg, "w3", jax.random.key(0), 4)[1]
    assert w3["status"].startswith("skipped: gradsolve has no error-controlled")
    w = benchmark_sweep.workload(cfg, "w1", jax.random.split(jax.random.key(0))[0])
    ks = jax.random.split(jax.random.key(0))[1]
    _, ours_per_sample = benchmark_sweep.run_side(cfg, "w1", w, "gaugejax", ks, 4)
    _, other = benchmark_sweep.run_side(cfg, "w1", w, "gradsolve", jax.random.fold_in(ks, 7), 4)
    assert abs(other - ours_per_sample).max() > ours_per_sample.max() / 10


def test_symmetry_census_smoke_writes_the_table_and_its_claims(tmp_path):
    """The census at its smoke preset (the cheap checks): the linear net's count (Eq. 33,
    (L-1)(d^2 + d) = 40) explained by the family once its fixed ends are excluded, ReLU MLP
    depth 1 without excess, the ConvNets' rescaling; the table and both figures are written."""
    cfg = make_config(
        symmetry_census.Config,
        {**presets("symmetry_census")["smoke"], "checks": ["linear_net", "relu_mlp", "cnn"]},
    )
    summary = symmetry_census.run(cfg, tmp_path)
    claims = {c["id"]: c for c in summary["claims"]}
    assert all(c["verdict"] == "pass" for c in claims.values()), claims
    assert claims["census_linear:linear net, 3 layers (Eq. 33)"]["measured"] == 40
    assert claims["census_relu_depth1"]["measured"] == 0
    table = (tmp_path / "census.md").read_text()
    assert "| linear net, 3 layers (Eq. 33) | 40 | 40 |" in table
    assert "ReLU MLP depth 2 width 4, 50 inputs" in table
    # ConvNets: the 7 rescaling directions inside the null space (angles ~1e-14), an excess
    # beyond them (measured 2 and 9), and L_2 pooling's non-finite Jacobian refused, not counted
    assert claims["census_cnn"]["measured"] < 1e-6
    assert "| CNN 3-4 channels, average (L_1) pooling | 7 | 9 |" in table
    assert "| CNN 3-4 channels, L_2 pooling | - | inconclusive |" in table
    assert {Path(f).name for f in summary["figures"]} == {"spectra.png", "relu_excess.png"}
    with pytest.raises(ValueError, match="head_dim"):
        make_config(symmetry_census.Config, {"head_dim": 3})


def test_symmetry_census_scale_check_at_tiny_sizes(tmp_path):
    """The `scale` check's plumbing at tiny sizes (the GPT-2-small run is a measurement, see
    the README): float32 sweeps of the four block families hold within their float32 floor
    (~3e-5) with controls above 1e3 x floor, and the matrix-free census of the smallest
    attention finds its 2 (2 k^2) = 16 dimensions (k = 2); the census table gets both tables."""
    cfg = make_config(
        symmetry_census.Config,
        {**presets("symmetry_census")["scale"], "scale_dim": 12, "scale_heads": 3,
         "scale_tokens": 4, "scale_samples": 2, "scale_dtypes": ["float32"],
         "scale_census_dims": [8]},
    )  # fmt: skip
    summary = symmetry_census.run(cfg, tmp_path)
    claims = {c["id"]: c for c in summary["claims"]}
    assert set(claims) == {f"scale:{f}:float32" for f in ("gpt2_attention", "gpt2_heads",
                           "llama_attention", "decoder_block")} | {"scale:census"}  # fmt: skip
    assert all(c["verdict"] == "pass" for c in claims.values()), claims
    assert claims["scale:census"]["measured"] == 16
    table = (tmp_path / "census.md").read_text()
    assert "| GPT-2 attention: head permutations | float32 | holds |" in table
    assert "| 8 | 128 | 16 | 16 |" in table


def test_an_aim_missed_is_reported_with_its_number_not_failed(tmp_path):
    """A target beyond the paper (`aim=True`) that is not met is "missed": the report says so
    with its measured value and lists it; a paper claim that does not hold is "FAIL"."""
    from gaugejax import claim

    missed = claim("nfe_cut", "2x fewer evaluations", "RNODE", 1.6, False, ">= 2", aim=True)
    failed = claim("eq99", "a claim", "Eq. 99", 0.5, False, "< 0.1")
    assert missed["verdict"] == "missed" and failed["verdict"] == "FAIL"
    assert claim("ok", "t", "e", 3.0, True, ">= 2", aim=True)["verdict"] == "pass"
    env = {"date_utc": "now", "backend": "cpu", "devices": ["cpu"], "x64": True,
           "versions": {"jax": "x"}}  # fmt: skip
    cfg = make_config(reproduce.Config, {"experiments": ["regularizers"]})
    summary = {"claims": [missed, claim("learns", "t", "e", 0.97, True, ">= 0.9")], "figures": []}
    path = reproduce.write_report(tmp_path / "report.md", {"regularizers": summary}, env, cfg,
                                  {"regularizers": 1.0})  # fmt: skip
    text = path.read_text()
    assert "**1 of 2 claims pass**; 1 aims beyond the paper missed" in text and "`nfe_cut`" in text
    assert "| 2x fewer evaluations | RNODE | 1.6 | >= 2 | missed |" in text
