"""Shared pieces of the chaos suite and `bench/chaos.py`: a Jepsen-style total-queue
checker over a ledger kept outside the system under test, kill loops, process-session
inspection, and a producer process that logs what it tried and what was acknowledged.

The producer is also a command (the "kill everything" test SIGKILLs it mid-enqueue):

    python -m tests.chaos produce --url URL --log FILE [--batch N] [--pause S]
                                  [--limit N] [--seconds S] [--task-seconds S]

It writes `try <ids...>` before each `enqueue_many` and `ok <ids...>` after it returned,
one O_APPEND write each, so an id is *accepted* once its `ok` line exists and *unknown*
when only its `try` line does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from tests.process import WorkerProcess


@dataclass(frozen=True)
class Verdict:
    """The total-queue checker's result (jepsen.ra's lost / unexpected / duplicated /
    recovered), plus the counts the bench prints."""

    accepted: int  # enqueues that returned OK
    completed: int  # accepted task ids that ran to their end at least once
    lost: frozenset[str]  # accepted, never completed
    unexpected: frozenset[str]  # completed but never even attempted
    duplicated: frozenset[str]  # completed more than once
    extra_runs: int  # completions beyond the first, summed over all ids
    recovered: frozenset[str]  # outcome unknown at enqueue, yet completed

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unexpected

    def summary(self) -> str:
        return (
            f"accepted={self.accepted} completed={self.completed} lost={len(self.lost)} "
            f"unexpected={len(self.unexpected)} duplicated={len(self.duplicated)} "
            f"extra_runs={self.extra_runs} recovered={len(self.recovered)}"
        )


def check(
    accepted: Iterable[str], done: Counter[str], attempted: Iterable[str] | None = None
) -> Verdict:
    """Jepsen's total-queue checker. `done` counts completions per task id (ledger);
    `attempted` is every id an enqueue was tried for (defaults to `accepted`)."""
    ok = set(accepted)
    tried = ok | set(attempted or ())
    ran = set(done)
    duplicated = frozenset(i for i, n in done.items() if n > 1)
    return Verdict(
        accepted=len(ok),
        completed=len(ok & ran),
        lost=frozenset(ok - ran),
        unexpected=frozenset(ran - tried),
        duplicated=duplicated,
        extra_runs=sum(done[i] - 1 for i in duplicated),
        recovered=frozenset((tried - ok) & ran),
    )


# --- ledgers -----------------------------------------------------------------------------------


def ledger_lines(path: Path, event: str | None = None) -> list[list[str]]:
    """`event task_id attempt pid time [extra]` lines, split; a torn last line is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 5 and (event is None or parts[0] == event):
            rows.append(parts)
    return rows


def completions(path: Path) -> Counter[str]:
    return Counter(parts[1] for parts in ledger_lines(path, "done"))


def interrupted_runs(path: Path) -> int:
    """Runs that started and never finished on the same child (killed under the task)."""
    started = {(p[1], p[2], p[3]) for p in ledger_lines(path, "start")}
    finished = {(p[1], p[2], p[3]) for p in ledger_lines(path, "done")}
    return len(started - finished)


def producer_log(path: Path) -> tuple[set[str], set[str]]:
    """(attempted, accepted) task ids from a producer log (`try`/`ok` lines)."""
    attempted: set[str] = set()
    accepted: set[str] = set()
    if not path.exists():
        return attempted, accepted
    for line in path.read_text(errors="replace").splitlines():
        if not line.endswith(";"):
            continue  # torn by a SIGKILL mid-write
        kind, _, ids = line[:-1].partition(" ")
        target = accepted if kind == "ok" else attempted if kind == "try" else None
        if target is not None:
            target.update(ids.split())
    return attempted, accepted


# --- processes -------------------------------------------------------------------------------


def session_members(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of session `sid`: what a SIGKILLed supervisor left."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (our subprocesses lead their own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    for proc in session_members(sid):  # anything that changed its process group
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            proc.kill()


def kill_workers(workers: Iterable[WorkerProcess]) -> None:
    """Fixture teardown: SIGKILL each started worker's whole session and reap it."""
    for worker in workers:
        if worker.proc is not None:
            kill_session(worker.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=10)


class ChildKiller(threading.Thread):
    """SIGKILLs a random child of the supervisor(s) every `interval` seconds; `kills`
    counts the signals actually delivered (the target existed)."""

    def __init__(
        self, supervisor_pids: Callable[[], list[int]], *, interval: float = 0.2,
        seed: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.supervisor_pids = supervisor_pids
        self.interval = interval
        self.kills = 0
        self.victims: list[int] = []
        self.halt = threading.Event()
        self.random = random.Random(seed)

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            children: list[psutil.Process] = []
            for pid in self.supervisor_pids():
                with contextlib.suppress(psutil.Error):
                    children += psutil.Process(pid).children()
            if not children:
                continue
            victim = self.random.choice(children)
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills += 1
            self.victims.append(victim.pid)

    def stop(self) -> int:
        self.halt.set()
        self.join(timeout=5)
        return self.kills


@dataclass
class Stopwatch:
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


# --- SQLite --------------------------------------------------------------------------------


def integrity_check(db: Path) -> str:
    """`PRAGMA integrity_check` on a fresh connection (after every process is dead)."""
    conn = sqlite3.connect(db)
    try:
        return "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


# --- the producer command ---------------------------------------------------------------------


def produce(
    url: str, log: Path, *, batch: int, pause: float, limit: int, seconds: float,
    task_seconds: float = 0.0,
) -> None:  # fmt: skip
    """Enqueue `c.work` tasks with known ids until killed (or `limit`/`seconds` reached)."""
    from appliance.app import EnqueueRequest
    from tests.apps import chaos_app
    from tests.process import app_on

    app = app_on(url, chaos_app.stem)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sent = 0
    deadline = time.monotonic() + seconds if seconds else None
    while (not limit or sent < limit) and (deadline is None or time.monotonic() < deadline):
        ids = [uuid.uuid4().hex for _ in range(batch)]
        os.write(fd, f"try {' '.join(ids)};\n".encode())
        try:
            app.enqueue_many(
                EnqueueRequest("c.work", {"n": sent + i, "seconds": task_seconds}, task_id=task_id)
                for i, task_id in enumerate(ids)
            )
        except Exception as exc:  # broker down (a restart in progress): outcome unknown
            os.write(fd, f"err {type(exc).__name__}: {exc}\n".encode())
            time.sleep(0.1)
            continue
        os.write(fd, f"ok {' '.join(ids)};\n".encode())
        sent += batch
        if pause:
            time.sleep(pause)
    app.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos")
    sub = parser.add_subparsers(dest="command", required=True)
    prod = sub.add_parser("produce")
    prod.add_argument("--url", required=True)
    prod.add_argument("--log", required=True, type=Path)
    prod.add_argument("--batch", type=int, default=10)
    prod.add_argument("--pause", type=float, default=0.0)
    prod.add_argument("--limit", type=int, default=0)
    prod.add_argument("--seconds", type=float, default=0.0, help="stop after (0: never)")
    prod.add_argument("--task-seconds", type=float, default=0.0, help="each task sleeps")
    args = parser.parse_args()
    produce(args.url, args.log, batch=args.batch, pause=args.pause, limit=args.limit,
            seconds=args.seconds, task_seconds=args.task_seconds)  # fmt: skip


if __name__ == "__main__":
    main()
