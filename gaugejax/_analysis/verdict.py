"""Verdicts a user can read: is a symmetry "holds", "broken" or "inconclusive", and why.

A deviation means nothing without the noise it competes with. The floor a sweep judges against
is the largest of

- the float floor, `FLOAT_FLOOR_ULPS` units of the dtype's epsilon (relative): rounding of the
  transformed parameters alone moves outputs by a few hundred ulps for well-conditioned models;
- the solver floor: the reference outputs re-solved at a much tighter tolerance (rtol and atol
  / 1000, or a step 8x smaller), `max |ref - ref_tight| / max |ref|`, the reference's own error;
- the identity element's deviation through the same path.

A transformed field is rougher than the original, so its solve can err far more than the
reference's at the same tolerance (measured: 6e-3 at rtol 1e-3 where the reference errs by
1e-13). So when a deviation `D` (relative, maximum over the lanes that succeeded) is above
`HOLD_FACTOR * floor`, the sweep re-solves a few of its samples at the tight tolerance: solver
error shrinks (to `Dt`), a broken symmetry does not.

Rule: `D <= HOLD_FACTOR * floor`, or `D` shrinking by at least `SHRINK` under the tighter
tolerance to within `HOLD_FACTOR` of the tight floor, holds, provided the family's
symmetry-breaking control (where it has one) stands clearly above: median `C >= CONTROL_FACTOR
* max(D, HOLD_FACTOR * floor)`. `D > BROKEN_FACTOR * floor` that does not shrink (or with no
tighter solve possible) is broken. Anything else is inconclusive, with the reason.

Large elements (catastrophic cancellation): outputs computed from parameters `growth` times the
model's (e.g. a huge shift added in one layer and removed in the next) carry that much more
rounding, so the floor includes `FLOAT_FLOOR_ULPS * eps * growth`. Where that term exceeds
`sqrt(eps)` (fewer than half the digits left), a deviation above `HOLD_FACTOR` times the other
floors cannot be told from lost digits: inconclusive, never "holds" or "broken". Failed lanes
are never counted as passing: a sweep with failures says so, and one where every lane failed is
inconclusive.
"""

import dataclasses
import math


VERDICTS = ("holds", "broken", "inconclusive")
FLOAT_FLOOR_ULPS = 256.0
# symmetric deviations / floor measured over the test families: 0.3-12 (rtol 1e-8 to 1e-11)
HOLD_FACTOR = 30.0
BROKEN_FACTOR = 300.0
# a 1000x tighter tolerance must remove at least 90 % of a deviation that is solver error
SHRINK = 10.0
# the control must clear the symmetric deviation by this much, or breaking cannot be told
CONTROL_FACTOR = 10.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    """`verdict` ("holds", "broken", "inconclusive") and the `reason`, in words and numbers."""

    verdict: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Recheck:
    """Samples re-solved at a tighter tolerance: their deviations at the model's tolerance
    (`loose`, max) and at the tight one (`tight`, max), the floor of the tight solve (its
    requested accuracy, `max(rtol, atol / scale)`, or 0 when the controller has none: then only
    the shrinking counts), and how it was tightened (`how`)."""

    loose: float
    tight: float
    tight_floor: float
    how: str


def judge(
    deviation: float,
    floor: float,
    *,
    num_ok: int,
    num_samples: int,
    failures: dict[str, int],
    control: float | None,
    recheck: Recheck | None = None,
    floor_note: str = "",
    growth: float = 1.0,
    eps: float = 2.0**-52,
) -> Verdict:
    """The verdict for a sweep's maximum relative deviation `deviation` over its `num_ok` good
    lanes against `floor` (relative), given the control's median relative deviation `control`
    (None: the family has no control, or none was run) and the `recheck` of a few samples at a
    tighter tolerance (None: not needed or not possible). `growth` is the largest ratio of
    a transformed model's largest parameter to the model's over the good lanes (1 where it
    does not apply), `eps` the machine epsilon of the outputs' dtype.

    **Returns:** a `Verdict`.
    """
    failed = num_samples - num_ok
    lost = f"; {failed} of {num_samples} lanes failed ({failures}), not counted" if failed else ""
    note = f" ({floor_note})" if floor_note else ""
    if num_ok == 0:
        return Verdict("inconclusive", f"every lane failed: {failures}")
    if not math.isfinite(floor):
        return Verdict("inconclusive", f"the noise floor could not be measured{note}{lost}")
    base_floor, cancellation = floor, FLOAT_FLOOR_ULPS * eps * max(growth, 1.0)
    digits_lost = cancellation > math.sqrt(eps)
    if cancellation > floor:
        floor = cancellation
        if growth > 10:  # noted only where it matters
            note = f"{note} (rounding of parameters up to {growth:.2e}x the model's)"
    ratio = (
        f"max relative deviation {deviation:.2e} ({deviation / floor:.3g}x the floor "
        f"{floor:.2e}{note})"
    )
    if digits_lost and deviation > HOLD_FACTOR * base_floor:
        return Verdict(
            "inconclusive",
            f"{ratio}: the sampled elements make the parameters up to {growth:.2e}x the "
            f"model's, so fewer than half the digits are left (rounding {cancellation:.2e} > "
            f"sqrt(eps) = {math.sqrt(eps):.2e}) and the deviation may be cancellation error; "
            f"sample smaller elements{lost}",
        )
    if deviation <= HOLD_FACTOR * floor:
        within = f"{ratio} is within {HOLD_FACTOR:g}x the floor"
    elif (
        recheck is not None
        and math.isfinite(recheck.tight)
        and (
            recheck.tight * SHRINK <= recheck.loose
            and recheck.tight <= HOLD_FACTOR * recheck.tight_floor
        )
    ):
        within = (
            f"{ratio} is solver error: re-solved {recheck.how}, the re-checked samples' deviation "
            f"fell from {recheck.loose:.2e} to {recheck.tight:.2e} (tight floor "
            f"{recheck.tight_floor:.2e})"
        )
    elif deviation > BROKEN_FACTOR * floor and (
        recheck is None or not recheck.tight * SHRINK <= recheck.loose
    ):
        kept = (
            f"; re-solved {recheck.how} it stays at {recheck.tight:.2e}"
            if recheck is not None
            else ""
        )
        return Verdict("broken", f"{ratio} is above {BROKEN_FACTOR:g}x the floor{kept}{lost}")
    else:
        again = (
            f"; re-solved {recheck.how}: {recheck.loose:.2e} -> {recheck.tight:.2e} (tight floor "
            f"{recheck.tight_floor:.2e})"
            if recheck is not None
            else ""
        )
        return Verdict(
            "inconclusive",
            f"{ratio} is neither within {HOLD_FACTOR:g}x the floor nor clearly broken{again}: "
            f"tighten the solver tolerance or use float64{lost}",
        )
    if control is None:
        return Verdict("holds", f"{within}; the family has no symmetry-breaking control{lost}")
    bar = CONTROL_FACTOR * max(deviation, HOLD_FACTOR * floor)
    if not control >= bar:
        return Verdict(
            "inconclusive",
            f"{within}, but the symmetry-breaking control deviates by only {control:.2e} "
            f"(< {bar:.2e}): at this tolerance breaking cannot be told from noise; tighten the "
            f"solver tolerance{lost}",
        )
    return Verdict(
        "holds",
        f"{within}, while the symmetry-breaking control deviates by {control:.2e}{lost}",
    )
