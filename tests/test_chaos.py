"""The chaos suite: "nothing accepted is ever lost", proven by killing real processes and
counting (issue 4). Every test runs the real `python -m appliance worker run` in its own
session, on every store where the fault applies; tasks write a ledger outside the system
under test and `tests.chaos.check` (Jepsen's total-queue checker) counts lost,
unexpected and duplicated tasks. Bigger soaks run with `--slow`; `bench/chaos.py` runs
the kill loops for a fixed time."""

from __future__ import annotations

import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psutil
import pytest
import redis
import time_machine

from appliance import Stem, TaskState
from appliance.broker.protocol import Consumer
from appliance.config import Settings
from appliance.errors import BrokerFull, PayloadTooLarge
from appliance.states import DeadLetterReason, SlotState
from appliance.stores.redis.keys import Keys
from appliance.worker.heartbeat import HeartbeatTable
from appliance.worker.limits import check_slot
from tests.apps import chaos_app
from tests.chaos import (
    ChildKiller,
    check,
    completions,
    integrity_check,
    interrupted_runs,
    kill_session,
    kill_workers,
    ledger_lines,
    producer_log,
    session_members,
    sqlite_path,
)
from tests.conftest import wait_until
from tests.process import ROOT, WorkerProcess, app_on
from tests.redis_server import RedisServer

pytestmark = pytest.mark.process

APP = "tests.apps.chaos_app:stem"
Spawn = Callable[..., WorkerProcess]


@pytest.fixture
def stem(store_url: str) -> Iterator[Stem]:
    app = app_on(store_url, chaos_app.stem)
    yield app
    app.close()


@pytest.fixture
def spawn(tmp_path: Path, store_url: str) -> Iterator[Spawn]:
    """Builds supervisors on this store (one shared ledger); SIGKILLs their sessions at
    the end, whatever the test did to them."""
    made: list[WorkerProcess] = []

    def make(concurrency: int = 2, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, store_url, app=APP, concurrency=concurrency, env=env)
        made.append(worker)
        return worker

    yield make
    kill_workers(made)


def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger.txt"


def settled(stem: Stem) -> bool:
    """Nothing waiting, nothing leased (dead letters are allowed)."""
    return all(s.ready == s.delayed == s.in_flight == 0 for s in stem.broker.queue_stats())


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- 1. random child SIGKILLs -----------------------------------------------------------------


def run_under_child_kills(stem: Stem, spawn: Spawn, tmp_path: Path, n: int, seconds: float,
                          timeout: float) -> None:  # fmt: skip
    handles = stem.enqueue_many([("c.work", {"n": i, "seconds": seconds}) for i in range(n)])
    accepted = {h.id for h in handles}
    worker = spawn(concurrency=2).start()
    killer = ChildKiller(lambda: [worker.pid], interval=0.2, seed=4)
    killer.start()
    try:
        finished = wait_until(
            lambda: accepted <= set(completions(ledger(tmp_path))), timeout=timeout, interval=0.2
        )
    finally:
        kills = killer.stop()
    assert finished, (check(accepted, completions(ledger(tmp_path))).summary(), worker.read_log())
    assert wait_until(lambda: settled(stem), timeout=10)
    time.sleep(0.3)  # a late duplicate would show up now
    verdict = check(accepted, completions(ledger(tmp_path)))
    assert verdict.ok, verdict.summary()
    assert verdict.completed == n
    assert verdict.extra_runs <= kills, (verdict.summary(), kills)
    assert kills >= seconds * n / 2 / 0.2 * 0.5  # the loop really ran for the whole drain
    assert interrupted_runs(ledger(tmp_path)) >= 1  # and some kills landed mid-task
    assert stem.broker.dlq_count() == 0
    assert worker.proc is not None and worker.proc.poll() is None  # the supervisor survived


def test_random_child_sigkill_every_200ms_loses_nothing(
    stem: Stem, spawn: Spawn, tmp_path: Path
) -> None:
    run_under_child_kills(stem, spawn, tmp_path, n=2000, seconds=0.01, timeout=100)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_random_child_sigkill_soak_5000_tasks(stem: Stem, spawn: Spawn, tmp_path: Path) -> None:
    run_under_child_kills(stem, spawn, tmp_path, n=5000, seconds=0.01, timeout=400)


# --- 2. supervisor SIGKILL --------------------------------------------------------------------


def test_supervisor_sigkill_orphans_exit_and_its_leases_return(
    stem: Stem, spawn: Spawn, tmp_path: Path, store_url: str
) -> None:
    sqlite = is_sqlite(store_url)
    # SQLite: the 30 s lease must NOT be waited for (the owner is provably dead).
    # Redis: a 2 s lease keeps the test short whichever way the adapter recovers.
    name = "c.work" if sqlite else "c.work_short_lease"
    handles = stem.enqueue_many([(name, {"n": i, "seconds": 0.2}) for i in range(40)])
    accepted = {h.id for h in handles}
    first = spawn(concurrency=2).start()
    children = {p.pid for p in first.children()}
    assert len(children) == 2
    assert children <= {p.pid for p in session_members(first.pid)}  # what we look for
    assert wait_until(lambda: len(completions(ledger(tmp_path))) >= 4, timeout=20)

    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert first.wait(timeout=5) == -signal.SIGKILL
    assert wait_until(lambda: not session_members(first.pid), timeout=3, interval=0.02), [
        p.as_dict(["pid", "name", "status"]) for p in session_members(first.pid)
    ]
    orphans_gone_after = time.monotonic() - killed_at
    assert orphans_gone_after < 1.5, f"orphans lived {orphans_gone_after:.2f}s"
    assert not any(alive(pid) for pid in children)

    leased = {m.task_id for m in stem.broker.list_messages(limit=100) if m.state == "leased"}
    assert leased, "the kill should have caught tasks in flight"
    restarted = time.monotonic()
    spawn(concurrency=2).start()
    budget = 10.0 if sqlite else chaos_app.SHORT_LEASE + 15.0
    assert wait_until(lambda: leased <= set(completions(ledger(tmp_path))), timeout=budget), (
        f"tasks leased by the dead supervisor not run within {budget}s of the restart"
    )
    took = time.monotonic() - restarted
    if sqlite:
        assert took < chaos_app.LONG_LEASE / 3, f"waited {took:.1f}s: the lease was not freed"
    assert wait_until(lambda: accepted <= set(completions(ledger(tmp_path))), timeout=30)
    assert wait_until(lambda: settled(stem), timeout=10)
    verdict = check(accepted, completions(ledger(tmp_path)))
    assert verdict.ok, verdict.summary()
    # Only what the dead supervisor held can run twice (finished but not yet settled).
    assert verdict.extra_runs <= len(leased), verdict.summary()


# --- 3. SIGKILL everything --------------------------------------------------------------------


def start_producer(url: str, log: Path, limit: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.chaos", "produce", "--url", url, "--log", str(log),
            "--batch", "20", "--pause", "0.005", "--limit", str(limit)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log.with_suffix(".out"), "ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def test_sigkill_everything_and_restart_loses_nothing_accepted(
    spawn: Spawn, tmp_path: Path, store_url: str, request: pytest.FixtureRequest
) -> None:
    server: RedisServer | None = (
        None if is_sqlite(store_url) else request.getfixturevalue("redis_server")
    )
    log = tmp_path / "producer.log"
    rng = random.Random(3)
    for _ in range(3):
        if server is not None and server.proc is None:
            server.start()
        worker = spawn(concurrency=2).start()
        before = len(producer_log(log)[1])
        producer = start_producer(store_url, log, limit=600)
        try:
            assert wait_until(lambda b=before: len(producer_log(log)[1]) >= b + 60, timeout=20), (
                log.with_suffix(".out").read_text()
            )
            time.sleep(rng.uniform(0.1, 0.6))
        finally:  # everything at once: the broker first, then its clients
            if server is not None:
                server.kill()
            kill_session(worker.pid)
            kill_session(producer.pid)
            producer.wait(timeout=10)
            assert worker.proc is not None
            worker.proc.wait(timeout=10)

    attempted, accepted = producer_log(log)
    assert len(accepted) >= 180
    if server is not None:
        server.start()
    else:
        assert integrity_check(sqlite_path(store_url)) == "ok"
    final = spawn(concurrency=2).start()
    done = wait_until(lambda: accepted <= set(completions(ledger(tmp_path))), timeout=60,
                      interval=0.2)  # fmt: skip
    verdict = check(accepted, completions(ledger(tmp_path)), attempted)
    assert done and verdict.ok, (verdict.summary(), sorted(verdict.lost)[:5], final.read_log())
    final.stop()
    if server is None:
        assert integrity_check(sqlite_path(store_url)) == "ok"


# --- 4. poison pills and crash loops ----------------------------------------------------------


def test_poison_pills_end_in_the_dlq_while_the_pool_serves(
    stem: Stem, spawn: Spawn, tmp_path: Path
) -> None:
    worker = spawn(concurrency=2).start()
    pills = [stem.enqueue("c.segfault"), stem.enqueue("c.exit")]
    others = stem.enqueue_many([("c.work", {"n": i, "seconds": 0.02}) for i in range(40)])
    for pill in pills:
        assert wait_until(lambda p=pill: p.state() is TaskState.DEAD, timeout=20), worker.read_log()
    assert [h.result(timeout=20) for h in others] == list(range(40))
    assert wait_until(lambda: stem.broker.dlq_count() == 2)
    entries = {e.task_id: e for e in stem.broker.dlq_list()}
    for pill in pills:
        entry = entries[pill.id]
        assert entry.reason == DeadLetterReason.POISON_PILL, entry
        assert entry.error_type == "WorkerLostError"
        starts = [p for p in ledger_lines(ledger(tmp_path), "start") if p[1] == pill.id]
        assert len(starts) == 2  # max_deliveries=2: exactly two child deaths, then the DLQ
    log = worker.read_log()
    assert "signal SIGSEGV" in log and "exit code 1" in log
    assert set(completions(ledger(tmp_path)).values()) == {1}
    assert wait_until(lambda: settled(stem), timeout=10)
    assert wait_until(lambda: len(worker.children()) == 2, timeout=5)


def test_a_crash_loop_of_children_backs_off_instead_of_spinning(
    tmp_path: Path, sqlite_url: str
) -> None:
    # Store-independent (the children die before they could touch a broker): SQLite only.
    worker = WorkerProcess(tmp_path, sqlite_url, app=APP, concurrency=2,
                           env={"STEM_CHAOS_DIE_AT_START": "1"})  # fmt: skip
    try:
        worker.start()
        time.sleep(6)
        spawns = [float(p[4]) for p in ledger_lines(ledger(tmp_path), "spawn")]
        assert worker.proc is not None and worker.proc.poll() is None, worker.read_log()
        # Without back-off two slots respawn thousands of times in 6 s.
        assert 4 <= len(spawns) <= 24, len(spawns)
        gaps = [b - a for a, b in itertools.pairwise(spawns)]
        assert max(gaps) >= 1.0, gaps  # the delay grows
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0
    finally:
        kill_session(worker.pid)


# --- 5. memory hog ----------------------------------------------------------------------------


def test_memory_hog_is_killed_near_its_limit(stem: Stem, spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn(concurrency=2).start()
    handle = stem.enqueue("c.hog")
    assert wait_until(lambda: handle.state() is TaskState.DEAD, timeout=15), worker.read_log()
    info = handle.info()
    assert info is not None and info.error is not None
    assert info.error.type == "MemoryLimitExceeded"
    assert wait_until(lambda: stem.broker.dlq_count() == 1)
    [entry] = stem.broker.dlq_list()
    assert entry.error_type == "MemoryLimitExceeded" and "max_memory" in entry.message
    # The machine is never pushed far: the child dies within a few scans of crossing the
    # limit (it grows 400 MiB/s; the supervisor samples RSS every 0.25 s).
    peak = max(int(p[5]) for p in ledger_lines(ledger(tmp_path), "rss"))
    assert chaos_app.HOG_LIMIT < peak < chaos_app.HOG_LIMIT + 300 * 2**20, peak / 2**20
    assert wait_until(lambda: len(worker.children()) == 2, timeout=5)
    assert stem.enqueue("c.work", {"n": 7}).result(timeout=10) == 7
    assert wait_until(lambda: settled(stem), timeout=10)


# --- 6. disk full (SQLite) --------------------------------------------------------------------


def test_disk_full_refuses_enqueue_keeps_what_is_stored_and_resumes(
    tmp_path: Path, sqlite_url: str
) -> None:
    stem = app_on(sqlite_url, chaos_app.stem)
    worker = WorkerProcess(tmp_path, sqlite_url, app=APP, concurrency=2)
    try:
        held = stem.enqueue_many([("c.work", {"n": i, "seconds": 0.3}) for i in range(6)])
        worker.start()
        assert wait_until(lambda: len(ledger_lines(ledger(tmp_path), "start")) >= 2, timeout=10)
        conn = stem.broker._db.conn  # type: ignore[attr-defined]  # max_page_count is per connection
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        big = [("c.echo", {"data": "x" * 4000}) for _ in range(100)]

        with pytest.raises(BrokerFull, match="no space left") as raised:
            stem.enqueue_many(big)
        assert "nothing was written" in str(raised.value)
        singles = []
        with pytest.raises(BrokerFull):
            for _ in range(100):  # single enqueues until the last free page is gone
                singles.append(stem.enqueue("c.echo", {"data": "y" * 4000}))

        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert not conn.in_transaction
        # The worker (its own connection) keeps running and settling what it holds.
        assert [h.result(timeout=20) for h in held] == list(range(6))
        assert all(h.result(timeout=20) == "y" * 4000 for h in singles)

        conn.execute(f"PRAGMA max_page_count = {pages * 1000}")  # space returns
        later = stem.enqueue_many(big)
        assert all(h.result(timeout=20) == "x" * 4000 for h in later)
        assert wait_until(lambda: settled(stem), timeout=10)
        assert worker.proc is not None and worker.proc.poll() is None
        # All or none: what was refused left no row behind that could run later.
        time.sleep(1.2)  # one idle poll of the worker
        assert sum(completions(ledger(tmp_path)).values()) == len(held) + len(singles) + 100
    finally:
        worker.stop()
        stem.close()
    assert integrity_check(sqlite_path(sqlite_url)) == "ok"


# --- 7. wall-clock jumps ----------------------------------------------------------------------


def test_a_delayed_task_is_never_claimed_earlier_than_not_before_minus_the_jump(
    stem: Stem,
) -> None:
    handle = stem.enqueue("c.work", countdown=600)
    message = stem.broker.find_message(handle.id)
    assert message is not None and message.not_before is not None
    not_before = message.not_before
    me = Consumer.this_process()
    broker = stem.broker
    with time_machine.travel(time.time(), tick=True) as clock:
        clock.shift(-7200)  # backwards: late, never early
        assert broker.claim(["default"], 5, consumer=me, lease=30) == []
        clock.shift(7200 + 300)  # +300 s: still 300 s before not_before
        assert broker.claim(["default"], 5, consumer=me, lease=30) == []
        assert time.time() < not_before
        clock.shift(3600)  # +3900 s: due on the jumped clock, early by less than the jump
        [delivery] = broker.claim(["default"], 5, consumer=me, lease=30)
        assert time.time() >= not_before
    real_now = time.time()
    assert real_now >= not_before - 3900
    assert orjson.loads(delivery.payload)["id"] == handle.id


def test_time_limits_and_heartbeats_ignore_wall_clock_jumps() -> None:
    table = HeartbeatTable(1)
    try:
        slot = table.slots[0]
        now = time.monotonic()
        slot.state, slot.started, slot.last_beat = SlotState.RUNNING, now, now
        slot.hard_deadline = now + 5
        for jump in (3600, -7200, 86400):
            with time_machine.travel(time.time() + jump, tick=True):
                assert check_slot(slot, time.monotonic(), 10.0) is None  # healthy
        reason = check_slot(slot, now + 6, 10.0)  # but the limit itself still works
        assert reason is not None and reason.error_type == "TimeLimitExceeded"
    finally:
        table.close()


def test_a_wall_clock_jump_of_the_supervisor_neither_kills_nor_reruns_healthy_tasks(
    stem: Stem, spawn: Spawn, tmp_path: Path
) -> None:
    worker = spawn(concurrency=2, env={"STEM_CHAOS_CLOCK": "1", "STEM_CHAOS_JUMP": "3600"})
    worker.start()
    healthy = stem.enqueue("c.limited", {"seconds": 3.0})
    delayed = stem.enqueue("c.work", {"n": 1}, countdown=1800)
    message = stem.broker.find_message(delayed.id)
    assert message is not None and message.not_before is not None
    assert wait_until(lambda: len(ledger_lines(ledger(tmp_path), "start")) == 1, timeout=10)
    worker.signal(signal.SIGUSR1)  # the supervisor's wall clock jumps one hour forward
    assert wait_until(lambda: ledger_lines(ledger(tmp_path), "jump"), timeout=5)
    assert healthy.result(timeout=15) == "ok"  # not killed: limits run on CLOCK_MONOTONIC
    assert delayed.result(timeout=10) == 1  # due on the jumped clock: runs early...
    [run] = [p for p in ledger_lines(ledger(tmp_path), "start") if p[1] == delayed.id]
    assert float(run[4]) >= message.not_before - 3600  # ...but never by more than the jump
    starts = [p for p in ledger_lines(ledger(tmp_path), "start") if p[1] == healthy.id]
    assert len(starts) == 1, f"the healthy task ran {len(starts)} times after the jump"


def test_a_forward_wall_clock_jump_does_not_expire_a_live_owners_lease(stem: Stem) -> None:
    stem.enqueue("c.work")
    me = Consumer.this_process()
    broker = stem.broker
    [held] = broker.claim(["default"], 1, consumer=me, lease=30)
    with time_machine.travel(time.time() + 3600, tick=True):
        freed = broker.recover(me)
        again = broker.claim(["default"], 1, consumer=me, lease=30)
    assert (freed, again) == (0, [])
    assert [s.in_flight for s in broker.queue_stats()] == [1]
    assert held.deliveries == 1


# --- 8. thundering herd -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "n", [20_000, pytest.param(100_000, marks=[pytest.mark.slow, pytest.mark.timeout(900)])]
)
def test_thundering_herd_four_supervisors_on_one_sqlite_file(
    tmp_path: Path, sqlite_url: str, n: int
) -> None:
    stem = app_on(sqlite_url, chaos_app.stem)
    accepted: set[str] = set()
    for start in range(0, n, 5000):
        handles = stem.enqueue_many([("c.work", {"n": i}) for i in range(start, start + 5000)])
        accepted.update(h.id for h in handles)
    workers = [WorkerProcess(tmp_path, sqlite_url, app=APP, concurrency=2) for _ in range(4)]
    try:
        threads = [threading.Thread(target=w.start) for w in workers]
        for thread in threads:  # all four at once, on a full queue
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert all(w.proc is not None and w.proc.poll() is None for w in workers)
        finished = wait_until(lambda: len(ledger_lines(ledger(tmp_path), "done")) >= n,
                              timeout=n / 200, interval=0.5)  # fmt: skip
        assert finished, check(accepted, completions(ledger(tmp_path))).summary()
        assert wait_until(lambda: settled_broker(stem), timeout=20)
        time.sleep(0.5)
    finally:
        for worker in workers:
            worker.stop()
        stem.close()
    verdict = check(accepted, completions(ledger(tmp_path)))
    assert verdict.ok and verdict.completed == n and not verdict.duplicated, verdict.summary()
    ran_on = {p[3] for p in ledger_lines(ledger(tmp_path), "done")}
    assert len(ran_on) >= 5  # the children of several supervisors shared the work
    output = "\n".join(w.read_log() for w in workers)
    for bad in ("database is locked", "BrokerBusy", "Traceback", "store failed"):
        assert bad not in output, output[-3000:]


def settled_broker(stem: Stem) -> bool:
    return settled(stem)


# --- bad input --------------------------------------------------------------------------------


def inject_raw(store_url: str, payload: bytes) -> None:
    """Put bytes the broker API would never write straight into the store."""
    if is_sqlite(store_url):
        conn = sqlite3.connect(sqlite_path(store_url), timeout=10)
        try:
            with conn:
                conn.execute(
                    "INSERT INTO messages (task_id, name, queue, priority, state, not_before, "
                    "attempt, enqueued_at, payload) VALUES (NULL, '', 'default', 0, 'ready', "
                    "NULL, 0, ?, ?)",
                    (time.time(), payload),
                )
        finally:
            conn.close()
        return
    keys = Keys(Settings().namespace)
    client = redis.Redis.from_url(store_url)
    try:
        client.xadd(keys.stream("default", 0), {"p": payload, "t": "", "b": 0})
        client.sadd(keys.queues, "default")
        client.publish(keys.wake("default"), "1")
    finally:
        client.close()


RAW = {
    "undecodable-bytes": (b"\xff\xfe\x00\x9c not json at all", "not JSON"),
    "json-array": (b"[1, 2, 3]", "expected an object"),
    "wrong-field-type": (b'{"id": 7, "name": "c.work"}', "'id' has type int"),
    "missing-id": (b'{"name": "c.work", "args": {}}', "no 'id' field"),
    "future-version": (
        orjson.dumps({"id": "v99", "name": "c.work", "args": {}, "version": 99}),
        "newer",
    ),
}


def assert_still_serving(stem: Stem, worker: WorkerProcess) -> None:
    assert worker.proc is not None and worker.proc.poll() is None, worker.read_log()
    assert stem.enqueue("c.work", {"n": 42}).result(timeout=10) == 42
    assert wait_until(lambda: settled(stem), timeout=10)


@pytest.mark.parametrize("kind", sorted(RAW))
def test_raw_bad_payload_goes_to_the_dlq_with_a_reason(
    stem: Stem, spawn: Spawn, store_url: str, kind: str
) -> None:
    payload, fragment = RAW[kind]
    worker = spawn(concurrency=1).start()
    inject_raw(store_url, payload)
    assert wait_until(lambda: stem.broker.dlq_count() == 1, timeout=10), worker.read_log()
    [entry] = stem.broker.dlq_list()
    assert entry.reason == DeadLetterReason.UNDECODABLE
    assert entry.error_type == "DecodeError" and fragment in entry.message, entry.message
    assert entry.payload == payload  # kept verbatim for inspection
    assert_still_serving(stem, worker)


def test_args_that_do_not_match_the_handler_are_dead_lettered_as_permanent(
    stem: Stem, spawn: Spawn, store_url: str, tmp_path: Path
) -> None:
    blind = Stem(broker=store_url)  # no registry: enqueue by name cannot check the args
    try:
        wrong = blind.enqueue("c.strict", {"b": 1})
        missing = blind.enqueue("c.strict", {})
        worker = spawn(concurrency=1).start()
        for handle in (wrong, missing):
            assert wait_until(lambda h=handle: h.state() is TaskState.DEAD, timeout=10)
        assert wait_until(lambda: stem.broker.dlq_count() == 2)
        entries = {e.task_id: e for e in stem.broker.dlq_list()}
        for handle in (wrong, missing):
            entry = entries[handle.id]
            assert entry.reason == DeadLetterReason.PERMANENT and entry.error_type == "TypeError"
            assert "arguments do not match task 'c.strict'" in entry.message, entry.message
            assert entry.attempts == 1  # never retried
        assert not completions(ledger(tmp_path))  # the handler never ran
        assert_still_serving(stem, worker)
    finally:
        blind.close()


def test_a_10mb_payload_is_refused_at_enqueue_and_nothing_is_stored(
    stem: Stem, store_url: str
) -> None:
    blob = "x" * (10 * 2**20)
    with pytest.raises(PayloadTooLarge, match="above the 262144-byte limit"):
        stem.enqueue("c.echo", {"data": blob})
    blind = Stem(broker=store_url)
    try:
        with pytest.raises(PayloadTooLarge, match="pass a reference"):
            blind.enqueue("no.such.task", {"data": blob})
        with pytest.raises(PayloadTooLarge):  # all or none: the small ones are not stored
            stem.enqueue_many([("c.echo", {"data": "small"}), ("c.echo", {"data": blob})])
    finally:
        blind.close()
    assert stem.broker.list_messages() == [] and stem.broker.dlq_count() == 0


def test_results_that_cannot_be_serialised_are_dead_lettered(stem: Stem, spawn: Spawn) -> None:
    worker = spawn(concurrency=2).start()
    kinds = ["object", "set", "nan", "bytes", "bigint"]
    handles = {kind: stem.enqueue("c.bad_result", {"kind": kind}) for kind in kinds}
    for handle in handles.values():
        assert wait_until(lambda h=handle: h.state() is TaskState.DEAD, timeout=10)
    assert wait_until(lambda: stem.broker.dlq_count() == len(kinds))
    entries = {e.task_id: e for e in stem.broker.dlq_list()}
    for kind, handle in handles.items():
        entry = entries[handle.id]
        assert entry.reason == DeadLetterReason.EXHAUSTED, (kind, entry)
        assert "not JSON-serialisable" in entry.message, (kind, entry.message)
    assert_still_serving(stem, worker)


def test_an_exception_that_cannot_be_printed_is_dead_lettered(stem: Stem, spawn: Spawn) -> None:
    worker = spawn(concurrency=1).start()
    handle = stem.enqueue("c.unprintable_error")
    assert wait_until(lambda: handle.state() is TaskState.DEAD, timeout=10), worker.read_log()
    assert wait_until(lambda: stem.broker.dlq_count() == 1)
    [entry] = stem.broker.dlq_list()
    assert entry.reason == DeadLetterReason.EXHAUSTED and entry.error_type == "Unprintable"
    assert "unprintable Unprintable" in entry.message, entry.message
    info = handle.info()
    assert info is not None and info.error is not None and info.error.type == "Unprintable"
    assert_still_serving(stem, worker)
