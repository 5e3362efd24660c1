"""Claims, the check runner and the figures of sweep results: rows with their numbers and
verdicts, a selection that reproduces a full run's numbers, resuming, and bad input refused."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from gaugejax import io


def test_claim_rows_and_verdicts():
    row = gj.claim_below("eq16", "the gap is small", "Eq. 16", 3e-12, 1e-10, "median 1e-13")
    assert row == {
        "id": "eq16",
        "claim": "the gap is small",
        "equation": "Eq. 16",
        "measured": 3e-12,
        "tolerance": "< 1e-10",
        "verdict": "pass",
        "detail": "median 1e-13",
    }
    assert gj.claim_below("a", "", "", 2e-10, 1e-10)["verdict"] == "FAIL"
    assert gj.claim_below("a", "", "", float("nan"), 1e-10)["verdict"] == "FAIL"  # NaN never passes
    assert gj.claim_below("a", "", "", 1e-12, 1e-10, ok=False)["verdict"] == "FAIL"
    control = gj.claim_above("ctrl", "breaking moves it", "", 0.31, 1e-2)
    assert (control["verdict"], control["tolerance"]) == ("pass", "> 0.01")
    # an aim not met is "missed", reported with its number, not a failure
    aim = gj.claim("fewer", "2x fewer evaluations", "", 1.4, 1.4 >= 2.0, ">= 2", aim=True)
    assert (aim["verdict"], aim["measured"]) == ("missed", 1.4)
    assert {r["verdict"] for r in (row, control, aim)} <= set(gj.CLAIM_VERDICTS)


def test_claim_slope_reads_a_convergence_order():
    hs = np.array([0.04, 0.02, 0.01])
    slope = gj.loglog_slope(hs, 3.0 * hs**2)  # an exact O(h^2) error
    row = gj.claim_slope("order", "second order", "Eq. 27", slope, 2, 0.15)
    assert row["measured"] == pytest.approx(2.0, abs=1e-12)
    assert (row["verdict"], row["tolerance"]) == ("pass", "slope 2 +- 0.15")
    assert gj.claim_slope("order", "", "", 1.8, 2, 0.15)["verdict"] == "FAIL"
    assert gj.in_band(2.1, 2.0, 0.15) and not gj.in_band(float("nan"), 2.0, 0.15)


def test_claims_refuse_bad_input():
    with pytest.raises(ValueError, match=r"`band` must be a finite number >= 0; received -0.1"):
        gj.claim_slope("order", "", "", 2.0, 2, -0.1)
    with pytest.raises(ValueError, match=r"`id_` must be a non-empty string; received ''"):
        gj.claim("", "", "", 1.0, True, "")
    with pytest.raises(ValueError, match=r"`rows\[1\]` has 1 cells; the header has 2"):
        gj.markdown_table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['nope'\].*valid checks are"):
        gj.validate_checks(["nope"], [("a", print)])
    with pytest.raises(ValueError, match="names a check twice"):
        gj.validate_checks(["a", "a"], [("a", print)])


def test_markdown_table():
    lines = gj.markdown_table(["check", "measured"], [["eq16", 3e-12], ["eq20", 2.0]])
    assert lines == [
        "| check | measured |",
        "|---|---|",
        "| eq16 | 3e-12 |",
        "| eq20 | 2.0 |",
    ]


def test_claims_table_formats_the_measured_values():
    rows = [
        gj.claim_below("eq16", "gap | small", "Eq. 16", 3.14159e-12, 1e-10),
        gj.claim_slope("order", "second order", "Eq. 27", 1.98765, 2, 0.15),
        gj.claim("count", "dimension", "", 7, True, "== 7"),
    ]
    assert gj.claims_table(rows) == [
        "| claim | equation | measured | tolerance | verdict | detail |",
        "|---|---|---|---|---|---|",
        "| gap \\| small | Eq. 16 | 3.14e-12 | < 1e-10 | pass |  |",
        "| second order | Eq. 27 | 1.99 | slope 2 +- 0.15 | pass |  |",
        "| dimension |  | 7 | == 7 | pass |  |",
    ]
    assert [gj.format_measured(v) for v in (1e-3, 9999.0, 1e4, 0.0, "nan")] == [
        "0.001",
        "1e+04",
        "1.00e+04",
        "0.00e+00",
        "nan",
    ]
    assert gj.format_claim(rows[0]) == (
        "[  pass] eq16                         measured 3.14e-12  (< 1e-10)"
    )
    assert gj.format_claim({**rows[1], "measured": "nan", "verdict": "FAIL"}).startswith(
        "[  FAIL] order                        measured nan  (slope 2 +- 0.15)"
    )
    with pytest.raises(ValueError, match=r"`row` is not a claim row: it lacks \['tolerance'\]"):
        gj.format_claim({"verdict": "pass", "id": "a", "measured": 1.0})
    with pytest.raises(ValueError, match=r"`claims\[0\]` is not a claim row: it lacks \['verdict'"):
        gj.claims_table([{"claim": "", "equation": "", "measured": 1.0, "tolerance": ""}])


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float = 1.0


def _checks(calls):
    def mean(key):
        calls.append("mean")
        x = jax.random.normal(key, (4000,), dtype=jnp.float64)
        value = float(abs(jnp.mean(x)))
        return [gj.claim_below("mean", "sample mean near 0", "", value, 0.05)], {"mean": value}

    def norm(key):
        calls.append("norm")
        value = float(jnp.linalg.norm(jnp.ones(4, dtype=jnp.float64)))
        return [gj.claim_below("norm", "|1| in R^4", "", abs(value - 2.0), 1e-15)], value

    return [("mean", mean), ("norm", norm)]


def test_run_checks_keys_selection_and_resume(tmp_path):
    key = jax.random.key(0)
    calls = []
    claims, results, records = gj.run_checks(
        _checks(calls), tmp_path / "full", key=key, config=_Config(), workers=2
    )
    assert [c["id"] for c in claims] == ["mean", "norm"]  # `checks` order, whatever finished first
    assert [c["verdict"] for c in claims] == ["pass", "pass"]
    # 4000 standard normals, |mean| ~ 1/sqrt(4000) = 0.016; this key's: 1.13e-3 (measured)
    assert results["mean"]["mean"] == pytest.approx(1.1326557e-3, rel=1e-6)
    assert results["norm"] == 2.0
    assert [r["check"] for r in records] == ["mean", "norm"]
    assert records[1]["norm"] == 0.0 and records[0]["seconds"] >= 0
    # a selection runs each check with the key it has in a full run: the same numbers
    alone, alone_results, _ = gj.run_checks(
        _checks([]), tmp_path / "alone", key=key, config=_Config(), selected=["mean"]
    )
    assert alone == claims[:1] and alone_results == {"mean": results["mean"]}
    # resumed in the same directory: finished checks are read, not run again
    again, _, _ = gj.run_checks(_checks(calls), tmp_path / "full", key=key, config=_Config())
    assert again == claims and sorted(calls) == ["mean", "norm"]
    assert io.read_json(tmp_path / "full" / "checks" / "config.json") == {"scale": 1.0}
    # a saved check edited by hand (a failed claim turned into a pass) is refused on resume
    saved = tmp_path / "full" / "checks" / "norm.json"
    saved.write_text(saved.read_text().replace('"pass"', '"FAIL"'))
    with pytest.raises(ValueError, match=r"norm.json"):
        gj.run_checks(_checks(calls), tmp_path / "full", key=key, config=_Config())


def test_run_checks_refuses_bad_input(tmp_path):
    key = jax.random.key(0)
    gj.run_checks(_checks([]), tmp_path, key=key, config=_Config(), selected=["norm"])
    with pytest.raises(ValueError, match=r"holds a run of another checks config"):
        gj.run_checks(_checks([]), tmp_path, key=key, config=_Config(scale=2.0))
    with pytest.raises(ValueError, match=r"`workers` must be an int >= 1; received 0"):
        gj.run_checks(_checks([]), tmp_path / "b", key=key, config=_Config(), workers=0)
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['nope'\]"):
        gj.run_checks(_checks([]), tmp_path / "c", key=key, config=_Config(), selected=["nope"])


def test_figures_are_written_and_refuse_empty_input(tmp_path):
    devs = [("symmetric", np.array([1e-15, 3e-14, 0.0])), ("control", np.array([1e-3, 2e-2]))]
    lock_held = []

    def draw():
        with gj.PLOT_LOCK:  # re-entrant: a figure drawn while the lock is held does not block
            lock_held.append(
                gj.histogram_figure(tmp_path / "h.png", devs, xlabel="log10 dev", title="t")
            )

    thread = threading.Thread(target=draw)
    thread.start()
    thread.join(timeout=60)
    assert lock_held and lock_held[0].read_bytes()[:4] == b"\x89PNG"
    multi = gj.small_multiples_figure(
        tmp_path / "m.png", [("a", devs[:1]), ("b", devs[1:])], xlabel="log10", title="t"
    )
    hs = [0.04, 0.02, 0.01]
    loglog = gj.loglog_figure(
        tmp_path / "l.png", [("order", "h", "error", [("h^2", hs, [h**2 for h in hs])])], ticks=True
    )
    assert multi.stat().st_size > 1000 and loglog.stat().st_size > 1000
    plt = gj.pyplot()
    fig, _ = plt.subplots()
    kept = io.save_figure(fig, tmp_path / "kept.png")  # open until closed
    assert fig.number in plt.get_fignums()
    io.save_figure(fig, tmp_path / "closed.png", close=True)
    assert fig.number not in plt.get_fignums() and kept.read_bytes()[:4] == b"\x89PNG"
    assert plt.get_fignums() == []  # the figure helpers leave no figure open
    with pytest.raises(ValueError, match=r"`series` must hold at least one"):
        gj.histogram_figure(tmp_path / "e.png", [], xlabel="", title="")
    with pytest.raises(ValueError, match=r"the series 'control' has no values"):
        gj.histogram_figure(tmp_path / "e.png", [("control", [])], xlabel="", title="")
    with pytest.raises(ValueError, match=r"'h\^2' of panel 'order' has 3 xs and 2 ys"):
        gj.loglog_figure(tmp_path / "e.png", [("order", "h", "e", [("h^2", hs, [1.0, 2.0])])])
    with pytest.raises(ValueError, match=r"`panels` must hold at least one"):
        gj.small_multiples_figure(tmp_path / "e.png", [], xlabel="", title="")
    assert not (tmp_path / "e.png").exists()


def test_pareto_front_keeps_the_points_nothing_beats():
    # (cost, score): 1 beats 2 (cheaper, better); 3 and 0 are on the front; 4 ties 3's cost
    # with a lower score; 5 ties 0 exactly (the first is kept)
    costs = [30.0, 10.0, 12.0, 20.0, 20.0, 30.0]
    scores = [0.99, 0.95, 0.90, 0.97, 0.96, 0.99]
    np.testing.assert_array_equal(gj.pareto_front(costs, scores), [1, 3, 0])
    # a cheaper and better point removes every other one
    np.testing.assert_array_equal(gj.pareto_front([5.0, *costs], [1.0, *scores]), [0])
    with pytest.raises(ValueError, match=r"one length; received shapes \(2,\) and \(3,\)"):
        gj.pareto_front([1.0, 2.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        gj.pareto_front([1.0, np.nan], [0.1, 0.2])


def test_planar_flow_figure_draws_each_panel_and_names_a_wrong_one(tmp_path):
    x0 = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]])
    states = np.cumsum(np.ones((5, 3, 4)) * 0.1, axis=0)  # augmented: 4 coordinates
    panels = [(f"arm {i}", states * (i + 1)) for i in range(4)]  # two rows of panels
    path = gj.planar_flow_figure(tmp_path / "flow.png", x0, panels, [0, 1, 1], title="t")
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"panel 'bad'.*states of shape \(5, 2, 4\)"):
        gj.planar_flow_figure(tmp_path / "b.png", x0, [("bad", states[:, :2])], [0, 1], title="")
    with pytest.raises(ValueError, match="at least one"):
        gj.planar_flow_figure(tmp_path / "c.png", x0, [], [0, 1, 1], title="")
