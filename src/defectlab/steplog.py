"""Per-step training curves without the methods knowing about MLflow.

A training loop calls ``log_step("loss/<loop>", value, step, total)`` where it computes its loss.
``tracking.stage_run`` installs a sink (buffered, sent with ``MlflowClient.log_batch``) for the
duration of the stage's run; without one (tests, benchmarks, tracking off) the call does nothing.
A curve of ``total`` steps is thinned to at most ``MAX_POINTS`` evenly spaced steps (plus the last
one), so a long training does not send a row per step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

MAX_POINTS = 1000

Sink = Callable[[str, float, int], None]
_sink: Sink | None = None


def every(total: int | None, max_points: int = MAX_POINTS) -> int:
    """Log every k-th step of a ``total``-step curve (1 when the length is unknown)."""
    return max(1, math.ceil(total / max_points)) if total else 1


def log_step(name: str, value: float, step: int, total: int | None = None) -> None:
    """Record ``value`` at ``step`` (0-based) of curve ``name``, if a sink is installed and the step is kept."""
    if _sink is None:
        return
    if step % every(total) == 0 or (total is not None and step == total - 1):
        _sink(name, float(value), int(step))


@contextlib.contextmanager
def sink(fn: Sink) -> Iterator[None]:
    """Send ``log_step`` calls to ``fn(name, value, step)`` while the block runs (the previous sink after)."""
    global _sink
    before, _sink = _sink, fn
    try:
        yield
    finally:
        _sink = before
