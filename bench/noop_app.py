"""The benchmark's no-op task: one fixed-width O_APPEND record per run (start time),
so completion is counted from a file, never from the broker under test."""

from __future__ import annotations

import os
import time

from appliance import Stem, TaskContext

stem = Stem()  # STEM_BROKER_URL is set by bench/drain.py
_fd: list[int] = []


def _marks() -> int:
    if not _fd or _fd[0] < 0:
        _fd[:] = [os.open(os.environ["BENCH_MARK_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)]
    return _fd[0]


@stem.task("bench.noop")
def noop(ctx: TaskContext, seq: int = -1, enq_ts: float = 0.0) -> None:
    started = time.time()
    if seq < 0:
        os.write(_marks(), b"%.6f\n" % started)
    else:
        os.write(_marks(), b"%d %.6f %.6f\n" % (seq, enq_ts, started))
