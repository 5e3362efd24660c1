"""The XLA programs a call compiles, counted from JAX's own compile events.

JAX reports every program it compiles (a `jit` call at new shapes, an AOT `.compile()`, and
each eager `jax.numpy` op at a new shape, which is a program of its own) through
`jax.monitoring`. `compiles()` counts them for the calls made inside it, on this thread, with
the seconds spent tracing, lowering and compiling them: what a sweep reports as
`num_programs` and `compile_time_s`.
"""

import contextlib
import threading
from collections.abc import Iterator

import jax


_BACKEND = "/jax/core/compile/backend_compile_duration"  # one per program compiled
_STAGES = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    _BACKEND,
)
_ACTIVE = threading.local()  # the counters open on this thread (events fire on it)
_REGISTERED = []


class Compiles:
    """What the calls inside one `compiles()` block compiled: `programs` (a count) and
    `seconds` (the tracing, lowering and XLA compilation of those programs, as JAX reports
    them; a trace that compiles nothing, e.g. `jax.eval_shape`, is not counted)."""

    def __init__(self):
        self.programs = 0
        self.seconds = 0.0
        self.pending = 0.0  # traced and lowered, not compiled yet


def _listener(event: str, duration: float, **_) -> None:
    if event not in _STAGES:
        return
    for counter in getattr(_ACTIVE, "stack", ()):
        # a program is traced, lowered, then compiled: its stages count when it compiles
        counter.pending += duration
        if event == _BACKEND:
            counter.programs += 1
            counter.seconds += counter.pending
            counter.pending = 0.0


@contextlib.contextmanager
def compiles() -> Iterator[Compiles]:
    """Count the XLA programs compiled inside this block on this thread (nested blocks each
    count theirs).

    **Returns:** a `Compiles` filled in as the block runs.
    """
    if not _REGISTERED:  # once per process: listeners cannot be removed one by one
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _REGISTERED.append(True)
    counter = Compiles()
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
        stack = _ACTIVE.stack = []
    stack.append(counter)
    try:
        yield counter
    finally:
        stack.remove(counter)
