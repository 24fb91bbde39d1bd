"""Issue 15: what a hostile task, a hostile host or a careless operator could do, each
pinned by a test against the real `stem worker run` on every store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from appliance import Stem, TaskState
from tests.apps import hostile_app
from tests.conftest import wait_until
from tests.process import ROOT, WorkerProcess, app_on

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


def test_tasks_enqueue_from_their_children_through_many_forks(
    tmp_path: Path, store_url: str
) -> None:
    """A child opens the store itself to enqueue (lineage). It must inherit no SQLite
    state from the supervisor: shared with descriptors pointed at /dev/null, it wrote
    the WAL unlocked ("database disk image is malformed"). Every child is recycled
    after one task, so each enqueue is made by a freshly forked child."""
    from tests.apps import canvas_app

    app = app_on(store_url, canvas_app.stem)
    worker = WorkerProcess(tmp_path, store_url, app="tests.apps.canvas_app:stem",
                           env={"STEM_MAX_TASKS_PER_CHILD": "1"}).start()  # fmt: skip
    try:
        parents = [app.enqueue("c.spawn", {"n": 3}) for _ in range(20)]
        children = [child for parent in parents for child in parent.result(timeout=60)]
        assert [app.handle(c).result(timeout=60) for c in children] == [0, 1, 2] * 20
        assert "malformed" not in worker.read_log()
    finally:
        worker.stop()
        app.close()
    if store_url.startswith("sqlite:"):
        from tests.chaos import integrity_check, sqlite_path

        assert integrity_check(sqlite_path(store_url)) == "ok"


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


def test_garbage_is_charged_to_the_task_that_wrote_it_not_to_the_next(
    stem: Stem, tmp_path: Path, store_url: str
) -> None:
    # Regression (1 run in 10 of the test above): a task scribbled into its pipe and
    # returned before the supervisor read the garbage; the kill was charged to the task
    # its child had started next, which was dead-lettered as a poison pill, and the
    # outcomes that arrived whole before the garbage were dropped (run again).
    worker = WorkerProcess(tmp_path, store_url, app=HOSTILE, concurrency=1)
    try:
        worker.start()
        assert stem.enqueue("t.record").result(timeout=15) == 0  # fast: earns prefetch
        opened = tmp_path / "open"
        gate, scribbler, innocent = stem.enqueue_many([
            ("h.gate", {"path": str(opened)}), ("h.scribble", {}), ("h.innocent", {}),
        ])  # fmt: skip
        # All three held by the one child: the gate runs, the others wait in its pipe.
        assert wait_until(lambda: bool(worker.ledger_lines("start")), timeout=15)
        assert wait_until(lambda: _ready(stem) == 0, timeout=15), worker.read_log()
        worker.signal(signal.SIGSTOP)  # the supervisor reads nothing until SIGCONT
        try:
            opened.touch()  # gate ends, scribbler writes its garbage and ends, innocent runs
            assert wait_until(lambda: len(worker.ledger_lines("start")) == 2, timeout=15)
        finally:
            worker.signal(signal.SIGCONT)
        assert innocent.result(timeout=30) == "fine", worker.read_log()
        assert gate.result(timeout=15) == "opened"
        assert wait_until(lambda: scribbler.state() is TaskState.DEAD, timeout=30)
        gate_runs = [line for line in worker.ledger_lines() if line[1] == gate.id]
        assert len(gate_runs) == 1, "the gate's outcome, read whole before the garbage, was lost"
    finally:
        worker.stop()


def _ready(stem: Stem) -> int:
    return sum(stats.ready for stats in stem.broker.queue_stats())


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


def test_wake_ups_still_arrive_after_redis_restarts(tmp_path: Path) -> None:
    # Regression: the supervisor's epoll kept watching the wake-up socket of the first
    # connection, so after a Redis restart every enqueue waited for the 1 s poll.
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "restarting")
    server.start()
    try:
        stem = app_on(server.url, hostile_app.stem)
        worker = WorkerProcess(tmp_path, server.url, app=HOSTILE).start()
        try:
            assert stem.enqueue("t.record", args={"n": 0}).result(timeout=15) == 0
            server.restart()
            assert stem.enqueue("t.record", args={"n": 1}).result(timeout=15) == 1
            time.sleep(2.5)  # the subscriber retries once a second after a failure
            took = []
            for n in range(7):
                started = time.monotonic()
                assert stem.enqueue("t.record", args={"n": n}).result(timeout=15) == n
                took.append(time.monotonic() - started)
                time.sleep(0.05)
            # Six of seven within 0.3 s: on the poll alone, each waits 0-1 s.
            assert sorted(took)[5] < 0.3, (took, worker.read_log())
        finally:
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


# --- leases: the claim's own, and one that was lost ---------------------------------------


def test_a_short_visibility_timeout_holds_from_the_claim_on(tmp_path: Path, store_url: str) -> None:
    # Regression: the claim leased 30 s whatever the task's visibility_timeout, so a task
    # with visibility_timeout=2 was not taken over while its supervisor was stopped.
    stem = app_on(store_url, hostile_app.stem)
    first = WorkerProcess(tmp_path, store_url, app=HOSTILE, concurrency=1).start()
    second = WorkerProcess(tmp_path, store_url, app=HOSTILE, concurrency=1)
    try:
        stem.enqueue("h.short_lease", args={"seconds": 8})
        assert wait_until(lambda: len(first.ledger_lines("start")) == 1, timeout=15)
        first.signal(signal.SIGSTOP)  # its child runs on; nobody renews the lease
        second.start()
        assert wait_until(lambda: len(first.ledger_lines("start")) == 2, timeout=8), (
            second.read_log()
        )  # taken over within the 2 s lease (plus a recovery sweep)
        first.signal(signal.SIGCONT)
        assert wait_until(lambda: "another worker may" in first.read_log(), timeout=15), (
            first.read_log()
        )
    finally:
        first.signal(signal.SIGCONT)
        first.stop()
        second.stop()
        stem.close()


# --- big batches, and producers told about unsafe Redis settings -------------------------


def test_a_big_enqueue_many_never_locks_the_worker_out(tmp_path: Path, sqlite_url: str) -> None:
    # Regression: enqueue_many of 5,000 rows made the supervisor log "ERROR store failed
    # (other writers kept the database locked ...)".
    stem = app_on(sqlite_url, hostile_app.stem)
    worker = WorkerProcess(tmp_path, sqlite_url, app=HOSTILE).start()
    try:
        stem.enqueue_many([("t.record", {"n": i}) for i in range(3000)])  # keeps it settling
        stem.enqueue_many([("t.record", {"n": i}) for i in range(12_000)])
        assert wait_until(lambda: len(worker.ledger_lines()) >= 15_000, timeout=90)
        assert " ERROR " not in worker.read_log(), worker.read_log()
    finally:
        worker.stop()
        stem.close()


def test_a_batch_too_big_to_store_says_how_much_was_stored(sqlite_url: str) -> None:
    from appliance.errors import BrokerFull

    stem = app_on(sqlite_url, hostile_app.stem)
    batch = [("t.record", {"n": i, "pad": "x" * 300}) for i in range(5000)]
    conn = stem.broker._db.conn  # type: ignore[attr-defined]  # max_page_count is per connection
    before = conn.execute("PRAGMA page_count").fetchone()[0]
    stem.enqueue_many(batch)  # how many pages one chunk takes
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + (pages - before) * 3 // 2}")  # 1.5 chunks
    with pytest.raises(BrokerFull) as failed:
        stem.enqueue_many(batch * 3)
    assert failed.value.__notes__ == [
        "5000 of 15000 tasks were stored before this failure (in chunks of 5000); the rest were not"
    ]
    assert sum(s.ready for s in stem.broker.queue_stats()) == 5000 + 5000
    stem.close()


def test_a_producer_is_warned_once_when_redis_may_drop_its_tasks(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        stem = app_on(redis_url, hostile_app.stem)
        with caplog.at_level("WARNING", logger="stem.redis"):
            for _ in range(3):
                stem.enqueue("t.record")
        warnings = [r.message for r in caplog.records if "maxmemory-policy" in r.message]
        assert len(warnings) == 1 and "allkeys-lru" in warnings[0]
        stem.close()
    finally:
        client.config_set("maxmemory-policy", "noeviction")


# --- 7. an unusable /dev/shm or state directory --------------------------------------------


def run_in_private_mounts(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a shell script in a mount namespace of its own (root only, as in CI)."""
    return subprocess.run(
        ["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip


def can_unshare() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return os.geteuid() == 0 and probe.returncode == 0


needs_mount_namespace = pytest.mark.skipif(
    not can_unshare(), reason="needs root and a mount namespace to give the worker a broken "
    "/dev/shm or a read-only state directory (CI runs as root)",
)  # fmt: skip


@needs_mount_namespace
@pytest.mark.parametrize("shm", ["full", "read-only"])
def test_a_worker_runs_on_when_dev_shm_is_unusable(tmp_path: Path, shm: str) -> None:
    # Regression: a full /dev/shm killed the supervisor with SIGBUS and no log line; a
    # read-only one with a traceback.
    mount = (
        "mount -t tmpfs -o size=64k tmpfs /dev/shm && "
        "dd if=/dev/zero of=/dev/shm/fill bs=4k count=100 2>/dev/null; "
        if shm == "full" else "mount -t tmpfs -o ro tmpfs /dev/shm && "
    )  # fmt: skip
    db = tmp_path / "stem.db"
    script = (
        f"{mount}STEM_BROKER_URL=sqlite:///{db} {sys.executable} -c "
        '\'from tests.apps import hostile_app as h; print(h.stem.enqueue("t.record", '
        'args={"n": 3}).id)\' && '
        f"STEM_BROKER_URL=sqlite:///{db} timeout --preserve-status -s TERM 8 "
        f"{sys.executable} -m appliance worker run --app tests.apps.hostile_app:stem "
        "--concurrency 1; echo exit=$?"
    )
    result = run_in_private_mounts(script, tmp_path)
    assert "exit=0" in result.stdout, result.stdout + result.stderr
    assert "using private shared memory" in result.stderr
    task_id = result.stdout.split()[0]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM results WHERE task_id = ?", (task_id,)).fetchone()
    conn.close()


@needs_mount_namespace
def test_a_read_only_state_directory_is_a_logged_config_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = state / "stem.db"
    script = (
        f"STEM_BROKER_URL=sqlite:///{db} {sys.executable} -c "
        "'from tests.apps import hostile_app as h; h.stem.enqueue(\"t.record\")' && "
        f"mount --bind -o ro {state} {state} && STEM_BROKER_URL=sqlite:///{db} "
        f"timeout -s KILL 20 {sys.executable} -m appliance worker run "
        "--app tests.apps.hostile_app:stem --concurrency 1; echo exit=$?"
    )
    result = run_in_private_mounts(script, tmp_path)
    assert "exit=78" in result.stdout, result.stdout + result.stderr
    assert "cannot start" in result.stderr and str(db) in result.stderr
