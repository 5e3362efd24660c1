"""The result of a sweep: per-sample deviations and solver statistics, the floors and the
verdict, as host numpy arrays; saved and loaded as checksummed JSON."""

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from .._core.solve import SolveStatus, result_name
from .._infra.io import read_json_checked, write_json_checked


# host numpy, not a JAX operation: importing gaugejax must not start JAX's backends
# (`configure_cpu_devices` runs after the import)
SUCCESS = int(np.asarray(jax.tree.leaves(SolveStatus.successful)[0]))

# what `SweepResult.save` writes; `load` refuses other formats and versions
FORMAT = "gaugejax.SweepResult"
VERSION = 3  # 2: the verdict's floor and its parts, the re-checked lanes; 3: num_programs
READABLE = (2, 3)  # a version-2 file reads with num_programs = 0 (not counted)


def status_name(code: int) -> str:
    """The `SolveStatus` name of a lane's integer `result` code."""
    return result_name(code)


def good(merged: dict) -> np.ndarray:
    """Lanes of per-sample metrics whose solves succeeded with a finite relative deviation."""
    return (merged["result"] == SUCCESS) & np.isfinite(merged["max_rel"])


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Per-sample deviations and solver statistics of a gauge sweep (host numpy arrays), and the
    verdict.

    `mode="finite"`: deviation `observable(act(g, model)) - observable(model)`.
    `mode="first_order"`: `d/da observable(act(a g, model))` at a = 0 (infinitesimal families).
    `max_rel` is `max |dev| / max |reference|` (norm-wise relative). `num_steps` is the maximum
    and `num_evaluations` the sum over the inputs of a lane (-1: not counted for this solver);
    `result` the lane's `SolveStatus` code (`status_name` names it). Lanes that failed hold NaN
    deviations.

    Noise and verdict (see `gj.judge`): `floor` is the relative floor the verdict judged
    against (the one its reason names), the largest of its parts: `float_floor` (256 ulp),
    `solver_floor` (the reference's own solver error, relative; NaN when its re-solve failed,
    0 for models without a solver), `noise_floor / reference_scale` (`noise_floor` is the
    identity element's absolute deviation through the same path) and `rounding_floor` (the
    rounding of the largest transformed parameters, from `parameter_growth`: per lane, the
    largest |parameter| of the transformed model over the model's, 1 for first-order sweeps
    and field families). `control_max_rel`: per-sample deviations of the family's
    symmetry-breaking control (empty without one). The re-check: `recheck_lanes` (sample
    indices: the largest deviations first, then a few random lanes), their deviations at the
    model's tolerance (`recheck_loose_max_rel`) and re-solved `recheck_how`
    (`recheck_max_rel`, NaN where the re-solve failed), against `recheck_floor`;
    `control_recheck_max_rel` the control re-solved the same way when the verdict was read
    there (else empty); without a re-check the arrays are empty and `recheck_how` says why.
    `verdict` and `verdict_reason`. `compile_time_s` and `num_programs`: the seconds the call
    spent tracing, lowering and compiling, and the XLA programs it compiled (every one, eager
    operations included; 0 when everything was compiled before).

    `save(path)` writes it as checksummed JSON; `SweepResult.load(path)` reads it back equal,
    array dtypes and NaNs included.
    """

    mode: str
    max_abs: np.ndarray
    mean_abs: np.ndarray
    max_rel: np.ndarray
    result: np.ndarray
    num_steps: np.ndarray
    num_evaluations: np.ndarray
    parameter_growth: np.ndarray
    reference_scale: float
    noise_floor: float
    solver_floor: float
    floor: float
    control_max_rel: np.ndarray
    verdict: str
    verdict_reason: str
    dtype: str
    precision: str
    chunk_size: int
    num_devices: int
    compile_time_s: float
    run_time_s: float
    # the floor's other parts and the re-check (defaults: none measured)
    float_floor: float = float("nan")
    rounding_floor: float = float("nan")
    recheck_lanes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    recheck_loose_max_rel: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    recheck_max_rel: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    recheck_floor: float = float("nan")
    recheck_how: str = ""
    control_recheck_max_rel: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    num_programs: int = 0

    @property
    def num_samples(self) -> int:
        return int(self.max_abs.shape[0])

    @property
    def ok(self) -> np.ndarray:
        """Lanes whose solves succeeded and whose deviation is finite."""
        return (self.result == SUCCESS) & np.isfinite(self.max_abs)

    def failures(self) -> dict[str, int]:
        """Failed lanes by reason (`SolveStatus` names: diffrax's kinds, `nonfinite_output`,
        `singular_gauge`)."""
        return {
            status_name(int(code)): int(np.sum(self.result == code))
            for code in np.unique(self.result[self.result != SUCCESS])
        }

    @property
    def lane_efficiency(self) -> float:
        """Mean over vmapped chunks of mean(steps)/max(steps): the useful fraction of work."""
        steps = self.num_steps.astype(float)
        n = (len(steps) // self.chunk_size) * self.chunk_size
        chunks = steps[:n].reshape(-1, self.chunk_size) if n else steps[None]
        peak = chunks.max(axis=1)
        return float(np.mean(np.where(peak > 0, chunks.mean(axis=1) / np.maximum(peak, 1), 1.0)))

    def summary(self) -> dict:
        """JSON-ready summary, verdict first (then medians, maxima, failures, timings)."""
        ok = self.ok
        dev = self.max_abs[ok]
        counted = self.num_evaluations >= 0
        control = self.control_max_rel[np.isfinite(self.control_max_rel)]
        return {
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "mode": self.mode,
            "num_samples": self.num_samples,
            "num_ok": int(ok.sum()),
            "failures": self.failures(),
            "max_abs_max": float(dev.max()) if dev.size else float("nan"),
            "max_abs_median": float(np.median(dev)) if dev.size else float("nan"),
            "max_rel_max": float(self.max_rel[ok].max()) if dev.size else float("nan"),
            "parameter_growth_max": (
                float(self.parameter_growth[ok].max()) if dev.size else float("nan")
            ),
            "floor": self.floor,
            "float_floor": self.float_floor,
            "solver_floor": self.solver_floor,
            "noise_floor": self.noise_floor,
            "rounding_floor": self.rounding_floor,
            "recheck": {
                "how": self.recheck_how,
                "floor": self.recheck_floor,
                "lanes": [int(i) for i in self.recheck_lanes],
                "loose_max_rel": [float(x) for x in self.recheck_loose_max_rel],
                "max_rel": [float(x) for x in self.recheck_max_rel],
            },
            "control_max_rel_median": float(np.median(control)) if control.size else None,
            "reference_scale": self.reference_scale,
            "num_steps_median": float(np.median(self.num_steps)),
            "num_steps_max": int(self.num_steps.max()),
            "num_evaluations_median": (
                float(np.median(self.num_evaluations)) if counted.all() else "not counted"
            ),
            "lane_efficiency": self.lane_efficiency,
            "dtype": self.dtype,
            "precision": self.precision,
            "chunk_size": self.chunk_size,
            "num_devices": self.num_devices,
            "compile_time_s": self.compile_time_s,
            "num_programs": self.num_programs,
            "run_time_s": self.run_time_s,
            "samples_per_s": self.num_samples / self.run_time_s if self.run_time_s else None,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to `path` as JSON, atomically (a killed process leaves the old file
        or the new one, never a torn one) and with a sha256 over its bytes
        (`gj.io.write_json_checked`). Arrays keep their dtype and shape; NaN and infinities
        are written as strings.

        **Arguments:** `path`: the file to write (its folder is created).

        **Returns:** the path written.
        """
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is np.ndarray:
                value = np.asarray(value)
                value = {"dtype": str(value.dtype), "shape": value.shape, "data": value.ravel()}
            fields[f.name] = value
        return write_json_checked(path, {"format": FORMAT, "version": VERSION, "fields": fields})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SweepResult":
        """Read a result written by `save`, equal to the one saved (arrays bit for bit).

        **Arguments:** `path`: a file written by `SweepResult.save`.

        **Returns:** the `SweepResult`.

        **Raises:** `ValueError` (naming the file) for a file whose checksum does not match
        (corrupted, edited or truncated), of another format or version, or with missing or
        unknown fields; `OSError` when it cannot be read.
        """
        saved = read_json_checked(path)
        if (
            not isinstance(saved, dict)
            or saved.get("format") != FORMAT
            or saved.get("version") not in READABLE
        ):
            got = (saved.get("format"), saved.get("version")) if isinstance(saved, dict) else None
            raise ValueError(
                f"{path} is not a {FORMAT} file of version {' or '.join(map(str, READABLE))}; "
                "received (format, "
                f"version) = {got}."
            )
        fields, names = saved["fields"], [f.name for f in dataclasses.fields(cls)]
        if saved["version"] == 2:
            fields = {"num_programs": 0, **fields}
        if set(fields) != set(names):
            raise ValueError(
                f"{path} does not hold the fields of a SweepResult: missing "
                f"{sorted(set(names) - set(fields))}, unknown {sorted(set(fields) - set(names))}."
            )
        values = {}
        for f in dataclasses.fields(cls):
            value = fields[f.name]
            if f.type is np.ndarray:
                dtype = np.dtype(value["dtype"])
                # float() reads the strings that NaN and infinities are written as
                data = [float(x) for x in value["data"]] if dtype.kind == "f" else value["data"]
                value = np.asarray(data, dtype=dtype).reshape(value["shape"])
            elif f.type is float:
                value = float(value)
            values[f.name] = value
        return cls(**values)
