"""The worker against a Redis that is not there yet, or goes away mid-run."""

from __future__ import annotations

import time
from pathlib import Path

from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import WorkerProcess, app_on
from tests.redis_server import RedisServer


def test_worker_waits_for_a_redis_that_is_down_at_start(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")  # port chosen, server not started
    worker = WorkerProcess(tmp_path, server.url).launch()
    try:
        assert wait_until(lambda: "broker unavailable" in worker.read_log(), timeout=15)
        assert worker.proc is not None and worker.proc.poll() is None  # waiting, not crashed
        server.start()
        worker.wait_ready(timeout=30)
        stem = app_on(server.url, ledger_app.stem)
        assert stem.enqueue("t.record", {"n": 7}).result(timeout=10) == 7
    finally:
        worker.stop()
        server.stop()


def test_worker_warns_when_redis_could_lose_acknowledged_tasks(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False)
    server.start()
    worker = WorkerProcess(tmp_path, server.url)
    try:
        worker.start()
        assert "appendonly" in worker.read_log()
    finally:
        worker.stop()
        server.stop()


def test_redis_killed_mid_run_loses_nothing(
    tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    stem = app_on(redis_url, ledger_app.stem)
    handles = stem.enqueue_many([("t.record", {"n": i}) for i in range(5000)])
    worker = WorkerProcess(tmp_path, redis_url).start()
    try:
        assert wait_until(lambda: len(worker.ledger_lines()) >= 1000, timeout=30)
        redis_server.kill()  # SIGKILL; the AOF (appendfsync always) survives
        time.sleep(1.0)
        redis_server.start()
        assert wait_until(lambda: len(worker.completions()) >= 5000, timeout=90), worker.read_log()[
            -3000:
        ]
        done = worker.completions()
        assert {h.id for h in handles} == set(done)  # nothing lost
        duplicates = sum(n - 1 for n in done.values())
        print(f"duplicates after a Redis SIGKILL: {duplicates}")
        assert duplicates <= 2 * 2 * 9  # at most what the pool held: children x depth, twice
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
