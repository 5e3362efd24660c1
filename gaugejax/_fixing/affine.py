"""Constant affine gauges and the adaptive solver: the null result, as a measured property.

A constant spatial gauge `x = A y + b` with a constant time scale `s = c t` keeps a neural
ODE's function (`dy/ds = A^-1 F(s / c, A y + b) / c` from `y0 = A^-1 (x0 - b)`, output
`A y(c T) + b`). It cannot make an explicit Runge-Kutta solve cheaper: Runge-Kutta methods are
exactly the affine-equivariant methods (McLachlan, Modin, Munthe-Kaas & Verdier, Numer. Math.
2016), so the gauged solve's stages, steps and embedded error estimates are the plain solve's
mapped by `A` (steps scaled by `c`). What can move the step sequence is only the controller's
error norm, which weighs the components of `A e` instead of `e`. With the norm pulled back
(`v -> norm(A v)`) and a purely absolute tolerance (`rtol = 0`) the two solves take the same
steps; a relative tolerance weighs each component by its own size, which no constant linear map
carries over (the "weights" of the error norm). A time scale alone never changes the steps.

`affine_gauge` builds the gauged model; `affine_step_report` measures both solves on a batch.
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._core.solve import SolveStats, SolveStatus, result_name, state_dtype
from ..models import AbstractNeuralODE, NeuralODE


class AffineGaugedField(eqx.Module):
    """`dy/ds = A^-1 F(s / c, A y + b, args) / c`: the field in the coordinates `x = A y + b`,
    `s = c t` (built by `affine_gauge`)."""

    field: Any
    matrix: Float[Array, "d d"]
    inverse: Float[Array, "d d"]
    shift: Float[Array, " d"]
    time_scale: float

    def __call__(self, s, y, args):
        x = self.matrix @ y + self.shift
        return self.inverse @ self.field(s / self.time_scale, x, args) / self.time_scale


class AffineGauged(eqx.Module):
    """A neural ODE seen through a constant affine gauge: `node` solves in `y = A^-1 (x - b)`,
    `s = c t`; `solve(x0)` and `__call__(x0)` return the original model's observable (`A y + b`
    at the scaled times), so the function is the model's.

    **Fields:** `node` (a `gj.NeuralODE` in the new coordinates), `matrix` (`A`), `inverse`
    (`A^-1`), `shift` (`b`).
    """

    node: NeuralODE
    matrix: Float[Array, "d d"]
    inverse: Float[Array, "d d"]
    shift: Float[Array, " d"]

    def solve(self, x0: Float[Array, " d"]) -> tuple[Array, SolveStats]:
        y, stats = self.node.solve(self.inverse @ (x0 - self.shift))
        return y @ self.matrix.T + self.shift, stats

    def __call__(self, x0: Float[Array, " d"]) -> Array:
        return self.solve(x0)[0]


def affine_gauge(
    model: AbstractNeuralODE,
    matrix: Any,
    *,
    shift: Any = None,
    time_scale: float = 1.0,
    pull_back_norm: bool = True,
) -> AffineGauged:
    """The model in the coordinates `x = A y + b`, `s = c t`: the same function, solved by the
    same solver with every time option scaled by `c` (`t0`, `t1`, `dt0`, observation times,
    and a `PIDController`'s `dtmin` and `dtmax`: `SolveOptions.for_affine_gauge`).

    **Arguments:**

    - `model`: a neural ODE with a flat state of dimension `d` (the field's `args` are kept).
    - `matrix`: `A`, an invertible `(d, d)` array.
    - `shift`: `b`, a `(d,)` array (default zero).
    - `time_scale`: `c > 0`.
    - `pull_back_norm`: give a `PIDController` the norm `v -> norm(A v)` (`gj.PulledBackNorm`),
      so that the gauged solve's error is measured as the plain one's (exactly so at
      `rtol = 0`); False keeps the controller's own norm.

    **Returns:** an `AffineGauged` model (`.node` is the `gj.NeuralODE` in the new coordinates).

    **Raises:** `TypeError` for a `model` that is not a neural ODE; `ValueError` for a
    non-square or singular `matrix`, a mis-sized `shift`, a `time_scale` that is not a finite
    number > 0, or a step-size controller other than a `PIDController` or `ConstantStepSize`.
    """
    if not isinstance(model, AbstractNeuralODE):
        raise TypeError(
            f"`model` of affine_gauge must be a gaugejax neural ODE; received "
            f"{type(model).__name__}."
        )
    c = float(time_scale)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"`time_scale` must be a finite number > 0; received {time_scale!r}.")
    dtype = state_dtype(model)
    A = np.asarray(matrix, dtype)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"`matrix` must be a square (d, d) array; received shape {A.shape}.")
    cond = np.linalg.cond(A)
    if not cond < 1e12:
        raise ValueError(
            f"`matrix` must be invertible (condition number below 1e12); received condition "
            f"number {cond:.3g}."
        )
    dim = A.shape[0]
    b = np.zeros(dim, A.dtype) if shift is None else np.asarray(shift, A.dtype)
    if b.shape != (dim,):
        raise ValueError(f"`shift` must have shape ({dim},); received shape {b.shape}.")
    A, inverse, b = (jnp.asarray(a) for a in (A, np.linalg.inv(A), b))
    options = model.solve_options.for_dtype(dtype)
    options = options.for_affine_gauge(A, c, pull_back_norm=pull_back_norm)
    times = model.observation_times
    node = NeuralODE(
        AffineGaugedField(model.field, A, inverse, b, c),
        t1=c * model.t1,
        t0=c * model.t0,
        args=model.args,
        solve_options=options,
        observation_times=None if times is None else tuple(c * t for t in times),
    )
    return AffineGauged(node, A, inverse, b)


@dataclasses.dataclass(frozen=True)
class AffineStepReport:
    """Both solves of `affine_step_report` on one batch.

    **Fields:** `plain_evaluations`, `gauged_evaluations` (field evaluations summed over the
    inputs), `ratio` (gauged / plain), `plain_steps`, `gauged_steps` (attempted steps per
    input, host arrays), `same_steps` (every input attempted and rejected as many steps in
    both), `max_rel` (`max |gauged - plain| / max |plain|` of the outputs), `status` (the first
    failed solve's `SolveStatus` name, or "successful").
    """

    plain_evaluations: int
    gauged_evaluations: int
    ratio: float
    plain_steps: np.ndarray
    gauged_steps: np.ndarray
    same_steps: bool
    max_rel: float
    status: str


@eqx.filter_jit
def _both(model, gauged, inputs):
    out, stats = jax.vmap(model.solve)(inputs)
    gout, gstats = jax.vmap(gauged.solve)(inputs)
    results = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), stats.result, gstats.result)
    first = jnp.argmax(jax.vmap(lambda r: r != SolveStatus.successful)(results))
    return out, stats, gout, gstats, jax.tree.map(lambda r: r[first], results)


def affine_step_report(
    model: AbstractNeuralODE, inputs: Float[ArrayLike, "n d"], matrix: Any, **gauge: Any
) -> AffineStepReport:
    """Solve `inputs` with `model` and with `affine_gauge(model, matrix, **gauge)`, and compare
    their adaptive cost and outputs (one compiled program; failures reported, never raised).

    **Arguments:** `model`, `matrix` and the keywords of `affine_gauge`; `inputs`: a batch of
    initial states `(n, d)`.

    **Returns:** an `AffineStepReport`.

    **Raises:** as `affine_gauge`; `ValueError` for an empty batch or inputs of another dimension.
    """
    gauged = affine_gauge(model, matrix, **gauge)
    inputs = jnp.asarray(inputs)
    dim = gauged.matrix.shape[0]
    if inputs.ndim != 2 or inputs.shape[0] == 0 or inputs.shape[1] != dim:
        raise ValueError(f"`inputs` must have shape (n >= 1, {dim}); received {inputs.shape}.")
    model = model.with_options(throw=False)
    gauged = eqx.tree_at(lambda g: g.node, gauged, gauged.node.with_options(throw=False))
    out, stats, gout, gstats, first = jax.device_get(_both(model, gauged, inputs))
    status = result_name(int(np.asarray(jax.tree.leaves(first)[0])))
    plain_nfe, gauged_nfe = (int(np.sum(s.num_evaluations)) for s in (stats, gstats))
    same = bool(
        np.array_equal(stats.num_steps, gstats.num_steps)
        and np.array_equal(stats.num_rejected_steps, gstats.num_rejected_steps)
    )
    out, gout = np.asarray(out), np.asarray(gout)
    scale = max(float(np.max(np.abs(out))), float(np.finfo(out.dtype).tiny))
    return AffineStepReport(
        plain_evaluations=plain_nfe,
        gauged_evaluations=gauged_nfe,
        ratio=gauged_nfe / plain_nfe if plain_nfe > 0 else math.nan,
        plain_steps=np.asarray(stats.num_steps),
        gauged_steps=np.asarray(gstats.num_steps),
        same_steps=same,
        max_rel=float(np.max(np.abs(gout - out))) / scale,
        status=status,
    )
