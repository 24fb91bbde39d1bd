"""Tasks for the chaos suite (tests/test_chaos.py, bench/chaos.py).

Every execution appends ledger lines (`event task_id attempt pid time [extra]`, the format
of `ledger_app.record`) to STEM_TEST_LEDGER, a file outside the system under test, so the
checker counts what really ran. Fault hooks that must live inside the worker process are
switched on by environment variables, so that the product code stays untouched:

STEM_CHAOS_DIE_AT_START=1  every forked child exits with code 3 before serving (a crash
                           loop of children, e.g. a broken import or a missing device).
STEM_CHAOS_CLOCK=1         the worker's wall clock (time.time, datetime) can be stepped by
                           SIGUSR1 (+STEM_CHAOS_JUMP seconds, default 3600) with
                           time-machine; CLOCK_MONOTONIC is never touched.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import time
from typing import Any

from appliance import Stem, TaskContext

stem = Stem()  # broker from STEM_BROKER_URL, set by the test
LEDGER = os.environ.get("STEM_TEST_LEDGER", "/dev/null")
LONG_LEASE = 30.0  # the default visibility timeout, spelled out for the tests
SHORT_LEASE = 2.0


def append(line: str) -> None:
    # One O_APPEND write per line: atomic for lines this short, even across processes.
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record(ctx: TaskContext, event: str = "done", extra: str = "") -> None:
    append(f"{event} {ctx.id} {ctx.attempt} {os.getpid()} {time.time():.6f} {extra}\n")


# --- well-behaved work -------------------------------------------------------------------
# max_deliveries is high: random child kills must not turn a healthy task into a poison
# pill (that path has its own tests below).


@stem.task("c.work", max_deliveries=1000, visibility_timeout=LONG_LEASE)
def work(ctx: TaskContext, n: int = 0, seconds: float = 0.0) -> int:
    record(ctx, "start")
    if seconds:
        time.sleep(seconds)
    record(ctx)
    return n


@stem.task("c.work_short_lease", max_deliveries=1000, visibility_timeout=SHORT_LEASE)
def work_short_lease(ctx: TaskContext, n: int = 0, seconds: float = 0.0) -> int:
    return work.fn(ctx, n, seconds)


@stem.task("c.limited", hard_time_limit=8, max_retries=0)
def limited(ctx: TaskContext, seconds: float = 1.0) -> str:
    """A healthy task well inside its hard time limit (for wall-clock jumps)."""
    record(ctx, "start")
    time.sleep(seconds)
    record(ctx)
    return "ok"


@stem.task("c.echo", max_retries=0)
def echo(ctx: TaskContext, data: Any = None) -> Any:
    record(ctx)
    return data


@stem.task("c.strict", max_retries=0)
def strict(ctx: TaskContext, a: int) -> int:
    record(ctx)
    return a


# --- poison pills --------------------------------------------------------------------------


@stem.task("c.segfault", max_deliveries=2)
def segfault(ctx: TaskContext) -> None:
    record(ctx, "start")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file per death
    ctypes.string_at(0)  # SIGSEGV


@stem.task("c.exit", max_deliveries=2)
def hard_exit(ctx: TaskContext) -> None:
    record(ctx, "start")
    os._exit(1)


# --- resource hogs -------------------------------------------------------------------------

HOG_LIMIT = 100 * 2**20
HOG_STEP = 20 * 2**20


@stem.task("c.hog", max_memory=HOG_LIMIT, max_retries=0)
def hog(ctx: TaskContext) -> None:
    """Grows 20 MiB every 50 ms (400 MiB/s) and logs its RSS after each step."""
    blocks = []
    while True:
        blocks.append(bytearray(HOG_STEP))  # zero-filled: the pages are really touched
        with open("/proc/self/statm", "rb") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        record(ctx, "rss", str(rss))
        time.sleep(0.05)


# --- bad results and errors ----------------------------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken too")


@stem.task("c.bad_result", max_retries=0)
def bad_result(ctx: TaskContext, kind: str) -> Any:
    record(ctx)
    values: dict[str, Any] = {"object": object(), "set": {1, 2}, "nan": float("nan"),
                              "bytes": b"\xff", "bigint": 2**70}  # fmt: skip
    return values[kind]


@stem.task("c.unprintable_error", max_retries=0)
def unprintable_error(ctx: TaskContext) -> None:
    record(ctx)
    raise Unprintable()


# --- fault hooks inside the worker process ---------------------------------------------------


def _die_at_start() -> None:
    append(f"spawn - 0 {os.getpid()} {time.time():.6f}\n")
    os._exit(3)


if os.environ.get("STEM_CHAOS_DIE_AT_START") == "1":
    os.register_at_fork(after_in_child=_die_at_start)


def _install_clock_jump() -> None:
    import time_machine

    traveller = time_machine.travel(time.time(), tick=True)
    coordinates = traveller.start()
    jump = float(os.environ.get("STEM_CHAOS_JUMP", "3600"))

    def on_signal(signum: int, frame: object) -> None:
        coordinates.shift(jump)
        append(f"jump - 0 {os.getpid()} {time.time():.6f} {jump}\n")

    signal.signal(signal.SIGUSR1, on_signal)


if os.environ.get("STEM_CHAOS_CLOCK") == "1":
    _install_clock_jump()
