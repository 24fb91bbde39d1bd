"""Tasks for process-level tests. Each execution appends one line to a ledger file kept
outside the system under test, so tests count what really ran (Jepsen-style)."""

from __future__ import annotations

import os
import signal
import time

from appliance import Stem, TaskContext

stem = Stem()  # broker from STEM_BROKER_URL, set by the test
LEDGER = os.environ.get("STEM_TEST_LEDGER", "/dev/null")


def record(ctx: TaskContext, event: str = "done") -> None:
    # One O_APPEND write per line: atomic for lines this short, even across processes.
    line = f"{event} {ctx.id} {ctx.attempt} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@stem.task("t.record")
def record_task(ctx: TaskContext, n: int = 0) -> int:
    record(ctx)
    return n


@stem.task("t.slow", visibility_timeout=5)
def slow(ctx: TaskContext, seconds: float = 1.0) -> None:
    record(ctx, "start")
    time.sleep(seconds)
    record(ctx)


@stem.task("t.hang", hard_time_limit=1, max_retries=0)
def hang(ctx: TaskContext) -> None:
    record(ctx, "start")
    time.sleep(60)


@stem.task("t.fails_until_flag", max_retries=1, retry_backoff=(0.05, 0.1, 0.0))
def fails_until_flag(ctx: TaskContext, flag: str) -> str:
    record(ctx, "start")
    if not os.path.exists(flag):
        raise RuntimeError("flag file missing")
    record(ctx)
    return "ok"


@stem.task("t.suicide", max_deliveries=2)
def suicide(ctx: TaskContext) -> None:
    record(ctx, "start")
    os.kill(os.getpid(), signal.SIGKILL)


@stem.task("t.hog", max_memory="150MB", max_retries=0)
def hog(ctx: TaskContext) -> None:
    record(ctx, "start")
    blocks = []
    while True:  # grows ~50 MB every 20 ms until the supervisor kills the child
        blocks.append(bytearray(50 * 2**20))
        time.sleep(0.02)


@stem.task("t.pid")
def pid(ctx: TaskContext) -> int:
    record(ctx)
    return os.getpid()


@stem.task("t.long", visibility_timeout=1)
def long_task(ctx: TaskContext, seconds: float = 3.0) -> None:
    """Runs three times its visibility timeout: the lease must be renewed, not lost."""
    record(ctx, "start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.heartbeat()
        time.sleep(0.1)
    record(ctx)


@stem.task("t.renewed", visibility_timeout=1)
def renewed(ctx: TaskContext, seconds: float = 3.0) -> None:
    """Its lease is renewed three times a second: renewals hit the store while it fails."""
    record(ctx, "start")
    time.sleep(seconds)
    record(ctx)


@stem.task("t.slow_then_ok", max_retries=1, retry_backoff=(1.0, 1.0, 0.0))
def slow_then_ok(ctx: TaskContext, seconds: float = 1.0) -> str:
    """Runs `seconds`, fails on its first attempt, succeeds on its second: every state of
    a retried task lasts long enough to be read (STARTED, RETRY, STARTED, SUCCESS)."""
    record(ctx, "start")
    time.sleep(seconds)
    if ctx.attempt == 0:
        raise RuntimeError("first attempt fails")
    record(ctx)
    return "ok"


@stem.task("t.gc_frozen")
def gc_frozen(ctx: TaskContext) -> int:
    """How many objects the child inherited frozen (`gc.freeze`) from its supervisor."""
    import gc

    return gc.get_freeze_count()
