"""Issue 15: what a hostile task, a hostile host or a careless operator could do, each
pinned by a test against the real `stem worker run` on every store."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from appliance import Stem, TaskState
from tests.apps import hostile_app
from tests.conftest import wait_until
from tests.process import WorkerProcess, app_on

pytestmark = pytest.mark.process
HOSTILE = "tests.apps.hostile_app:stem"


@pytest.fixture
def stem(store_url: str) -> Iterator[Stem]:
    app = app_on(store_url, hostile_app.stem)
    yield app
    app.close()


@pytest.fixture
def worker(tmp_path: Path, store_url: str) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(tmp_path, store_url, app=HOSTILE)
    yield proc
    proc.stop()


def grandchildren(worker: WorkerProcess) -> list[int]:
    return [
        int(parts[0].split("-")[1])
        for parts in (
            line for line in worker.ledger_lines_all() if line[0].startswith("grandchild-")
        )
    ]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- 1. inherited descriptors -----------------------------------------------------------


def test_a_task_holds_no_descriptor_of_the_stores(
    stem: Stem, worker: WorkerProcess, store_url: str
) -> None:
    worker.start()
    held = stem.enqueue("h.fds").result(timeout=15)
    assert not [t for t in held if ".db" in t or t.startswith("socket:")], held
    assert not [t for t in held if t.startswith("/dev/shm/")], held  # the mapping suffices


def test_garbage_written_to_every_descriptor_corrupts_nothing(
    stem: Stem, worker: WorkerProcess, store_url: str, tmp_path: Path
) -> None:
    # Regression: os.write(6, ...) from a task overwrote the SQLite header ("file is not a
    # database", all queued work gone); on Redis it made the supervisor exit.
    worker.start()
    assert stem.enqueue("h.write6").result(timeout=15) in (
        "written",
        "refused: [Errno 9] Bad file descriptor",
    )
    scribbler = stem.enqueue("h.scribble")
    handles = stem.enqueue_many([("t.record", {"n": i}) for i in range(50)])
    assert [h.result(timeout=30) for h in handles] == list(range(50))
    # It wrote into its own pipe too: its child was killed and the task dead-lettered.
    assert wait_until(lambda: scribbler.state().is_final, timeout=30)
    assert worker.proc is not None and worker.proc.poll() is None, worker.read_log()
    if store_url.startswith("sqlite"):
        path = store_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert stem.enqueue("t.record", args={"n": 7}).result(timeout=15) == 7


# --- 2. grandchildren -------------------------------------------------------------------


@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "setsid"])
def test_a_time_limit_kill_takes_the_tasks_subprocesses(
    stem: Stem, worker: WorkerProcess, setsid: bool
) -> None:
    worker.start()
    handle = stem.enqueue("h.grandchild_overruns", args={"setsid": setsid})
    assert wait_until(lambda: handle.state() is TaskState.DEAD, timeout=15), worker.read_log()
    (pid,) = grandchildren(worker)
    assert wait_until(lambda: gone(pid), timeout=2), f"grandchild {pid} outlived its task"


@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "setsid"])
def test_a_cold_shutdown_leaves_no_task_process_behind(
    stem: Stem, worker: WorkerProcess, setsid: bool
) -> None:
    worker.start()
    stem.enqueue("h.grandchild_runs", args={"setsid": setsid})
    assert wait_until(lambda: bool(worker.ledger_lines("start")), timeout=15)
    (pid,) = grandchildren(worker)
    worker.signal(signal.SIGQUIT)
    assert worker.wait(timeout=15) == 0
    assert wait_until(lambda: gone(pid), timeout=2), f"grandchild {pid} outlived the worker"


def test_nothing_of_a_task_survives_a_sigkilled_supervisor(
    stem: Stem, worker: WorkerProcess
) -> None:
    worker.start()
    stem.enqueue("h.grandchild_runs", args={"setsid": True})
    assert wait_until(lambda: bool(worker.ledger_lines("start")), timeout=15)
    (pid,) = grandchildren(worker)
    worker.signal(signal.SIGKILL)
    worker.wait(timeout=5)
    assert wait_until(lambda: gone(pid), timeout=3), f"grandchild {pid} outlived the worker"


def test_a_daemon_a_task_leaves_behind_is_killed(stem: Stem, worker: WorkerProcess) -> None:
    worker.start()
    stem.enqueue("h.daemonize").result(timeout=15)
    (pid,) = grandchildren(worker)
    assert wait_until(lambda: gone(pid), timeout=8), f"daemon {pid} survived"
    assert stem.enqueue("t.record", args={"n": 1}).result(timeout=15) == 1


# --- 3. a deleted or replaced database; a Redis that lost its data ------------------------


def test_a_deleted_database_stops_the_worker_loudly(tmp_path: Path, sqlite_url: str) -> None:
    # Regression: the worker kept serving the deleted inode without a word, while
    # producers created a new file whose tasks stayed PENDING forever.
    stem = app_on(sqlite_url, hostile_app.stem)
    stem.enqueue("t.record", args={"n": 1})  # creates the file
    worker = WorkerProcess(tmp_path, sqlite_url, app=HOSTILE).start()
    try:
        path = Path(sqlite_url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        assert worker.wait(timeout=10) == 69, worker.read_log()
        assert "was deleted while this worker had it open" in worker.read_log()
    finally:
        worker.stop()
        stem.close()


def test_a_redis_that_restarts_empty_is_reported_and_served_on(tmp_path: Path) -> None:
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "volatile", appendonly=False)
    server.start()
    try:
        stem = app_on(server.url, hostile_app.stem)
        worker = WorkerProcess(tmp_path, server.url, app=HOSTILE).start()
        assert stem.enqueue("t.record", args={"n": 1}).result(timeout=15) == 1
        stem.enqueue("h.grandchild_runs")  # one delivery in flight when the data goes
        assert wait_until(lambda: bool(worker.ledger_lines("start")), timeout=15)
        server.restart()  # no AOF, no snapshot: every key is gone
        assert wait_until(lambda: "lost its data" in worker.read_log(), timeout=15), (
            worker.read_log()
        )
        log = worker.read_log()
        assert "1 deliveries this worker held were lost" in log
        assert "NOSCRIPT" not in log  # scripts are reloaded without a word
        assert stem.enqueue("t.record", args={"n": 2}).result(timeout=15) == 2
        worker.stop()
        stem.close()
    finally:
        server.stop()


# --- 4. a Redis at maxmemory with noeviction ---------------------------------------------


def test_a_full_redis_refuses_enqueues_clearly_and_still_drains(tmp_path: Path) -> None:
    # Regression: every claim failed (its scripts write), and a worker started on a full
    # Redis refused to start ("failed recover: command not allowed when used memory >
    # 'maxmemory'").
    import redis as redis_py

    from appliance.errors import BrokerFull
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "full")
    server.start()
    try:
        client = redis_py.Redis.from_url(server.url)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 3 * 2**20)
        client.config_set("maxmemory-policy", "noeviction")
        stem = app_on(server.url, hostile_app.stem)
        queued = 0
        with pytest.raises(BrokerFull, match="out of memory"):
            for _ in range(10_000):
                stem.enqueue_many([("t.record", {"n": i, "pad": "x" * 2000}) for i in range(50)])
                queued += 50
        assert queued > 0
        worker = WorkerProcess(tmp_path, server.url, app=HOSTILE).start()  # starts anyway
        try:
            assert wait_until(lambda: len(worker.ledger_lines()) >= queued, timeout=60), (
                worker.read_log()
            )
            assert stem.enqueue("t.record", args={"n": 5}).result(timeout=15) == 5
        finally:
            worker.stop()
            stem.close()
    finally:
        server.stop()
