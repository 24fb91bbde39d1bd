"""The `ResultBackend` primitives (keys with a TTL, counters, groups, revokes, worker
heartbeats), once per store, against real stores. The races run in separate processes:
atomicity across processes is the whole point of these primitives."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance.backend.protocol import ResultBackend, TaskResult, WorkerHeartbeat
from appliance.config import Settings
from appliance.envelope import new_task_id
from appliance.states import TaskState
from appliance.stores.sqlite import schema as sqlite_schema
from appliance.stores.sqlite.backend import SqliteBackend
from appliance.stores.sqlite.db import connect, parse_url
from tests.conftest import wait_until
from tests.stores import open_test_stores

SHORT = 0.2  # seconds: a TTL that a test waits out
LONG = 60.0  # seconds: a TTL that outlives any test
RACERS = 6


@pytest.fixture
def backend(store_url: str) -> Iterator[ResultBackend]:
    opened = open_test_stores(store_url, Settings()).backend
    yield opened
    opened.close()


# -- racing processes ----------------------------------------------------------------------

# Each racer opens its own backend (connects, migrates), says it is ready, and waits for
# the go file, so that the racing calls really overlap instead of following process
# start-up order. It prints one JSON line: what its calls returned.
_RACER = """
import json, sys, time
from pathlib import Path
from appliance.config import Settings
from appliance.envelope import EnvelopeCodec
from appliance.stores import open_stores
from appliance.backend.protocol import TaskResult
from appliance.states import TaskState
url, gate, ready, n = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
backend = open_stores(Settings(broker_url=url), EnvelopeCodec()).backend
backend.get_key("warm-up")
ready.touch()
deadline = time.monotonic() + 60
while not gate.exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.001)
"""


def race(store_url: str, tmp_path: Path, body: str, n: int = RACERS) -> list[Any]:
    """Run `body` in `n` processes at once; return what each printed (JSON), in order.

    Popen rather than subprocess.run: run() would start each only after the last ended.
    """
    gate = tmp_path / "go"
    code = _RACER + body + "\nbackend.close()\n"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, store_url, str(gate), str(tmp_path / f"ready{i}"), str(i)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        for i in range(n)
    ]
    try:
        all_ready = wait_until(
            lambda: all((tmp_path / f"ready{i}").exists() for i in range(n)), timeout=60
        )
        assert all_ready, "racers did not start"
        gate.touch()
        outputs = [proc.communicate(timeout=90)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0] * n
    return [json.loads(out) for out in outputs]


def test_put_if_absent_race_across_processes_has_exactly_one_winner(
    store_url: str, tmp_path: Path, backend: ResultBackend
) -> None:
    body = 'print(json.dumps(backend.put_if_absent("unique:job", f"racer-{n}", 60)))'

    won = race(store_url, tmp_path, body)

    assert won.count(True) == 1 and won.count(False) == RACERS - 1
    assert backend.get_key("unique:job") == f"racer-{won.index(True)}".encode()


def test_incr_across_processes_sums_exactly(
    store_url: str, tmp_path: Path, backend: ResultBackend
) -> None:
    per_process = 100
    body = f'print(json.dumps([backend.incr("hits") for _ in range({per_process})]))'

    seen = race(store_url, tmp_path, body)

    total = RACERS * per_process
    assert backend.incr("hits", 0) == total
    # Atomic increments: every call saw a different value, none was lost or repeated.
    values = [value for values in seen for value in values]
    assert sorted(values) == list(range(1, total + 1))


def test_group_counts_each_member_once_across_processes(
    store_url: str, tmp_path: Path, backend: ResultBackend
) -> None:
    group = new_task_id()
    assert backend.group_init(group, RACERS, LONG)
    # Every racer reports its own index twice (a redelivery): only the first counts.
    body = (
        "result = TaskResult(f'member-{n}', TaskState.SUCCESS, value=n)\n"
        f"first = backend.group_add_result({group!r}, n, result)\n"
        f"again = backend.group_add_result({group!r}, n, result)\n"
        "print(json.dumps([first, again]))\n"
    )

    reports = race(store_url, tmp_path, body)

    firsts = sorted(first for first, _ in reports)
    assert firsts == list(range(1, RACERS + 1))  # exactly one report completed the group
    assert all(again >= first for first, again in reports)
    assert [r.value for r in backend.group_results(group)] == list(range(RACERS))


# -- keys with a TTL -------------------------------------------------------------------------


def test_put_if_absent_keeps_the_first_value(backend: ResultBackend) -> None:
    assert backend.put_if_absent("lock:a", "owner-1", LONG)
    assert not backend.put_if_absent("lock:a", b"owner-2", LONG)
    assert backend.get_key("lock:a") == b"owner-1"  # text comes back as UTF-8 bytes
    assert backend.get_key("lock:unknown") is None


def test_an_expired_key_is_absent_again(backend: ResultBackend) -> None:
    assert backend.put_if_absent("unique:x", b"first", SHORT)
    assert backend.get_key("unique:x") == b"first"

    assert wait_until(lambda: backend.get_key("unique:x") is None, timeout=5)
    assert backend.put_if_absent("unique:x", b"second", LONG)
    assert backend.get_key("unique:x") == b"second"


def test_delete_key_only_with_the_matching_value(backend: ResultBackend) -> None:
    backend.put_if_absent("lock:b", b"mine", LONG)

    assert not backend.delete_key("lock:b", b"theirs")
    assert backend.get_key("lock:b") == b"mine"
    assert backend.delete_key("lock:b", "mine")
    assert backend.get_key("lock:b") is None
    assert not backend.delete_key("lock:b", b"mine")  # already released


def test_delete_key_without_a_value_deletes_any(backend: ResultBackend) -> None:
    backend.put_if_absent("unique:y", b"v", LONG)
    assert backend.delete_key("unique:y")
    assert not backend.delete_key("unique:y")
    assert backend.put_if_absent("unique:y", b"w", LONG)


def test_a_lock_released_after_takeover_stays_with_the_new_owner(backend: ResultBackend) -> None:
    backend.put_if_absent("lock:c", b"old", SHORT)
    assert wait_until(lambda: backend.put_if_absent("lock:c", b"new", LONG), timeout=5)

    assert not backend.delete_key("lock:c", b"old")  # the late release of the old owner
    assert not backend.refresh_key("lock:c", b"old", LONG)
    assert backend.get_key("lock:c") == b"new"


def test_refresh_key_extends_only_while_owned(backend: ResultBackend) -> None:
    backend.put_if_absent("lease:d", b"me", 0.5)

    assert not backend.refresh_key("lease:d", b"someone-else", LONG)
    assert backend.refresh_key("lease:d", "me", LONG)
    time.sleep(0.7)  # past the first TTL: only the refresh keeps it
    assert backend.get_key("lease:d") == b"me"

    assert backend.refresh_key("lease:d", b"me", SHORT)  # a refresh may shorten it, too
    assert wait_until(lambda: backend.get_key("lease:d") is None, timeout=5)
    assert not backend.refresh_key("lease:d", b"me", LONG)  # expired: not ours any more
    assert not backend.refresh_key("lease:never", b"me", LONG)


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan")])
def test_a_ttl_must_be_positive(backend: ResultBackend, ttl: float) -> None:
    with pytest.raises(ValueError, match="TTL"):
        backend.put_if_absent("k", b"v", ttl)
    with pytest.raises(ValueError, match="TTL"):
        backend.incr("c", 1, ttl)
    assert backend.get_key("k") is None


# -- counters ----------------------------------------------------------------------------


def test_incr_adds_and_returns_the_new_value(backend: ResultBackend) -> None:
    assert backend.incr("n") == 1
    assert backend.incr("n", 5) == 6
    assert backend.incr("n", -2) == 4
    assert backend.incr("n", 0) == 4
    assert backend.incr("other") == 1
    assert backend.get_key("n") is None  # counters are a keyspace of their own


def test_a_counter_ttl_is_a_fixed_window_from_its_creation(backend: ResultBackend) -> None:
    assert backend.incr("rate", 1, ttl=0.5) == 1
    assert backend.incr("rate", 1, ttl=LONG) == 2  # does not extend the window

    # Expired: the next increment starts a new window from 0.
    assert wait_until(lambda: backend.incr("rate", 0, ttl=LONG) == 0, timeout=5)
    assert backend.incr("rate", 1, ttl=SHORT) == 1  # the new window keeps its LONG TTL
    time.sleep(SHORT * 2)
    assert backend.incr("rate", 0) == 1


# -- groups and chords -------------------------------------------------------------------


def member(index: int, state: TaskState = TaskState.SUCCESS) -> TaskResult:
    return TaskResult(new_task_id(), state, value={"index": index})


def test_group_counts_duplicates_once_and_returns_results_in_index_order(
    backend: ResultBackend,
) -> None:
    group = new_task_id()
    assert backend.group_init(group, 3, LONG)
    first_two = member(2)

    assert backend.group_add_result(group, 2, first_two) == 1
    assert backend.group_add_result(group, 2, member(2, TaskState.FAILURE)) == 1  # duplicate
    assert backend.group_add_result(group, 0, member(0)) == 2
    assert [r.value["index"] for r in backend.group_results(group)] == [0, 2]
    assert backend.group_add_result(group, 1, member(1)) == 3

    results = backend.group_results(group)
    assert [r.value["index"] for r in results] == [0, 1, 2]
    assert results[2] == first_two  # the first report wins, whole TaskResult kept


def test_group_init_is_idempotent(backend: ResultBackend) -> None:
    group = new_task_id()
    assert backend.group_init(group, 2, LONG)
    backend.group_add_result(group, 0, member(0))

    assert not backend.group_init(group, 2, LONG)  # a redelivered init keeps the members
    assert backend.group_add_result(group, 1, member(1)) == 2


def test_group_rejects_an_index_out_of_range(backend: ResultBackend) -> None:
    group = new_task_id()
    backend.group_init(group, 2, LONG)
    for index in (-1, 2):
        with pytest.raises(ValueError, match="index"):
            backend.group_add_result(group, index, member(index))
    assert backend.group_results(group) == []


def test_an_unknown_or_expired_group_counts_nothing(backend: ResultBackend) -> None:
    assert backend.group_add_result(new_task_id(), 0, member(0)) == 0
    assert backend.group_results(new_task_id()) == []

    group = new_task_id()
    backend.group_init(group, 2, SHORT)
    backend.group_add_result(group, 0, member(0))
    assert wait_until(lambda: backend.group_results(group) == [], timeout=5)
    assert backend.group_add_result(group, 1, member(1)) == 0

    assert backend.group_init(group, 2, LONG)  # a new group under the old id starts empty
    assert backend.group_add_result(group, 1, member(1)) == 1
    assert [r.value["index"] for r in backend.group_results(group)] == [1]


# -- revokes -----------------------------------------------------------------------------


def test_revokes_are_stored_listed_and_expire(backend: ResultBackend) -> None:
    kept, brief, other = new_task_id(), new_task_id(), new_task_id()
    backend.revoke([kept], LONG)
    backend.revoke([brief], SHORT)
    backend.revoke([], LONG)

    assert backend.is_revoked(kept) and backend.is_revoked(brief)
    assert not backend.is_revoked(other)
    assert backend.list_revoked() == {kept, brief}

    assert wait_until(lambda: not backend.is_revoked(brief), timeout=5)
    assert backend.list_revoked() == {kept}


def test_a_revoke_again_never_shortens_it(backend: ResultBackend) -> None:
    task = new_task_id()
    backend.revoke([task], LONG)
    backend.revoke([task], SHORT)
    time.sleep(SHORT * 2)
    assert backend.is_revoked(task)


def test_revokes_are_honoured_by_a_process_started_later(
    store_url: str, backend: ResultBackend
) -> None:
    tasks = [new_task_id(), new_task_id()]
    backend.revoke(tasks, LONG)
    code = (
        "import json, sys\n"
        "from appliance.config import Settings\n"
        "from appliance.envelope import EnvelopeCodec\n"
        "from appliance.stores import open_stores\n"
        "backend = open_stores(Settings(broker_url=sys.argv[1]), EnvelopeCodec()).backend\n"
        "print(json.dumps(sorted(backend.list_revoked())))\n"
        "backend.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, store_url], check=True, capture_output=True, timeout=60
    )
    assert json.loads(done.stdout) == sorted(tasks)


# -- worker heartbeats -------------------------------------------------------------------


def heartbeat(worker_id: str, **changes: object) -> WorkerHeartbeat:
    now = time.time()
    beat = WorkerHeartbeat(
        id=worker_id, host="edge-1", pid=4242, pools=("default", "io"), queues=("a", "b"),
        concurrency=4, in_flight=1, processed=10, failed=2, started_at=now - 60,
        version="0.1.0", sent_at=now,
    )  # fmt: skip
    return replace(beat, **changes)  # type: ignore[arg-type]


def test_worker_heartbeats_are_listed_replaced_and_removed(backend: ResultBackend) -> None:
    b, a = heartbeat("host-b:2:1.0"), heartbeat("host-a:1:1.0", pid=1, queues=("x",))
    backend.put_worker_heartbeat(b, LONG)
    backend.put_worker_heartbeat(a, LONG)
    assert backend.list_workers() == [a, b]  # ordered by id, every field round-trips

    newer = replace(b, processed=11, in_flight=0)
    backend.put_worker_heartbeat(newer, LONG)
    assert backend.list_workers() == [a, newer]

    backend.remove_worker(a.id)
    backend.remove_worker("never-seen")
    assert backend.list_workers() == [newer]


def test_a_worker_that_stops_beating_drops_out(backend: ResultBackend) -> None:
    alive, dead = heartbeat("alive"), heartbeat("dead")
    backend.put_worker_heartbeat(alive, LONG)
    backend.put_worker_heartbeat(dead, SHORT)

    assert wait_until(lambda: backend.list_workers() == [alive], timeout=5)


# -- purging -----------------------------------------------------------------------------


def test_purge_expired_deletes_only_what_expired(backend: ResultBackend) -> None:
    group = new_task_id()
    live_task, gone_task = new_task_id(), new_task_id()
    backend.put_if_absent("live", b"1", LONG)
    backend.put_if_absent("gone", b"1", SHORT)
    backend.group_init(group, 1, SHORT)
    backend.group_add_result(group, 0, member(0))
    backend.revoke([live_task], LONG)
    backend.revoke([gone_task], SHORT)
    backend.put_worker_heartbeat(heartbeat("live"), LONG)
    backend.put_worker_heartbeat(heartbeat("gone"), SHORT)
    assert wait_until(lambda: backend.list_revoked() == {live_task}, timeout=5)
    time.sleep(SHORT)  # every short TTL above has passed too

    # Both stores keep at least the expired revoke and heartbeat index entries until now.
    assert backend.purge_expired() >= 2
    assert backend.purge_expired() == 0

    assert backend.get_key("live") == b"1" and backend.get_key("gone") is None
    assert backend.group_results(group) == []
    assert backend.list_revoked() == {live_task}
    assert [w.id for w in backend.list_workers()] == ["live"]


# -- SQLite only: transactions and migrations (no Redis counterpart) ----------------------


def test_sqlite_primitives_join_an_enclosing_unit_of_work(sqlite_url: str) -> None:
    db = connect(parse_url(sqlite_url))
    sqlite_schema.ensure(db)
    backend = SqliteBackend(db, sqlite_url)
    try:
        with pytest.raises(RuntimeError), db.unit_of_work():
            assert backend.put_if_absent("lock", b"v", LONG)
            assert backend.incr("n") == 1
            backend.revoke(["t"], LONG)
            raise RuntimeError("the settle batch failed")
        # Rolled back with the unit: none of them happened.
        assert backend.get_key("lock") is None
        assert backend.incr("n", 0) == 0
        assert not backend.is_revoked("t")
    finally:
        backend.close()


def test_sqlite_database_from_before_the_primitives_is_migrated(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_schema, "STEPS", sqlite_schema.STEPS[:1])
        open_test_stores(sqlite_url, Settings()).backend.close()  # a database at 0001

    backend = open_test_stores(sqlite_url, Settings()).backend
    try:
        assert backend.put_if_absent("k", b"v", LONG)
        assert backend.incr("n") == 1
    finally:
        backend.close()


def test_split_stores_purge_what_expired_in_the_broker_store_too(
    tmp_path: Path, store_url: str
) -> None:
    """With the results elsewhere, the broker's SQLite file still holds chords (and rate
    limiters, records, control requests) that expire: the purge must reach it as well."""
    from appliance.envelope import Envelope, EnvelopeCodec
    from appliance.stores import open_stores

    broker_url = f"sqlite:///{tmp_path / 'broker.db'}"
    settings = Settings(broker_url=broker_url, result_backend_url=store_url)
    stores = open_stores(settings, EnvelopeCodec())
    try:
        chord_id, now = new_task_id(), time.time()
        member = Envelope(id=new_task_id(), name="m", enqueued_at=now)
        callback = Envelope(id=new_task_id(), name="cb", enqueued_at=now)
        stores.broker.enqueue_chord(chord_id, [member], callback, ttl=-1.0)  # expired
        db = stores.broker._db  # type: ignore[attr-defined]

        def chords() -> int:
            return int(
                db.read(lambda conn: conn.execute("SELECT COUNT(*) FROM chords").fetchone()[0])
            )

        assert chords() == 1
        assert stores.purge_expired() >= 1
        assert chords() == 0
    finally:
        stores.close()
