"""Pinning `reproduce`'s child processes to cores: each child its own share of this process's
cores (Linux; elsewhere nothing is pinned)."""

import contextlib
import os


def set_cores(pid: int | str, cores: set[int]) -> None:
    """Run every thread of process `pid` on `cores` (threads it starts later inherit it)."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(thread), cores)


def unpin(pid: int) -> None:
    """Give a pinned child every core this process may use (nothing where nothing is pinned)."""
    with contextlib.suppress(AttributeError, FileNotFoundError, ProcessLookupError):
        set_cores(pid, os.sched_getaffinity(0))


def child_cores(workers: int) -> list[set[int] | None]:
    """The cores each child slot runs on: this process's cores dealt out evenly (one each for
    two workers on two cores) while there are at least as many cores as workers, else no
    pinning (None). Unpinned, two children on two cores each spread their XLA:CPU threads over
    both cores and slow each other down: regularizers took 275 s alone on one core and 421 s
    beside the other experiments (2-core machine, 2026-12-06)."""
    try:
        available = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity to set
        return [None] * workers
    if len(available) < workers:
        return [None] * workers
    return [set(available[slot::workers]) for slot in range(workers)]
