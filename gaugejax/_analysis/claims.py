"""Claims a user can check and report: a row per claim with its measured number, its bound and a
verdict; Markdown tables of them; a resumable runner of named checks.

A claim row is a plain JSON-ready dict, so a report, a results file and a test read the same
record: `id`, `claim` (what is claimed, in words), `equation` (where it is stated), `measured`,
`tolerance` (the bound, in words), `verdict` and `detail`. The verdict is "pass", "FAIL" (a
claim that does not hold) or "missed" (an aim beyond the claim, e.g. "2x fewer evaluations",
not met: reported with its number like any row, not a failure).
"""

import concurrent.futures
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jaxtyping import PRNGKeyArray
from tqdm.auto import tqdm

from .._infra import io


CLAIM_VERDICTS = ("pass", "FAIL", "missed")
# measured values come as Python or NumPy numbers (0-d arrays included)
Number = int | float | np.number | np.ndarray


def claim(
    id_: str,
    text: str,
    equation: str,
    measured: Any,
    ok: bool,
    tolerance: str,
    detail: str = "",
    *,
    aim: bool = False,
) -> dict:
    """One claim row: what is claimed, what was measured, and the verdict.

    **Arguments:**

    - `id_`: the row's name (unique within a report).
    - `text`, `equation`: the claim in words, and where it is stated (e.g. "Eq. 16").
    - `measured`: the number (or value) the verdict is read from.
    - `ok`: whether the claim holds.
    - `tolerance`: the bound, in words (e.g. "< 1e-08").
    - `detail`: further numbers, in words.
    - `aim`: a target beyond the claim: not met, its verdict is "missed", not "FAIL".

    **Returns:** the dict `{"id", "claim", "equation", "measured", "tolerance", "verdict",
    "detail"}`, the verdict one of `CLAIM_VERDICTS`.

    **Raises:** `ValueError` when `id_` is empty.
    """
    if not isinstance(id_, str) or not id_:
        raise ValueError(f"`id_` must be a non-empty string; received {id_!r}.")
    return {
        "id": id_,
        "claim": text,
        "equation": equation,
        "measured": measured,
        "tolerance": tolerance,
        "verdict": "pass" if ok else ("missed" if aim else "FAIL"),
        "detail": detail,
    }


def in_band(value: Number, target: Number, band: Number) -> bool:
    """Whether `|value - target| <= band` (False for NaN).

    **Raises:** `ValueError` when `band` is negative or not finite.
    """
    if not (math.isfinite(band) and band >= 0):
        raise ValueError(f"`band` must be a finite number >= 0; received {band!r}.")
    return bool(abs(value - target) <= band)


def claim_below(
    id_, text, equation, measured, bound, detail="", *, ok=True, tolerance=None
) -> dict:
    """A claim row that `measured < bound` (and `ok`, any further condition of the claim);
    `tolerance` describes the bound, `< bound` unless given. NaN never passes. Arguments and
    errors as `claim`."""
    ok = ok and measured < bound
    return claim(id_, text, equation, measured, ok, tolerance or f"< {bound:g}", detail)


def claim_above(
    id_, text, equation, measured, bound, detail="", *, ok=True, tolerance=None
) -> dict:
    """A claim row that `measured > bound` (a negative control moves the output), and `ok`;
    `tolerance` describes the bound, `> bound` unless given. NaN never passes."""
    ok = ok and measured > bound
    return claim(id_, text, equation, measured, ok, tolerance or f"> {bound:g}", detail)


def claim_slope(id_, text, equation, slope, target, band, detail="", *, ok=True) -> dict:
    """A claim row on a convergence order: `slope` (e.g. from `loglog_slope`) within `band` of
    `target` (`in_band`), and `ok`.

    **Raises:** `ValueError` when `band` is negative or not finite, or `id_` is empty.
    """
    ok = in_band(slope, target, band) and ok
    return claim(id_, text, equation, slope, ok, f"slope {target:g} +- {band}", detail)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A Markdown table's lines: the header, its rule, a line per row (cells as `str`).

    **Raises:** `ValueError` naming the row whose number of cells is not the header's.
    """
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"`rows[{i}]` has {len(row)} cells; the header has {len(header)}: {list(row)!r}."
            )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def format_measured(value: Any) -> str:
    """A measured value as a report shows it: floats to 3 significant digits in [1e-3, 1e4),
    else in scientific notation with 3 digits (deviations of 1e-15 and counts of 1e5 alike);
    anything else as `str`."""
    if isinstance(value, float):
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def format_claim(row: dict) -> str:
    """One claim row as a console line: `[verdict] id measured value (tolerance)`, the value to
    3 significant digits (or as JSON keeps a non-finite one, e.g. "nan").

    **Raises:** `ValueError` when `row` lacks `verdict`, `id`, `measured` or `tolerance`.
    """
    missing = [k for k in ("verdict", "id", "measured", "tolerance") if k not in row]
    if missing:
        raise ValueError(f"`row` is not a claim row: it lacks {missing}.")
    measured = row["measured"]
    shown = f"{measured:.3g}" if isinstance(measured, int | float) else str(measured)
    return f"[{row['verdict']:>6}] {row['id']:<28} measured {shown}  ({row['tolerance']})"


CLAIM_COLUMNS = ("claim", "equation", "measured", "tolerance", "verdict", "detail")


def claims_table(claims: Sequence[dict]) -> list[str]:
    """The Markdown table of claim rows: a line per row with its claim, equation, measured
    value (`format_measured`), tolerance, verdict and detail (a `|` in a cell escaped).

    **Raises:** `ValueError` naming the first row that lacks a column of `CLAIM_COLUMNS`.
    """
    for i, row in enumerate(claims):
        missing = [c for c in CLAIM_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"`claims[{i}]` is not a claim row: it lacks {missing}.")
    rows = [
        [format_measured(r[c]) if c == "measured" else str(r[c]) for c in CLAIM_COLUMNS]
        for r in claims
    ]
    return markdown_table(CLAIM_COLUMNS, [[c.replace("|", "\\|") for c in r] for r in rows])


def validate_checks(selected: Sequence[str], checks: Sequence[tuple[str, Callable]]) -> None:
    """Refuse a selection of checks that names an unknown check or one check twice.

    **Raises:** `ValueError` naming the unknown entries and the valid names, or the selection.
    """
    valid = [name for name, _ in checks]
    unknown = [name for name in selected if name not in valid]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown} in `checks`; valid checks are {valid}.")
    if len(set(selected)) != len(selected):
        raise ValueError(f"`checks` names a check twice; received {list(selected)}.")


# a check: its key -> (claim rows, JSON-ready data)
Check = Callable[[PRNGKeyArray], tuple[list[dict], Any]]


def run_checks(
    checks: Sequence[tuple[str, Check]],
    run_dir: str | os.PathLike,
    *,
    key: PRNGKeyArray,
    config: Any,
    selected: Sequence[str] = (),
    workers: int = 1,
    expensive_first: Sequence[str] = (),
    name: str = "checks",
    progress_line: int = 0,
) -> tuple[list[dict], dict, list[dict]]:
    """Run named checks `check(key) -> (rows, data)` on threads, resumably, in `run_dir`.

    Each check has its own key, `jax.random.split(key, len(checks))[i]` by its place in
    `checks`, whichever run: a selection reproduces the numbers of a full run, and the results
    do not depend on the schedule. Checks are independent and, in JAX, mostly XLA compilation
    (single-threaded), so `workers` threads run them side by side, `expensive_first` first.

    Each finished check is saved at once to `run_dir/checks/<name>.json` (rows, data,
    seconds; atomically, with a sha256 over its bytes: a hand-edited or damaged file is
    refused, not read as a result); a check whose file exists is loaded instead of run, so a
    killed run continued in the same directory runs only what was left. The directory belongs to one
    `config` (saved beside the checks): another config is refused, as it would mix numbers.

    **Arguments:**

    - `checks`: `(name, check)` pairs, in report order.
    - `run_dir`: the directory of the saved checks.
    - `key`: a JAX PRNG key.
    - `config`: what the checks were run with (JSON-ready, e.g. `dataclasses.asdict(...)`).
    - `selected`: the names to run (all when empty).
    - `workers`: threads (>= 1).
    - `expensive_first`: names started first (the rest after, in order).
    - `name`: the progress bar's label and the error messages' name of the run.
    - `progress_line`: the progress bar's line (runs side by side use their own).

    **Returns:** `(claims, results, records)`: the rows of the checks run, in `checks` order;
    name -> data; a record per check (`check`, `seconds`, and each row's `id: measured`).

    **Raises:** `ValueError` for an unknown or repeated name in `selected`, `workers < 1`, or a
    `run_dir` holding checks of another `config`; whatever a check raises (the checks not
    started yet are dropped).
    """
    validate_checks(selected, checks)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an int >= 1; received {workers!r}.")
    keys = jax.random.split(key, len(checks))
    order = list(expensive_first)

    def priority(item):
        return order.index(item[0][0]) if item[0][0] in order else len(order)

    cache = Path(run_dir) / "checks"
    io.lock_config(cache / "config.json", config, name)  # saved checks belong to one config

    def one(item):
        (check_name, check), check_key = item
        saved = cache / f"{check_name}.json"
        if saved.exists():  # finished by an earlier, interrupted run in this directory
            # checksummed: a hand-edited or damaged file is refused, never read as a result
            done = io.read_json_checked(saved)
            return done["rows"], done["data"], done["seconds"]
        t0 = time.perf_counter()
        rows, data = check(check_key)
        elapsed = time.perf_counter() - t0
        io.write_json_checked(saved, {"rows": rows, "data": data, "seconds": elapsed})
        return rows, data, elapsed

    items = list(zip(checks, keys, strict=True))
    if selected:
        items = [item for item in items if item[0][0] in selected]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    done = {}
    try:
        futures = {pool.submit(one, item): item[0][0] for item in sorted(items, key=priority)}
        # the bar advances as checks finish (completion order: its ETA is from finished work)
        bar = tqdm(total=len(items), desc=name, position=progress_line, leave=True)
        for future in concurrent.futures.as_completed(futures):
            done[futures[future]] = future.result()
            bar.set_postfix_str(futures[future], refresh=False)
            bar.update(1)
        bar.close()
    except BaseException:  # Ctrl-C or a failed check: drop the checks not started yet
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    claims, results, records = [], {}, []
    for (check_name, _), _ in items:  # rows reported in `checks` order
        rows, data, elapsed = done[check_name]
        claims += rows
        results[check_name] = data
        records.append(
            {"check": check_name, "seconds": elapsed, **{r["id"]: r["measured"] for r in rows}}
        )
    return claims, results, records
