"""The demo app behind `stem demo`: one task per behaviour the Quick start shows.

Run a worker for it with `stem worker run --app appliance.demo:stem`; the broker comes
from the config or `STEM_BROKER_URL` like any app.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from appliance import Stem, TaskContext

log = logging.getLogger(__name__)

stem = Stem()


@stem.task("demo.add")
def add(ctx: TaskContext, x: int, y: int) -> int:
    """Fast: the bulk of the burst."""
    return x + y


@stem.task("demo.progress")
def progress(ctx: TaskContext, steps: int = 4, pause: float = 0.05) -> dict[str, Any]:
    """Reports progress a few times, as a long task would."""
    for step in range(1, steps + 1):
        time.sleep(pause)
        ctx.progress(100 * step / steps, {"step": step})
    return {"steps": steps}


@stem.task("demo.flaky", max_retries=3, retry_backoff=(0.2, 1.0, 1.0))
def flaky(ctx: TaskContext) -> dict[str, int]:
    """Fails on attempts 0 and 1, succeeds on attempt 2: retries at work."""
    if ctx.attempt < 2:
        log.info("flaky: failing on purpose (attempt %d)", ctx.attempt)
        raise ConnectionError(f"flaky upstream (attempt {ctx.attempt})")
    return {"attempt": ctx.attempt}


@stem.task("demo.always_fails", max_retries=2, retry_backoff=(0.1, 0.2, 1.0))
def always_fails(ctx: TaskContext) -> None:
    """Fails every attempt, so it exhausts its retries and lands in the DLQ."""
    raise ValueError(f"always fails (attempt {ctx.attempt})")


@stem.task("demo.sleepy", hard_time_limit=1, max_retries=0)
def sleepy(ctx: TaskContext, seconds: float = 30.0) -> None:
    """Sleeps past its hard time limit: the supervisor kills its child (DLQ,
    TimeLimitExceeded) and a fresh child takes the slot."""
    time.sleep(seconds)
