"""Figures of sweep results, written as PNG files: histograms of log deviations (one quantity per
panel, or several series on one), and log-log panels of convergence studies.

Deviations span many decades and include exact zeros, so every value is floored at 1e-17 before
its logarithm is taken (below float64's resolution of any deviation relative to O(1) outputs).
pyplot's figure registry is global: every function here draws holding `PLOT_LOCK` (re-entrant),
so threads that draw side by side (checks run on threads) do not mix their figures.
"""

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float

from .._infra import io


PLOT_LOCK = threading.RLock()
# deviations are floored here before log10 (exact zeros have no logarithm)
_FLOOR = 1e-17
# (label, values): the values a list, a NumPy or a JAX array (read with np.asarray)
Series = tuple[str, Any]


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (figures are files). Draw holding
    `PLOT_LOCK` where threads may draw at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _logs(series: Sequence[Series], what: str) -> list[np.ndarray]:
    if not series:
        raise ValueError(f"`{what}` must hold at least one (label, values) series; received [].")
    for label, values in series:
        if np.size(values) == 0:
            raise ValueError(f"`{what}`: the series {label!r} has no values.")
    return [np.log10(np.maximum(np.asarray(v, dtype=float), _FLOOR)) for _, v in series]


def _range(logs: list[np.ndarray]) -> tuple[float, float]:
    """The values' range in log10, half a decade wider on each side."""
    lo = min(float(np.nanmin(v)) for v in logs) - 0.5
    return lo, max(float(np.nanmax(v)) for v in logs) + 0.5


def log_histogram(
    ax,
    series: Sequence[Series],
    *,
    xlabel: str,
    title: str,
    tolerance: float | None = None,
    bins: Float[np.ndarray, " edges"] | Sequence[float] | None = None,
) -> None:
    """Histograms of log10 of several per-sample deviation series, on common bins, drawn on the
    matplotlib axis `ax`.

    **Arguments:**

    - `series`: `(label, values)` pairs (e.g. a `SweepResult`'s deviations).
    - `xlabel`, `title`: the axis's labels.
    - `tolerance`: drawn as a dotted line where given.
    - `bins`: bin edges in log10 (default: 60 over the values' range, half a decade beyond).

    **Raises:** `ValueError` when `series` is empty or a series has no values.
    """
    logs = _logs(series, "series")
    if bins is None:
        bins = np.linspace(*_range(logs), 60)
    for (label, _), v in zip(series, logs, strict=True):
        ax.hist(v, bins=bins, alpha=0.6, label=label)
    if tolerance is not None:
        ax.axvline(np.log10(tolerance), color="k", ls=":", label=f"tolerance {tolerance:g}")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, never 2.5 samples
    ax.set_title(title)
    ax.legend(fontsize=7)


def histogram_figure(
    path: str | os.PathLike,
    series: Sequence[Series],
    *,
    xlabel: str,
    title: str,
    tolerance: float | None = None,
) -> Path:
    """One `log_histogram` figure (8 x 4 in), written to `path` as PNG; returns the path.

    **Raises:** `ValueError` when `series` is empty or a series has no values.
    """
    _logs(series, "series")  # refused before any figure is made
    with PLOT_LOCK:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4))
        log_histogram(ax, series, xlabel=xlabel, title=title, tolerance=tolerance)
        path = io.save_figure(fig, path, close=True)
    return path


def small_multiples(axes, panels: Sequence[tuple[str, Sequence[Series]]], *, xlabel: str) -> None:
    """One `log_histogram` per axis of `axes`, `panels` = `[(title, series), ...]`, on a shared
    x range and 50 common bins (one quantity per axis, instead of many overlaid on one).

    **Raises:** `ValueError` when `panels` is empty, a panel has no series or a series no
    values, or `axes` and `panels` differ in number.
    """
    if not panels or len(axes) != len(panels):
        raise ValueError(
            f"`panels` must hold one (title, series) panel per axis ({len(axes)}); "
            f"received {len(panels)}."
        )
    logs = [v for title, series in panels for v in _logs(series, f"panel {title!r}")]
    bins = np.linspace(*_range(logs), 50)
    for ax, (title, series) in zip(axes, panels, strict=True):
        log_histogram(ax, series, xlabel=xlabel, title=title, bins=bins)


def small_multiples_figure(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[Series]]],
    *,
    xlabel: str,
    title: str,
) -> Path:
    """`small_multiples` in one row of panels sharing their x axis, written to `path` as PNG;
    returns the path.

    **Raises:** `ValueError` when `panels` is empty, a panel has no series or a series no
    values.
    """
    if not panels:
        raise ValueError("`panels` must hold at least one (title, series) panel; received [].")
    with PLOT_LOCK:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharex=True)
        try:
            small_multiples(np.atleast_1d(axes), panels, xlabel=xlabel)
        except ValueError:
            plt.close(fig)
            raise
        fig.suptitle(title)
        fig.tight_layout()
        path = io.save_figure(fig, path, close=True)
    return path


def loglog_figure(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, str, str, Sequence[tuple[str, Any, Any]]]],
    *,
    title: str | None = None,
    ticks: bool = False,
) -> Path:
    """A row of log-log panels of convergence studies, written to `path` as PNG; returns it.

    **Arguments:**

    - `panels`: `[(title, xlabel, ylabel, [(label, xs, ys), ...]), ...]`; a panel's series are
      drawn "o-", "s--", "^:" (ys floored at 1e-17: an exact zero has no logarithm).
    - `title`: the figure's title.
    - `ticks`: the x values run are the ticks (for a few sizes that are not powers of ten).

    **Raises:** `ValueError` when `panels` is empty, a panel has no series, or a series' xs and
    ys differ in length.
    """
    if not panels:
        raise ValueError("`panels` must hold at least one panel; received [].")
    for name, _, _, series in panels:
        if not series:
            raise ValueError(f"the panel {name!r} has no (label, xs, ys) series.")
        for label, xs, ys in series:
            if len(xs) != len(ys):
                raise ValueError(
                    f"the series {label!r} of panel {name!r} has {len(xs)} xs and {len(ys)} ys."
                )
    with PLOT_LOCK:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), squeeze=False)
        for ax, (name, xlabel, ylabel, series) in zip(axes[0], panels, strict=True):
            for (label, xs, ys), style in zip(series, ("o-", "s--", "^:"), strict=False):
                ax.loglog(xs, np.maximum(np.asarray(ys, dtype=float), _FLOOR), style, label=label)
            ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            plain_log_ticks(ax)
            if ticks:
                ax.set_xticks(xs, [f"{x:g}" for x in xs])
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = io.save_figure(fig, path, close=True)
    return path


def plain_log_ticks(ax) -> None:
    """Log axes of `ax` without minor tick labels (they collide, e.g. '3x10^1 4x10^1')."""
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def pareto_front(
    costs: Float[np.ndarray, " n"] | Sequence[float],
    scores: Float[np.ndarray, " n"] | Sequence[float],
) -> np.ndarray:
    """Indices of the points no other point beats: none has a lower-or-equal cost and a higher
    score, or a lower cost and an equal score. Sorted by cost, so that the front draws as a
    staircase (`ax.step(c[i], s[i], where="post")`); ties keep the first point.

    **Raises:** `ValueError` when `costs` and `scores` differ in length or hold a non-finite
    value.
    """
    c, s = np.asarray(costs, dtype=float), np.asarray(scores, dtype=float)
    if c.shape != s.shape or c.ndim != 1 or not (np.isfinite(c).all() and np.isfinite(s).all()):
        raise ValueError(
            f"`costs` and `scores` must be finite 1-D sequences of one length; received shapes "
            f"{c.shape} and {s.shape}."
        )
    front, best = [], -np.inf
    for i in np.lexsort((-s, c)):  # by cost, the higher score first among equal costs
        if s[i] > best:
            front.append(int(i))
            best = s[i]
    return np.asarray(front, dtype=int)


def planar_flow_figure(
    path: str | os.PathLike,
    inputs: Any,
    panels: Sequence[tuple[str, Any]],
    labels: Sequence[int],
    *,
    title: str,
) -> Path:
    """Paths of a flow in its first two coordinates, one panel per `(title, states)`: each
    input's path from `inputs[i]` (array-like `(n, d)`) through `states[:, i]` (`(t, n, e)`, a
    solve's saved states, e.g. of an augmented state), coloured by its class `labels[i]`, a dot
    at its end; at most 3 panels a row. Written to `path` as PNG; returns the path.

    **Raises:** `ValueError` when `panels` is empty, `inputs` is not `(n, d)` with `d >= 2`, or
    a panel's states are not `(t, n, e)` with `e >= 2`.
    """
    x0 = np.asarray(inputs, dtype=float)
    for name, states in panels:
        shape = np.shape(states)
        bad_inputs = x0.ndim != 2 or x0.shape[1] < 2
        if bad_inputs or len(shape) != 3 or shape[1] != x0.shape[0] or shape[2] < 2:
            raise ValueError(
                f"panel {name!r}: expected inputs (n, d >= 2) and states (t, n, e >= 2); "
                f"received inputs of shape {x0.shape} and states of shape {shape}."
            )
    if not panels:
        raise ValueError("`panels` must hold at least one (title, states) panel; received [].")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    with PLOT_LOCK:
        plt = pyplot()
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, (name, states) in zip(axes.flat, panels, strict=False):
            states = np.asarray(states, dtype=float)
            for i, label in enumerate(labels):
                path_i = np.concatenate([x0[None, i, :2], states[:, i, :2]])
                ax.plot(path_i[:, 0], path_i[:, 1], color=f"C{label}", lw=0.8, alpha=0.7)
                ax.plot(path_i[-1, 0], path_i[-1, 1], "o", color=f"C{label}", ms=3)
            ax.set(xlabel="z_1", ylabel="z_2")
            ax.set_title(name, fontsize=9)
        fig.suptitle(title)
        fig.tight_layout()
        path = io.save_figure(fig, path, close=True)
    return path
