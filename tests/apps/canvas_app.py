"""Tasks for the options and canvas tests: arithmetic steps for chains and chords, a
failing step, a unique task, rate-limited tasks. Every run appends a line to the ledger
(`ledger_app.record`), so tests count what really ran."""

from __future__ import annotations

import os
import time
from typing import Any

from appliance import Reject, Stem, TaskContext
from tests.apps.ledger_app import record

stem = Stem()  # broker from STEM_BROKER_URL, set by the test
SLOW_S = float(os.environ.get("STEM_TEST_SLOW_S", "0"))  # chaos: give kills a chance


@stem.task("c.add", max_retries=3, retry_backoff=(0.05, 0.2, 0.0))
def add(ctx: TaskContext, x: int, y: int = 0) -> int:
    if SLOW_S:
        time.sleep(SLOW_S)
    record(ctx, "add")
    return x + y


@stem.task("c.double")
def double(ctx: TaskContext, previous: int) -> int:
    record(ctx, "double")
    return previous * 2


@stem.task("c.total", max_retries=3, retry_backoff=(0.05, 0.2, 0.0))
def total(ctx: TaskContext, previous: list[int], tag: str = "") -> dict[str, Any]:
    record(ctx, f"total:{tag}")
    return {"sum": sum(previous), "count": len(previous), "values": previous}


@stem.task("c.fail", max_retries=0)
def fail(ctx: TaskContext, previous: Any = None, why: str = "broken on purpose") -> None:
    record(ctx, "fail")
    raise Reject(why)


@stem.task("c.note")
def note(ctx: TaskContext, previous: Any = None, tag: str = "") -> dict[str, Any]:
    """A link target: records what it was given and by whom."""
    record(ctx, f"note:{tag}")
    return {"previous": previous, "parent": ctx.parent_id, "root": ctx.root_id}


@stem.task("c.spawn")
def spawn(ctx: TaskContext, n: int) -> list[str]:
    """Enqueues `n` children from inside a task (lineage)."""
    return [stem.enqueue("c.add", args={"x": i}).id for i in range(n)]


@stem.task("c.unique", unique=True, unique_for=60)
def unique(ctx: TaskContext, key: str, seconds: float = 0.0) -> str:
    record(ctx, "unique")
    time.sleep(seconds)
    return key


@stem.task("c.limited", rate_limit="10/s", max_retries=0)
def limited(ctx: TaskContext, n: int = 0) -> int:
    record(ctx, "limited")
    return n


@stem.task("c.per_tenant", rate_limit="5/s", rate_limit_key="tenant", max_retries=0)
def per_tenant(ctx: TaskContext, n: int = 0) -> int:
    record(ctx, f"tenant:{ctx.headers.get('tenant', '')}")
    return n


@stem.task("c.fast")
def fast(ctx: TaskContext, n: int = 0) -> int:
    record(ctx, "fast")
    return n


@stem.task("c.flaky", max_retries=2, retry_backoff=(0.05, 0.05, 0.0))
def flaky(ctx: TaskContext, x: int = 0) -> int:
    """Fails its first attempt: a retry is written by the supervisor (signing keeps)."""
    record(ctx, "flaky")
    if ctx.attempt == 0:
        raise RuntimeError("the first attempt fails on purpose")
    return x
