"""Tasks that attack their own worker, for the hardening tests: descriptors they should
not hold, subprocesses that try to outlive them. Each records what it did in the ledger
(`STEM_TEST_LEDGER`) so the test can find the processes it started."""

from __future__ import annotations

import os
import subprocess
import sys

from appliance import Stem, TaskContext
from tests.apps.ledger_app import record

stem = Stem()  # broker from STEM_BROKER_URL, set by the test

# A grandchild that ignores SIGTERM and would sleep for five minutes.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"


@stem.task("h.fds")
def fds(ctx: TaskContext) -> list[str]:
    """What this task's process holds open (targets of /proc/self/fd)."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:  # the listing's own descriptor
            continue
    return targets


@stem.task("h.write6")
def write6(ctx: TaskContext) -> str:
    """The finding as reported: garbage written to descriptor 6."""
    try:
        os.write(6, b"garbage" * 64)
    except OSError as exc:
        return f"refused: {exc}"
    return "written"


@stem.task("h.scribble", max_deliveries=2, max_retries=0)
def scribble(ctx: TaskContext) -> int:
    """Garbage into every descriptor number it can write to (its own pipes included)."""
    written = 0
    for fd in range(3, 1024):
        try:
            os.write(fd, b"\x00garbage" * 64)
            written += 1
        except OSError:
            continue
    return written


@stem.task("h.gate")
def gate(ctx: TaskContext, path: str) -> str:
    """Holds its child until `path` exists, so a test can line tasks up behind it."""
    import time

    record(ctx, "start")
    while not os.path.exists(path):
        time.sleep(0.01)
    record(ctx)
    return "opened"


@stem.task("h.innocent", max_deliveries=1, max_retries=0)
def innocent(ctx: TaskContext, seconds: float = 1.0) -> str:
    """Does nothing wrong; a single death charged to it would dead-letter it."""
    import time

    record(ctx, "start")
    time.sleep(seconds)
    record(ctx)
    return "fine"


def _start_stubborn(ctx: TaskContext, setsid: bool) -> None:
    child = subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=setsid)
    record(ctx, f"grandchild-{child.pid}")


@stem.task("h.grandchild_overruns", hard_time_limit=1, max_retries=0)
def grandchild_overruns(ctx: TaskContext, setsid: bool = False) -> None:
    _start_stubborn(ctx, setsid)
    import time

    time.sleep(60)


@stem.task("h.grandchild_runs", max_retries=0)
def grandchild_runs(ctx: TaskContext, setsid: bool = False) -> None:
    _start_stubborn(ctx, setsid)
    record(ctx, "start")
    import time

    time.sleep(60)


@stem.task("h.daemonize")
def daemonize(ctx: TaskContext) -> None:
    """The classic double fork: the daemon's parent exits at once, so it is adopted."""
    middle = subprocess.Popen([
        sys.executable, "-c",
        "import subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {STUBBORN!r}], start_new_session=True); "
        "print(p.pid)",
    ], stdout=subprocess.PIPE)  # fmt: skip
    out, _ = middle.communicate()
    record(ctx, f"grandchild-{int(out)}")


@stem.task("t.record")
def ok(ctx: TaskContext, n: int = 0, pad: str = "") -> int:
    """A plain task; `pad` makes its message as big as a test needs."""
    record(ctx)
    return n


@stem.task("h.short_lease", visibility_timeout=2, max_retries=0)
def short_lease(ctx: TaskContext, seconds: float = 8.0) -> None:
    import time

    record(ctx, "start")
    time.sleep(seconds)
    record(ctx)
