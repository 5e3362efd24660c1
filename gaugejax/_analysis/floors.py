"""The floors a sweep's deviations are judged against, and the re-checks behind a verdict.

- the float floor: `FLOAT_FLOOR_ULPS` epsilons of the reference's dtype;
- the noise floor: the identity element's deviation through the same path (relative);
- the solver floor: the reference's own solver error, measured by re-solving it with the
  model's tightened copy (`model.tightened`, same structure, so the same compiled programs);
- the re-check: when the deviation exceeds `HOLD_FACTOR` times the floor, the first samples
  again at the tight tolerance (solver error shrinks, breaking does not);
- the control: the family's symmetry-breaking `control()`, through the same program.

The model is asked for its requested accuracy (`requested_accuracy`); nothing here looks at
model or controller classes.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ..models.solved import requested_accuracy
from .blocks import Runner
from .lane import Plan, flat
from .sweep_result import good
from .verdict import FLOAT_FLOOR_ULPS, HOLD_FACTOR, Recheck


class Tight(NamedTuple):
    """The model's tightened copy: the model, its arrays (the plan's static part is the
    model's), and how it was tightened."""

    model: Any
    params: PyTree
    how: str


class Floors(NamedTuple):
    """The reference and the floors of one sweep (relative floors, host floats).

    `note` says how the solver floor was measured (the verdict's floor note); `tight` and
    `tight_reference` are None when there is no solver floor to re-check against.
    """

    reference: PyTree
    scale: float
    eps: float
    noise: float
    float_floor: float
    solver_floor: float
    floor: float
    note: str
    tight: Tight | None
    tight_reference: PyTree | None


def measure_floors(
    runner: Runner, plan: Plan, params: PyTree, inputs: PyTree, tight: Tight | None, note: str
) -> Floors:
    """The reference outputs and the floors (see the module docstring).

    **Arguments:** the sweep's `runner`, `plan`, model and gauge arrays `params` and `inputs`;
    `tight`: the model's tightened copy, or None with `note` saying why there is none.

    **Returns:** `Floors`. The floor is NaN when a reference solve failed (the verdict is then
    inconclusive); the solver floor is NaN, and `tight` None, when the re-solve failed (e.g.
    `max_steps` too small for the tighter tolerance: the float floor only).
    """
    reference, noise, solved = runner.reference(plan, params, inputs)
    dtype = str(jax.tree.leaves(reference)[0].dtype)
    tiny, eps = float(jnp.finfo(dtype).tiny), float(jnp.finfo(dtype).eps)
    scale = max(float(jnp.max(jnp.abs(flat(reference)))), tiny)
    float_floor = FLOAT_FLOOR_ULPS * eps
    solver_floor, tight_reference = 0.0, None
    if tight is not None:
        tight_reference, _, tight_solved = runner.reference(plan, tight.params, inputs)
        gap = float(jnp.max(jnp.abs(flat(tight_reference) - flat(reference))))
        if tight_solved:
            solver_floor = gap / scale
            note = f"solver floor and re-check {tight.how}"
        else:
            note = f"the re-solve {tight.how} failed (max_steps?): no solver floor"
            solver_floor, tight, tight_reference = float("nan"), None, None
    floor = max(float_floor, 0.0 if math.isnan(solver_floor) else solver_floor, noise / scale)
    if not solved:
        floor = float("nan")
    return Floors(
        reference,
        scale,
        eps,
        noise,
        float_floor,
        solver_floor,
        floor,
        note,
        tight,
        tight_reference,
    )


def recheck(
    runner: Runner,
    plan: Plan,
    floors: Floors,
    inputs: PyTree,
    merged: dict,
    key,
    num: int,
    block: int,
) -> Recheck | None:
    """The first `num` samples re-solved with the tightened model, when the deviation exceeds
    `HOLD_FACTOR` times a finite floor and there is a tightened model; else None (also when no
    sample solved both times).

    **Arguments:** `merged`: the sweep's per-sample metrics; `key`: the sweep's key (the same
    samples are drawn); `num`: samples to re-solve (> 0); `block`: their block size.
    """
    ok = good(merged)
    if floors.tight is None or not ok.any() or not math.isfinite(floors.floor):
        return None
    if not float(merged["max_rel"][ok].max()) > HOLD_FACTOR * floors.floor:
        return None
    tight = floors.tight
    again, _, _ = runner.run(
        plan, tight.params, inputs, floors.tight_reference, key, num, "re-check", block=block
    )
    both = ok[:num] & good(again)
    if not both.any():
        return None
    tight_floor = max(
        floors.float_floor,
        floors.noise / floors.scale,
        requested_accuracy(tight.model, floors.scale),
    )
    return Recheck(
        loose=float(merged["max_rel"][:num][both].max()),
        tight=float(again["max_rel"][both].max()),
        tight_floor=tight_floor,
        how=tight.how,
    )


def control_deviations(
    runner: Runner, plan: Plan, params: PyTree, inputs: PyTree, reference: PyTree, key, num: int
) -> np.ndarray:
    """`max_rel` of `num` samples of the family's control (`plan` and `params` prepared from
    `gauge.control()`), NaN where a lane failed; its keys are folded from the sweep's `key`
    apart from the sweep's own samples."""
    key = jax.random.fold_in(key, 2**31 - 1)
    out, _, _ = runner.run(plan, params, inputs, reference, key, num, "control")
    return np.where(good(out), out["max_rel"], np.nan)
