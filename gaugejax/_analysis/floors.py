"""The floors a sweep's deviations are judged against, and the re-checks behind a verdict.

- the float floor: `FLOAT_FLOOR_ULPS` epsilons of the reference's dtype;
- the noise floor: the identity element's deviation through the same path (relative);
- the solver floor: the reference's own solver error, measured by re-solving it with the
  model's tightened copy (`model.tightened`, same structure, so the same compiled programs);
- the re-check: the lanes with the largest deviations and a few random ones, rebuilt from their
  sample index and re-solved at the tight tolerance (solver error shrinks, breaking does not),
  whenever the model has a tightened copy;
- the control: the family's symmetry-breaking `control()`, through the same program (and
  re-solved at the tight tolerance when the verdict is read there).

The model is asked for its requested accuracy (`requested_accuracy`); nothing here looks at
model or controller classes.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ..models.solved import expected_shrink, requested_accuracy
from .blocks import CONTROL, Runner
from .lane import Plan, host_flat
from .sweep_result import good
from .verdict import FLOAT_FLOOR_ULPS, Recheck


class Tight(NamedTuple):
    """The model's tightened copy: the model, its arrays (the plan's static part is the
    model's), and how it was tightened."""

    model: Any
    params: PyTree
    how: str


class Floors(NamedTuple):
    """The reference and the floors of one sweep (relative floors, host floats).

    `note` says how the solver floor was measured (the verdict's floor note); `missing` names
    evidence that could not be had (a failed re-solve), empty otherwise; `tight` and
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
    missing: str
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
    reference, scale, noise, solved = runner.reference(plan, params, inputs)
    dtype = str(jax.tree.leaves(reference)[0].dtype)
    tiny, eps = float(jnp.finfo(dtype).tiny), float(jnp.finfo(dtype).eps)
    scale = max(scale, tiny)
    float_floor = FLOAT_FLOOR_ULPS * eps
    solver_floor, tight_reference, missing = 0.0, None, ""
    if tight is not None:
        tight_reference, _, _, tight_solved = runner.reference(plan, tight.params, inputs)
        gap = float(np.max(np.abs(host_flat(tight_reference) - host_flat(reference))))
        if tight_solved:
            solver_floor = gap / scale
            note = f"solver floor and re-check {tight.how}"
        else:
            # missing evidence, never a floor of zero: the verdict says so
            note = f"no solver floor: the reference's re-solve {tight.how} failed"
            missing = (
                f"the reference re-solved {tight.how} failed (raise the model's `max_steps`), "
                "so its own solver error is unknown"
            )
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
        missing,
        tight,
        tight_reference,
    )


def recheck_lanes(merged: dict, num: int) -> np.ndarray:
    """The sample indices a re-check re-solves: the `ceil(num / 2)` good lanes with the largest
    deviations, then up to `num // 2` other good lanes chosen at random by each lane's own
    `draw` (a uniform integer from its key: so a planted outlier is always among them, the
    rest is not only the worst, and the choice does not depend on chunk or block sizes)."""
    ok = np.flatnonzero(good(merged))
    order = ok[np.argsort(-merged["max_rel"][ok], kind="stable")]
    worst, rest = order[: -(-num // 2)], order[-(-num // 2) :]
    if rest.size:
        picked = rest[np.argsort(merged["draw"][rest], kind="stable")]
        rest = np.sort(picked[: num // 2])
    return np.concatenate([worst, rest]).astype(np.int64)


def recheck(
    runner: Runner,
    plan: Plan,
    floors: Floors,
    inputs: PyTree,
    merged: dict,
    key,
    num: int,
    blocks: int,
) -> Recheck | None:
    """The lanes of `recheck_lanes` re-solved with the tightened model (rebuilt from their
    sample index: the same gauge elements), when there is a tightened model and a lane
    succeeded; else None.

    **Arguments:** `merged`: the sweep's per-sample metrics; `key`: the sweep's key; `num`:
    lanes to re-solve (> 0); `blocks`: the number of the sweep's own blocks (for
    `Runner.side`).

    **Returns:** a `Recheck`; a lane whose re-solve failed holds NaN (missing evidence).
    """
    if floors.tight is None or not good(merged).any():
        return None
    lanes = recheck_lanes(merged, num)
    tight = floors.tight
    args = (tight.params, inputs, floors.tight_reference, key)
    plan, block = runner.side(plan, *args, len(lanes), blocks)
    again, _, _ = runner.run(
        plan,
        tight.params,
        inputs,
        floors.tight_reference,
        key,
        len(lanes),
        "re-check",
        block=block,
        indices=lanes,
    )
    tight_floor = max(
        floors.float_floor,
        floors.noise / floors.scale,
        requested_accuracy(tight.model, floors.scale),
    )
    return Recheck(
        lanes=lanes,
        loose=merged["max_rel"][lanes].astype(float),
        tight=np.where(good(again), again["max_rel"], np.nan).astype(float),
        tight_floor=tight_floor,
        how=tight.how,
        expected_shrink=expected_shrink(tight.model),
    )


def control_deviations(
    runner: Runner,
    plan: Plan,
    params: PyTree,
    inputs: PyTree,
    reference: PyTree,
    key,
    num: int,
    blocks: int,
) -> np.ndarray:
    """`max_rel` of `num` samples of the family's control (`plan` and `params` prepared from
    `gauge.control()`), NaN where a lane failed; its keys are the sweep's `key`'s `CONTROL`
    stream, apart from the sweep's own samples; in a block of its own size when that pays
    (`Runner.side`, with `blocks` the number of the sweep's own blocks)."""
    plan, block = runner.side(plan, params, inputs, reference, key, num, blocks, stream=CONTROL)
    out, _, _ = runner.run(
        plan, params, inputs, reference, key, num, "control", block=block, stream=CONTROL
    )
    return np.where(good(out), out["max_rel"], np.nan)
