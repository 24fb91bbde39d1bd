"""The chaos soak: kill loops for a fixed time, then count (Jepsen's total-queue checker).

    .venv/bin/python bench/chaos.py --store sqlite --seconds 60
    .venv/bin/python bench/chaos.py --store redis  --seconds 60

While a producer process enqueues `c.work` tasks (tests/apps/chaos_app.py) with known
ids, a random child of the supervisor is SIGKILLed every --child-kill-every seconds and
the supervisor itself is SIGKILLed (orphaning its children) and started again every
--supervisor-kill-every seconds. Then the producer stops, a last supervisor drains the
queue, and the ledger the tasks wrote is checked against the producer's log:

    accepted   enqueues that returned OK          completed  accepted ids that ran
    lost       accepted, never ran (must be 0)    run twice  ids that ran more than once
    unexpected ran, never enqueued (must be 0)    kills      SIGKILLs delivered

Exit status 1 if anything was lost or unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos import (  # noqa: E402
    ChildKiller,
    check,
    completions,
    integrity_check,
    kill_session,
    producer_log,
    session_members,
)
from tests.process import WorkerProcess  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

APP = "tests.apps.chaos_app:stem"


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def start_producer(url: str, log: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.chaos", "produce", "--url", url, "--log", str(log),
            "--batch", str(args.batch), "--pause", str(args.pause),
            "--task-seconds", str(args.task_seconds)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log.with_suffix(".out"), "ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


class Workers:
    """The current supervisor, replaced after each SIGKILL."""

    def __init__(self, tmp: Path, url: str, concurrency: int) -> None:
        self.tmp, self.url, self.concurrency = tmp, url, concurrency
        self.all: list[WorkerProcess] = []
        self.current: WorkerProcess | None = None
        self.orphan_wait: list[float] = []

    def start(self) -> None:
        worker = WorkerProcess(self.tmp, self.url, app=APP, concurrency=self.concurrency)
        self.all.append(worker)
        self.current = worker.start()

    def pids(self) -> list[int]:
        current = self.current
        return [current.pid] if current is not None else []

    def kill_supervisor(self) -> None:
        worker, self.current = self.current, None
        assert worker is not None and worker.proc is not None
        os.kill(worker.pid, signal.SIGKILL)
        worker.proc.wait(timeout=10)
        killed = time.monotonic()
        wait_for(lambda: not session_members(worker.pid), timeout=5, interval=0.02)
        self.orphan_wait.append(time.monotonic() - killed)

    def cleanup(self) -> None:
        for worker in self.all:
            if worker.proc is not None:
                kill_session(worker.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(timeout=10)


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix=f"stem-chaos-{args.store}-"))
    server: RedisServer | None = None
    if args.store == "redis":
        server = RedisServer(tmp / "redis")
        server.start()
        url = server.url
    else:
        url = f"sqlite:///{tmp / 'stem.db'}"
    log = tmp / "producer.log"
    workers = Workers(tmp, url, args.concurrency)
    producer: subprocess.Popen[bytes] | None = None
    killer = ChildKiller(workers.pids, interval=args.child_kill_every, seed=args.seed)
    supervisor_kills = 0
    rng = random.Random(args.seed)
    try:
        workers.start()
        producer = start_producer(url, log, args)
        killer.start()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            pause = args.supervisor_kill_every * rng.uniform(0.5, 1.5)
            time.sleep(max(0.0, min(pause, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            workers.kill_supervisor()
            supervisor_kills += 1
            workers.start()
        child_kills = killer.stop()
        kill_session(producer.pid)
        producer.wait(timeout=10)
        attempted, accepted = producer_log(log)
        ledger = tmp / "ledger.txt"
        drained = wait_for(lambda: accepted <= set(completions(ledger)), timeout=args.drain)
        time.sleep(0.5)
        verdict = check(accepted, completions(ledger), attempted)
    finally:
        killer.halt.set()
        if producer is not None:
            kill_session(producer.pid)
        workers.cleanup()
        if server is not None:
            server.stop()
    orphans = max(workers.orphan_wait, default=0.0)
    print(f"store              {args.store}")
    print(f"seconds            {args.seconds:g}")
    print(f"tasks accepted     {verdict.accepted}")
    print(f"tasks completed    {verdict.completed}")
    print(f"lost               {len(verdict.lost)}")
    print(f"run twice          {len(verdict.duplicated)} ({verdict.extra_runs} extra runs)")
    print(f"unexpected         {len(verdict.unexpected)}")
    print(f"unknown outcome    {len(attempted - accepted)} ({len(verdict.recovered)} ran)")
    print(f"kills delivered    {child_kills + supervisor_kills} "
          f"({child_kills} children, {supervisor_kills} supervisors)")  # fmt: skip
    print(f"orphans gone in    {orphans:.2f}s at worst")
    if args.store == "sqlite":
        print(f"integrity_check    {integrity_check(tmp / 'stem.db')}")
    passed = verdict.ok and drained
    if passed and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"drained            {'yes' if drained else 'NO'}"
          + ("" if passed and not args.keep else f"; files kept in {tmp}"))  # fmt: skip
    return 0 if passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--child-kill-every", type=float, default=0.2, metavar="S")
    parser.add_argument("--supervisor-kill-every", type=float, default=10.0, metavar="S")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10, help="tasks per enqueue_many")
    parser.add_argument("--pause", type=float, default=0.05, help="producer pause per batch")
    parser.add_argument("--task-seconds", type=float, default=0.005, help="each task sleeps")
    parser.add_argument("--drain", type=float, default=120.0, help="max seconds to drain")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and logs")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
