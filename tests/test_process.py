"""Process-level behaviour of the real `stem worker run`, on every store, by counting."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import Stem, TaskState
from appliance.states import DeadLetterReason
from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import WorkerProcess, app_on

pytestmark = pytest.mark.process


@pytest.fixture
def worker(tmp_path: Path, store_url: str) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(tmp_path, store_url)
    yield proc
    proc.stop()


def test_burst_of_2000_completes_exactly_once(stem: Stem, worker: WorkerProcess) -> None:
    handles = stem.enqueue_many([("t.record", {"n": i}) for i in range(2000)])
    worker.start()
    assert wait_until(lambda: len(worker.ledger_lines()) >= 2000, timeout=60), worker.read_log()
    time.sleep(0.3)  # anything extra would show up now
    done = worker.completions()
    assert len(done) == 2000 and set(done.values()) == {1}
    assert {h.id for h in handles} == set(done)
    assert handles[-1].result(timeout=10) == 1999
    assert all(s.ready == s.in_flight == s.dead == 0 for s in stem.broker.queue_stats())


def test_hard_time_limit_kills_within_a_second_and_replaces_child(
    stem: Stem, worker: WorkerProcess
) -> None:
    worker.start()
    before = {p.pid for p in worker.children()}
    handle = stem.enqueue("t.hang")
    assert wait_until(lambda: handle.state() is TaskState.DEAD, timeout=10), worker.read_log()
    started = float(worker.ledger_lines("start")[0][4])
    info = handle.info()
    assert info is not None and info.error is not None
    assert info.error.type == "TimeLimitExceeded"
    assert info.finished_at is not None and info.finished_at - started < 1.0 + 1.0
    assert wait_until(lambda: len(worker.children()) == 2, timeout=5)
    after = {p.pid for p in worker.children()}
    assert len(after - before) == 1  # exactly the killed child was replaced
    assert wait_until(lambda: stem.broker.dlq_count() == 1)  # results are written first
    entry = stem.broker.dlq_list()[0]
    assert entry.reason == DeadLetterReason.EXHAUSTED and entry.error_type == "TimeLimitExceeded"
    assert stem.enqueue("t.record", {"n": 5}).result(timeout=10) == 5  # pool still serves


def test_sigkill_of_a_child_mid_task_loses_nothing(stem: Stem, worker: WorkerProcess) -> None:
    worker.start()
    handles = [stem.enqueue("t.slow", {"seconds": 1.0}) for _ in range(4)]
    assert wait_until(lambda: len(worker.ledger_lines("start")) >= 1, timeout=10)
    victim = int(worker.ledger_lines("start")[0][3])
    signal_pid(victim, signal.SIGKILL)
    for handle in handles:
        assert handle.result(timeout=30) is None
    done = worker.completions()
    assert set(done) == {h.id for h in handles}
    killed_task = worker.ledger_lines("start")[0][1]
    assert done[killed_task] == 1  # it never finished on the killed child


def test_warm_shutdown_finishes_running_and_returns_the_rest(
    stem: Stem, worker: WorkerProcess, tmp_path: Path, store_url: str
) -> None:
    worker.start()
    handles = [stem.enqueue("t.slow", {"seconds": 0.5}) for _ in range(10)]
    assert wait_until(lambda: len(worker.ledger_lines("start")) >= 2, timeout=10)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    started = {p[1] for p in worker.ledger_lines("start")}
    finished = set(worker.completions())
    assert started == finished  # every task that started on a warm shutdown finished
    left = sum(s.ready + s.delayed + s.in_flight for s in stem.broker.queue_stats())
    assert left == 10 - len(finished) and left > 0
    again = WorkerProcess(tmp_path, store_url).start()
    try:
        for handle in handles:
            handle.result(timeout=30)
    finally:
        again.stop()
    assert set(again.completions()) == {h.id for h in handles}


@pytest.mark.parametrize("how", ["sigterm-twice", "sigquit"])
def test_cold_shutdown_returns_running_tasks_at_once(
    stem: Stem, worker: WorkerProcess, tmp_path: Path, store_url: str, how: str
) -> None:
    worker.start()
    handles = [stem.enqueue("t.slow", {"seconds": 5}) for _ in range(3)]
    assert wait_until(lambda: len(worker.ledger_lines("start")) >= 2, timeout=10)
    stopped_at = time.monotonic()
    if how == "sigquit":
        worker.signal(signal.SIGQUIT)
    else:
        worker.signal(signal.SIGTERM)
        time.sleep(0.2)
        worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    assert time.monotonic() - stopped_at < 3
    stats = stem.broker.queue_stats()
    assert sum(s.ready for s in stats) == 3 and sum(s.in_flight for s in stats) == 0
    again = WorkerProcess(tmp_path, store_url, concurrency=3).start()
    try:
        for handle in handles:
            handle.result(timeout=30)
    finally:
        again.stop()


def test_dlq_replay_runs_the_task_again(stem: Stem, worker: WorkerProcess, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    worker.start()
    handle = stem.enqueue("t.fails_until_flag", {"flag": str(flag)})
    assert wait_until(lambda: handle.state() is TaskState.DEAD, timeout=15), worker.read_log()
    assert len(worker.ledger_lines("start")) == 2  # first attempt + one retry
    assert wait_until(lambda: stem.broker.dlq_count() == 1)
    [entry] = stem.broker.dlq_list()
    assert entry.reason == "exhausted" and entry.attempts == 2
    flag.touch()
    assert stem.broker.dlq_replay() == [handle.id]
    stem.backend.forget([handle.id])
    assert handle.result(timeout=15) == "ok"
    assert stem.broker.dlq_count() == 0


def test_bad_messages_go_to_the_dlq_and_the_worker_keeps_running(
    stem: Stem, worker: WorkerProcess
) -> None:
    worker.start()
    unknown = stem.enqueue("t.nobody_knows_me", {"x": 1})
    assert wait_until(lambda: unknown.state() is TaskState.DEAD, timeout=10), worker.read_log()
    assert wait_until(lambda: stem.broker.dlq_count() == 1)
    reasons = {e.reason for e in stem.broker.dlq_list()}
    assert reasons == {DeadLetterReason.UNKNOWN_TASK}
    assert stem.enqueue("t.record", {"n": 1}).result(timeout=10) == 1


def test_poison_pill_ends_in_the_dlq_and_the_pool_keeps_serving(
    stem: Stem, worker: WorkerProcess
) -> None:
    worker.start()
    pill = stem.enqueue("t.suicide")
    others = [stem.enqueue("t.record", {"n": i}) for i in range(20)]
    assert wait_until(lambda: pill.state() is TaskState.DEAD, timeout=20), worker.read_log()
    assert wait_until(lambda: stem.broker.dlq_count() == 1)
    [entry] = stem.broker.dlq_list()
    assert entry.reason == DeadLetterReason.POISON_PILL
    assert len(worker.ledger_lines("start")) == 2  # max_deliveries=2 child deaths, then DLQ
    assert [h.result(timeout=10) for h in others] == list(range(20))


def test_memory_limit_kills_the_task(stem: Stem, worker: WorkerProcess) -> None:
    worker.start()
    handle = stem.enqueue("t.hog")
    assert wait_until(lambda: handle.state() is TaskState.DEAD, timeout=15), worker.read_log()
    info = handle.info()
    assert info is not None and info.error is not None
    assert info.error.type == "MemoryLimitExceeded"
    assert wait_until(lambda: len(worker.children()) == 2, timeout=5)


def signal_pid(pid: int, signum: int) -> None:
    import os

    os.kill(pid, signum)


def test_children_are_recycled_after_max_tasks_per_child(
    stem: Stem, tmp_path: Path, store_url: str
) -> None:
    worker = WorkerProcess(
        tmp_path, store_url, concurrency=1, env={"STEM_MAX_TASKS_PER_CHILD": "3"}
    ).start()
    try:
        pids = [stem.enqueue("t.pid").result(timeout=10) for _ in range(9)]
    finally:
        worker.stop()
    assert len(set(pids)) == 3  # a fresh child every 3 tasks
    assert [pids.count(p) for p in dict.fromkeys(pids)] == [3, 3, 3]


def test_a_stopped_child_is_killed_after_its_heartbeat_timeout_and_the_task_rerun(
    stem: Stem, tmp_path: Path, store_url: str
) -> None:
    worker = WorkerProcess(
        tmp_path, store_url, concurrency=1, env={"STEM_HEARTBEAT_TIMEOUT": "1.5"}
    ).start()
    try:
        handle = stem.enqueue("t.slow", {"seconds": 1.0})
        assert wait_until(lambda: len(worker.ledger_lines("start")) == 1, timeout=10)
        stopped = int(worker.ledger_lines("start")[0][3])
        signal_pid(stopped, signal.SIGSTOP)  # frozen: no heartbeat, no progress
        assert handle.result(timeout=20) is None
        assert stopped not in {p.pid for p in worker.children()}
        starts = worker.ledger_lines("start")
        assert len(starts) == 2 and starts[1][3] != str(stopped)
    finally:
        worker.stop()


def test_a_task_longer_than_its_visibility_timeout_runs_once_under_heartbeats(
    stem: Stem, worker: WorkerProcess
) -> None:
    worker.start()
    handle = stem.enqueue("t.long", {"seconds": 3.0})
    assert handle.result(timeout=20) is None
    time.sleep(1.5)  # a lost lease would have been redelivered by now
    assert len(worker.ledger_lines("start")) == 1
    assert worker.completions()[handle.id] == 1


def test_the_supervisor_publishes_its_heartbeat_record_and_removes_it_on_exit(
    stem: Stem, worker: WorkerProcess
) -> None:
    worker.start()
    assert wait_until(lambda: len(stem.backend.list_workers()) == 1, timeout=10)
    [beat] = stem.backend.list_workers()
    assert (beat.pid, beat.concurrency, beat.queues) == (worker.pid, 2, ("default",))
    assert stem.enqueue("t.record", {"n": 1}).result(timeout=10) == 1
    worker.stop()
    assert stem.backend.list_workers() == []


def test_time_limits_hold_while_a_producer_holds_the_sqlite_write_lock(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The supervisor waits at most 0.25 s for other writers, then backs off and retries:
    # a long write lock elsewhere (a 100k-row batch enqueue) must not stall its loop.
    import sqlite3

    stem = app_on(sqlite_url, ledger_app.stem)
    worker = WorkerProcess(tmp_path, sqlite_url).start()
    handle = stem.enqueue("t.hang")
    assert wait_until(lambda: len(worker.ledger_lines("start")) == 1, timeout=10)
    started = float(worker.ledger_lines("start")[0][4])
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # every writer now waits for this one
    try:
        assert wait_until(lambda: len(worker.children()) == 2 and _replaced(worker), timeout=5)
        killed_at = time.time()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    try:
        assert killed_at - started < 1.0 + 1.5  # the 1 s hard limit, the loop not stalled
        assert wait_until(lambda: handle.state() is TaskState.DEAD, timeout=10)
    finally:
        worker.stop()
        stem.close()


def _replaced(worker: WorkerProcess) -> bool:
    starts = worker.ledger_lines("start")
    return bool(starts) and int(starts[0][3]) not in {p.pid for p in worker.children()}


def test_a_config_with_two_pools_serves_each_pools_queues(tmp_path: Path, sqlite_url: str) -> None:
    config = tmp_path / "stem.toml"
    config.write_text(
        '[[pools]]\nname = "fast"\nqueues = ["default"]\nconcurrency = 2\n\n'
        '[[pools]]\nname = "io"\nqueues = ["io"]\nconcurrency = 1\n'
    )
    stem = app_on(sqlite_url, ledger_app.stem)
    worker = WorkerProcess(
        tmp_path, sqlite_url, concurrency=None, env={"STEM_CONFIG": str(config)}
    ).start()
    try:
        assert wait_until(lambda: len(worker.children()) == 3, timeout=10)
        fast = [stem.enqueue("t.pid", queue="default") for _ in range(6)]
        io = [stem.enqueue("t.pid", queue="io") for _ in range(3)]
        fast_pids = {h.result(timeout=10) for h in fast}
        io_pids = {h.result(timeout=10) for h in io}
    finally:
        worker.stop()
        stem.close()
    assert len(io_pids) == 1 and not io_pids & fast_pids  # the io pool's one child


def test_children_inherit_the_supervisors_heap_frozen(stem: Stem, worker: WorkerProcess) -> None:
    """The supervisor freezes its start-up heap before it forks (`hygiene.freeze_heap`):
    a full collection of it stalled the loop (18 ms on Redis), and in a child it would
    write to every inherited object. What the child sees frozen came from its parent."""
    worker.start()
    frozen = stem.enqueue("t.gc_frozen").result(timeout=20)
    assert frozen > 10_000, worker.read_log()  # redis-py or sqlite-utils, the app, the stores
