"""Balancing: the minimum-norm point of a model's rescaling orbit (ENorm, Stock et al. 2019).

Along the orbit of `RescalingGauge` the squared parameter norm (weights and biases) is, for
the factors `s_l = alpha_l^2` of hidden layer l with every other layer fixed,
`sum_j s_lj Q_lj + P_lj / s_lj + const` with `Q_lj = |incoming|^2 + bias^2` (before scaling)
and `P_lj = |outgoing|^2`: its minimiser `s_lj = sqrt(P_lj / Q_lj)`, i.e.
`alpha^4 = |outgoing|^2 / (|incoming|^2 + bias^2)`, is the closed-form ENorm update. Sweeping it
over the layers is block-coordinate descent on a function that is convex in `log alpha`; at
its fixed point every per-unit Noether charge `|incoming|^2 + bias^2 - |outgoing|^2` vanishes
(the stationarity condition of the norm along the orbit).
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..gauges.rescaling import (
    RescalingElement,
    RescalingGauge,
    balance_factors,
    chain_kind,
    chain_squares,
    chain_view,
    unit_norms,
)


def orbit_gauge(model: Any, gauge: RescalingGauge | None, who: str, why: str) -> RescalingGauge:
    """The rescaling family whose orbit `who` moves along: `gauge`, or the model's own
    (`RescalingGauge.from_model`). `TypeError` for another family; `ValueError` for the control
    (`compensate=False` changes the function, so it has no orbit: `why` says what that means
    for `who`)."""
    if gauge is None:
        return RescalingGauge.from_model(model)
    if not isinstance(gauge, RescalingGauge):
        raise TypeError(f"`gauge` must be a RescalingGauge; received {type(gauge).__name__}.")
    if not gauge.compensate:
        raise ValueError(
            f"{who} needs a compensating RescalingGauge: with compensate=False the family "
            f"changes the function and {why}."
        )
    return gauge


class BalanceResult(eqx.Module):
    """The outcome of `balance`.

    **Fields:**

    - `model`: the balanced model, `gauge.act(scales, input model)` (the same function).
    - `scales`: the gauge element (one positive vector per hidden layer) mapping the input
      model to the balanced one.
    - `num_iterations`: the sweeps over the layers that ran.
    - `converged`: whether the last sweep changed every factor by less than `tol` (relative)
      and every weight and bias is finite (a NaN weight has no minimum-norm point).
    - `max_charge`: the largest per-unit charge of the balanced model relative to that unit's
      norm, `max_j |Q_j| / (|incoming_j|^2 + bias_j^2 + |outgoing_j|^2)` (in [0, 1]; 0 at an
      exact balance), over the units with nonzero incoming and outgoing weights (the others
      keep factor 1 and cannot balance, see `balance`).
    """

    model: Any
    scales: RescalingElement
    num_iterations: Int[Array, ""]
    converged: Bool[Array, ""]
    max_charge: Float[Array, ""]


def balance(
    model: Any,
    gauge: RescalingGauge | None = None,
    *,
    tol: float = 1e-10,
    max_iterations: int = 1000,
) -> BalanceResult:
    """The minimum-norm point of the rescaling orbit of `model`: the rescaling that minimises
    the sum of squared weights and biases without changing the function (ENorm, Stock et al.
    2019). Iterates the closed-form per-unit update `alpha^4 = |outgoing|^2 / (|incoming|^2 +
    bias^2)` over the hidden layers (in order, each using the latest factors of its
    neighbours) until the largest relative change of a factor in a sweep is below `tol`, in a
    `jax.lax.while_loop` (so `balance` runs under `jit` with a static `max_iterations`).

    Units whose incoming weights and bias, or outgoing weights, are all zero keep factor 1:
    the norm has no minimum along their orbit.

    **Arguments:**

    - `model`: an `eqx.nn.MLP` (with or without biases), `FeedforwardNet`, `ConvNet` or
      `GraphConvNet`.
    - `gauge`: the `RescalingGauge` to balance along (default `RescalingGauge.from_model`).
      With `require_symmetry=False` the result is the minimum-norm point of a family that
      changes the function.
    - `tol`: the convergence threshold on the relative change of the factors.
    - `max_iterations`: the most sweeps over the layers.

    **Returns:** a `BalanceResult`; `gauge.act(result.scales, model)` is `result.model`.

    **Raises:** `TypeError` for a gauge that is not a `RescalingGauge`; `ValueError` for the
    control family (`compensate=False`, not an orbit of the function) or
    `max_iterations < 1`; as `RescalingGauge.check_model` otherwise.
    """
    gauge = orbit_gauge(model, gauge, "balance", "has no orbit to balance along")
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"`max_iterations` must be an int >= 1; received {max_iterations!r}.")
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"`tol` must be a finite number > 0; received {tol!r}.")
    gauge.check_model(model)
    weights, biases = chain_view(model, chain_kind(model, "balance"))
    squares, bias_squares = chain_squares(weights, biases)
    sweeps, s, change = balance_factors(squares, bias_squares, tol, max_iterations)
    scales = tuple(jnp.sqrt(x) for x in s)
    balanced = gauge.act(scales, model)
    weights, biases = chain_view(balanced, chain_kind(balanced, "balance"))
    charges = []
    for incoming, outgoing in unit_norms(weights, biases):
        live = (incoming > 0) & (outgoing > 0)
        total = jnp.where(live, incoming + outgoing, 1.0)
        charges.append(jnp.max(jnp.where(live, jnp.abs(incoming - outgoing) / total, 0.0)))

    def all_finite(tree):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))

    return BalanceResult(
        model=balanced,
        scales=scales,
        num_iterations=sweeps,
        # a non-finite weight has no minimum-norm point: its unit's factor stays 1 (its norms
        # compare False with 0, as a dead unit's), so the change alone would say converged
        converged=(change < tol) & all_finite((weights, biases)),
        max_charge=jnp.max(jnp.stack(charges)),
    )
