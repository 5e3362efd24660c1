"""The training-run scaffold: what the four training experiments (`regularizers`,
`teleportation`, `orbit_cost`, `gauge_fixing`) share, beside `_common.run_checks` for the check
suites.

A `TrainingRun` owns one experiment's run directory: it refuses a directory that holds a run of
another config, draws one progress bar over every optimiser step of the run (advanced by each
`gj.train` call's `on_chunk`, and past a stage a resumed run finds finished), and ends the run
with the files every experiment writes (`results.json`, the figures drawn from it,
`metrics.jsonl`) and the summary the CLI prints. Resume is `gj.train`'s: each stage trains in its
own directory under the run, from its checkpoint.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from gaugejax import io

from ._common import BAR_POSITION, experiment_summary, write_outputs


class TrainingRun:
    """One run of a training experiment (a context manager: the bar closes on any exit).

    **Arguments:**

    - `name`: the experiment's name; `config`: its frozen dataclass config.
    - `run_dir`: the run directory (created if needed).
    - `total_steps`: optimiser steps of the whole run, the progress bar's length.

    **Raises:** `ValueError` when `run_dir` holds a run of another config (a resume must use
    the run's own config, or a new directory).
    """

    def __init__(self, name: str, config, run_dir: str | Path, total_steps: int):
        self.name, self.config, self.dir = name, config, Path(run_dir)
        self.start = time.perf_counter()
        io.lock_config(self.dir / "run_config.json", config, name)
        self.done = 0
        # its line is the one `reproduce` gives this thread (experiments may run side by side)
        self.bar = tqdm(
            total=total_steps, desc=name, unit="step", position=BAR_POSITION.get(), leave=True
        )

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # a divergence or an interruption leaves the terminal clean

    @contextlib.contextmanager
    def stage(self, label: str, steps: int) -> Iterator[Callable[[int, dict], None]]:
        """The `on_chunk` of a stage of `steps` optimiser steps (`with run.stage(...) as
        on_chunk: gj.train(..., on_chunk=on_chunk)`): the bar shows the stage and its loss; at
        the end it stands after the stage, also when a resumed run found it finished."""
        offset = self.done

        def on_chunk(step: int, metrics: dict) -> None:
            self.bar.set_postfix_str(f"{label}, loss {metrics['loss']:.3g}", refresh=False)
            self.bar.update(offset + step - self.bar.n)

        yield on_chunk
        self.done = offset
        self.advance(steps)

    def advance(self, steps: int, label: str = "") -> None:
        """The bar past a stage of `steps` steps that reports no chunks (e.g. a sweep)."""
        self.done += steps
        if label:
            self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(self.done - self.bar.n)

    def finish(
        self,
        results: dict,
        plot: Callable[[dict, Path, object], list[Path]],
        records: list[dict],
        claims: list | Callable[[dict], list],
        **extra,
    ) -> dict:
        """Write `results.json`, the figures `plot` draws from it and `metrics.jsonl` (one line
        per record, written once: a resumed run does not append them again); returns the run's
        summary. `claims` may be a function of the saved results (what a reader of
        `results.json` would compute)."""
        self.bar.close()
        saved, figures = write_outputs(self.dir, results, records, plot, self.config)
        rows = claims(saved) if callable(claims) else claims
        return experiment_summary(self.name, rows, figures, self.dir, self.start, **extra)
