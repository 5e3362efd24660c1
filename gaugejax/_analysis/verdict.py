"""Verdicts a user can read: is a symmetry "holds", "broken" or "inconclusive", and why.

A deviation means nothing without the noise it competes with, and a solver's noise is known
only by re-solving. The verdict therefore reads two kinds of evidence.

**The floor at the model's tolerance** (`SweepResult.floor`, the one floor the reason names)
is the largest of its parts, each kept in the result:

- the float floor, `FLOAT_FLOOR_ULPS` units of the dtype's epsilon (relative): rounding of the
  transformed parameters alone moves outputs by a few hundred ulps for well-conditioned models;
- the solver floor: the reference re-solved much more accurately (rtol and atol / 1000, or a
  step 8x smaller), `max |ref - ref_tight| / max |ref|`, the reference's own error;
- the noise floor: the identity element's deviation through the same path;
- the rounding floor: `FLOAT_FLOOR_ULPS * eps * growth`, where the sampled elements make the
  parameters `growth` times the model's (catastrophic cancellation carries that much more
  rounding).

**The re-check**: for a model with solves, the lanes with the largest deviations (and a few
random ones) re-solved at the tight tolerance, rebuilt from their sample index, whatever
`control_samples` is. A transformed field is rougher than the original, so its solve can err
far more than the reference's at the same tolerance (measured: 6e-3 at rtol 1e-3 where the
reference errs by 1e-13): solver error shrinks under the tight solve, broken symmetry stays.
Each re-solved lane `i` gives `loose_i -> tight_i` against the tight floor (the float and
noise floors and the accuracy the tight solve asks for). For a fixed step the tight solve
still errs by the truncation `loose_i / expected_shrink` (`STEP_FACTOR ** order`), which the
lane's band includes; a fixed-step lane must also shrink by `sqrt(expected_shrink)` (at most
`SHRINK`), so that a first-order method cannot pass by its band alone.

Rule, in order:

1. Every lane failed, more than `MAX_FAILED_FRACTION` of the lanes failed (a verdict from the
   survivors would be judged on the easy elements), the reference failed, or the sampled
   elements leave fewer than half the digits (rounding floor > sqrt(eps)) while the deviation
   is above `HOLD_FACTOR` times the other floors: "inconclusive", with the failure kinds.
2. A re-solved lane that keeps its deviation (shrinks by less than the required factor) above
   `BROKEN_FACTOR` times the tight floor: "broken" (evidence of breaking outweighs a loose
   floor that could hide it).
3. Symmetric evidence at either tolerance: the maximum deviation `D` (over the lanes that
   succeeded) within `HOLD_FACTOR` times the floor, or every re-solved lane within
   `HOLD_FACTOR` times its tight band. Then "holds", provided the family's symmetry-breaking
   control (where one was run) stands clearly above at the same tolerance: median
   `C >= CONTROL_FACTOR * max(D, HOLD_FACTOR * floor)` (at the tight tolerance the control is
   re-solved too). A control that does not clear: "inconclusive".
4. No re-check possible (a model without solves, a custom observable, a controller with no
   tighter form) and `D > BROKEN_FACTOR * floor`: "broken".
5. Anything else is "inconclusive", with the missing evidence named: a re-solve that failed
   (never read as a floor of zero), re-solved lanes that shrank but not into the band (with
   the tolerance that would decide it), or a deviation between the bands.
"""

import dataclasses
import math

import numpy as np


VERDICTS = ("holds", "broken", "inconclusive")
FLOAT_FLOOR_ULPS = 256.0
# symmetric deviations / floor measured over the test families: 0.3-12 (rtol 1e-8 to 1e-11)
HOLD_FACTOR = 30.0
BROKEN_FACTOR = 300.0
# a 1000x tighter tolerance must remove at least 90 % of a deviation that is solver error
SHRINK = 10.0
# the control must clear the symmetric deviation by this much, or breaking cannot be told
CONTROL_FACTOR = 10.0
# above this fraction of failed lanes the survivors (the easier elements) cannot speak for
# the family
MAX_FAILED_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Verdict:
    """`verdict` ("holds", "broken", "inconclusive"), the `reason` in words and numbers, and the
    `floor` (relative) the deviation was judged against at the model's tolerance, rounding
    included: the floor the reason names."""

    verdict: str
    reason: str
    floor: float = float("nan")


@dataclasses.dataclass(frozen=True)
class Recheck:
    """Lanes re-solved at a tighter tolerance: their sample indices `lanes`, deviations at the
    model's tolerance (`loose`) and at the tight one (`tight`, NaN where the re-solve failed),
    the tight floor `tight_floor` (float and noise floors and the tight solve's requested
    accuracy `max(rtol, atol / scale)`, 0 for a fixed step), how it was tightened (`how`), the
    factor by which solver error is expected to shrink (`expected_shrink`: `inf` under error
    control, `STEP_FACTOR ** order` for a fixed step), and the control's deviations re-solved
    the same way (`control_tight`, empty when not run)."""

    lanes: np.ndarray
    loose: np.ndarray
    tight: np.ndarray
    tight_floor: float
    how: str
    expected_shrink: float = math.inf
    control_tight: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,)))

    @property
    def required_shrink(self) -> float:
        """How much a lane must shrink to count as solver error (and below which it "stays")."""
        return min(SHRINK, math.sqrt(self.expected_shrink))

    def bands(self) -> np.ndarray:
        """Each lane's tight floor: the tight floor, or the truncation left at a fixed step."""
        return np.maximum(self.tight_floor, self.loose / self.expected_shrink)

    def within(self) -> np.ndarray:
        """Lanes whose tight deviation fell within `HOLD_FACTOR` times their band (at a fixed
        step also shrinking by `required_shrink`, unless within the tight floor itself)."""
        tight = self.tight
        band = tight <= HOLD_FACTOR * self.bands()
        if math.isinf(self.expected_shrink):
            return band
        shrank = tight * self.required_shrink <= self.loose
        return band & (shrank | (tight <= HOLD_FACTOR * self.tight_floor))

    def stays(self) -> np.ndarray:
        """Lanes that keep their deviation: shrinking by less than `required_shrink` and above
        `BROKEN_FACTOR` times the tight floor."""
        tight = self.tight
        return (tight * self.required_shrink > self.loose) & (
            tight > BROKEN_FACTOR * self.tight_floor
        )

    def describe(self, which: np.ndarray | None = None, most: int = 3) -> str:
        """`lane i: loose -> tight` for (up to `most` of) the lanes `which` (default all)."""
        idx = np.arange(len(self.lanes)) if which is None else np.flatnonzero(which)
        parts = [
            f"lane {int(self.lanes[i])}: {self.loose[i]:.2e} -> "
            + ("re-solve failed" if not np.isfinite(self.tight[i]) else f"{self.tight[i]:.2e}")
            for i in idx[:most]
        ]
        more = f" and {len(idx) - most} more" if len(idx) > most else ""
        return ", ".join(parts) + more


def rounding_floor(growth: float, eps: float) -> float:
    """The rounding floor: `FLOAT_FLOOR_ULPS * eps * growth` (relative), the rounding carried by
    outputs computed from parameters `growth` times the model's (at least 1)."""
    return FLOAT_FLOOR_ULPS * eps * max(growth, 1.0)


def verdict_floor(floor: float, growth: float, eps: float) -> float:
    """The floor a verdict judges against: the larger of `floor` (float, solver and noise
    floors) and the `rounding_floor`; NaN stays NaN (a floor that could not be measured)."""
    if not math.isfinite(floor):
        return floor
    return max(floor, rounding_floor(growth, eps))


def control_clears(control: float | None, deviation: float, floor: float) -> bool:
    """Whether a control's median relative deviation `control` stands clearly above a
    symmetric `deviation` judged against `floor`: `control >= CONTROL_FACTOR * max(deviation,
    HOLD_FACTOR * floor)` (True when there is no control to ask)."""
    if control is None:
        return True
    return bool(control >= CONTROL_FACTOR * max(deviation, HOLD_FACTOR * floor))


def _median(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


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
    missing: str = "",
    growth: float = 1.0,
    eps: float = 2.0**-52,
) -> Verdict:
    """The verdict for a sweep's maximum relative deviation `deviation` over its `num_ok` good
    lanes against `floor` (relative, without the rounding floor), given the control's median
    relative deviation `control` (None: the family has no control, or none was run) and the
    `recheck` of lanes at a tighter tolerance (None: no tighter solve). The rule is in the
    module docstring.

    **Arguments:** as above, and `failures` (failed lanes by kind); `floor_note`: how the floor
    was measured; `missing`: evidence that should have been there and is not (e.g. "the
    re-solve at rtol 1e-9 failed (max_steps?)"); `growth`: the largest ratio of a transformed
    model's largest parameter to the model's over the good lanes (1 where it does not apply);
    `eps`: the machine epsilon of the outputs' dtype.

    **Returns:** a `Verdict`, its `floor` the floor judged against (rounding included).
    """
    failed = num_samples - num_ok
    lost = f"; {failed} of {num_samples} lanes failed ({failures}), not counted" if failed else ""
    note = f" ({floor_note})" if floor_note else ""
    base_floor, rounding = floor, rounding_floor(growth, eps)
    floor = verdict_floor(floor, growth, eps)
    if floor == rounding and floor > base_floor and growth > 10:  # noted only where it matters
        note = f"{note} (rounding of parameters up to {growth:.2e}x the model's)"

    def verdict(name: str, reason: str) -> Verdict:
        return Verdict(name, reason, floor)

    if num_ok == 0:
        return verdict("inconclusive", f"every lane failed: {failures}")
    if failed > MAX_FAILED_FRACTION * num_samples:
        return verdict(
            "inconclusive",
            f"{failed} of {num_samples} lanes failed ({failures}), more than "
            f"{MAX_FAILED_FRACTION:.0%}: the {num_ok} that solved are the easier elements and "
            "cannot speak for the family; fix the failures (e.g. raise `max_steps`) and sweep "
            "again",
        )
    if not math.isfinite(floor):
        return verdict("inconclusive", f"the noise floor could not be measured{note}{lost}")
    ratio = (
        f"max relative deviation {deviation:.2e} ({deviation / floor:.3g}x the floor "
        f"{floor:.2e}{note})"
    )
    if rounding > math.sqrt(eps) and deviation > HOLD_FACTOR * base_floor:
        return verdict(
            "inconclusive",
            f"{ratio}: the sampled elements make the parameters up to {growth:.2e}x the "
            f"model's, so fewer than half the digits are left (rounding {rounding:.2e} > "
            f"sqrt(eps) = {math.sqrt(eps):.2e}) and the deviation may be cancellation error; "
            f"sample smaller elements{lost}",
        )
    solved = None if recheck is None else np.isfinite(recheck.tight)
    if recheck is not None and solved.any():
        stays = recheck.stays() & solved
        if stays.any():
            return verdict(
                "broken",
                f"{ratio}; re-solved {recheck.how}, lanes keep their deviation above "
                f"{BROKEN_FACTOR:g}x the tight floor {recheck.tight_floor:.2e} "
                f"({recheck.describe(stays)}){lost}",
            )
    # symmetric evidence, at the model's tolerance and at the tight one; the control is
    # compared at the same tolerance as the deviation it must clear
    loose_control = (control, deviation, floor)
    levels = []
    if deviation <= HOLD_FACTOR * floor:
        levels.append((f"{ratio} is within {HOLD_FACTOR:g}x the floor", [loose_control]))
    if recheck is not None and solved.all() and recheck.within().all():
        tight = (_median(recheck.control_tight), float(np.max(recheck.tight)), recheck.tight_floor)
        levels.append(
            (
                f"{ratio} is solver error: re-solved {recheck.how}, every re-checked lane fell "
                f"within {HOLD_FACTOR:g}x the tight floor {recheck.tight_floor:.2e} "
                f"({recheck.describe()})",
                [loose_control, tight],
            )
        )
    if levels and control is None:
        return verdict(
            "holds", f"{levels[0][0]}; no symmetry-breaking control was run or exists{lost}"
        )
    for within, controls in levels:
        for level_control, dev, level_floor in controls:
            if level_control is not None and control_clears(level_control, dev, level_floor):
                return verdict(
                    "holds",
                    f"{within}, while the symmetry-breaking control deviates by "
                    f"{level_control:.2e}{lost}",
                )
    if levels:
        within, controls = levels[-1]
        level_control, dev, level_floor = [c for c in controls if c[0] is not None][-1]
        bar = CONTROL_FACTOR * max(dev, HOLD_FACTOR * level_floor)
        return verdict(
            "inconclusive",
            f"{within}, but the symmetry-breaking control deviates by only {level_control:.2e} "
            f"(< {bar:.2e}): breaking cannot be told from noise here; tighten the solver "
            f"tolerance{lost}",
        )
    if recheck is None and not missing and deviation > BROKEN_FACTOR * floor:
        return verdict("broken", f"{ratio} is above {BROKEN_FACTOR:g}x the floor{lost}")
    # what would decide it
    if missing:
        why = f"; {missing}"
    elif recheck is not None and not solved.all():
        why = (
            f"; re-solved {recheck.how}, some re-solves failed ({recheck.describe(~solved)}): "
            "raise the model's `max_steps`"
        )
    elif recheck is not None:
        why = (
            f"; re-solved {recheck.how}, lanes shrank but not within {HOLD_FACTOR:g}x the tight "
            f"floor {recheck.tight_floor:.2e} ({recheck.describe(~recheck.within())}): sweep "
            f"the model at that tighter tolerance (its re-check goes further still)"
        )
    elif eps > 1e-10:
        why = ": tighten the solver tolerance or sweep in float64"
    else:
        why = ": tighten the solver tolerance"
    return verdict(
        "inconclusive",
        f"{ratio} is neither within {HOLD_FACTOR:g}x the floor nor clearly broken{why}{lost}",
    )
