"""`SqliteBackend`: task results in the `results` table, the primitives in the tables of
migration 0002 (see schema.py).

By default it shares the broker's database file (and migration set). JSON values are
orjson bytes; an error is three columns (type, message, traceback), NULL when none.
The file is the namespace: each namespace but the default has a database file of its
own (`db.namespaced_url`), so no table here carries a namespace column.

Each primitive is one statement where it can be (an upsert whose WHERE decides), and
always one `Database.write` (BEGIN IMMEDIATE: the database's single writer lock makes
read-then-write steps atomic across processes). Expired rows are skipped by every read
and replaced by every write as if absent; `purge_expired` deletes them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import orjson

from appliance.backend.protocol import (
    ErrorInfo,
    TaskResult,
    WorkerHeartbeat,
    as_bytes,
    check_ttl,
    decode_heartbeat,
    decode_result,
    encode_heartbeat,
    encode_result,
)
from appliance.envelope import dumps_json
from appliance.states import TaskState
from appliance.stores.sqlite.db import Database

_COLUMNS = (
    "task_id", "state", "name", "queue", "value", "error_type", "error_message",
    "error_traceback", "attempt", "worker", "started_at", "finished_at", "progress",
    "progress_data", "meta", "expires_at", "updated_at",
)  # fmt: skip
_SELECTED = ", ".join(_COLUMNS[:-1])  # updated_at is bookkeeping, not part of TaskResult
_STORE = (
    f"INSERT INTO results ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _COLUMNS[1:])
)
_LIVE = "(expires_at IS NULL OR expires_at >= ?)"
_GET = f"SELECT {_SELECTED} FROM results WHERE task_id = ? AND {_LIVE}"
# json_each: one fixed statement for any number of ids.
_GET_MANY = (
    f"SELECT {_SELECTED} FROM results WHERE task_id IN (SELECT value FROM json_each(?)) AND {_LIVE}"
)
_FORGET = "DELETE FROM results WHERE task_id = ?"

# Primitives. Live means expires_at >= now, as for results; `:now` is bound per call.
# The DO UPDATE ... WHERE makes a live row win: the statement changes nothing (rowcount
# 0) unless the key is new or its row expired.
_PUT_IF_ABSENT = """
INSERT INTO kv (key, value, expires_at) VALUES (:key, :value, :expires_at)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
    WHERE kv.expires_at < :now
"""
_GET_KEY = "SELECT value FROM kv WHERE key = ? AND expires_at >= ?"
_DELETE_KEY = "DELETE FROM kv WHERE key = ? AND expires_at >= ?"
_DELETE_KEY_IF = _DELETE_KEY + " AND value = ?"
_REFRESH_KEY = "UPDATE kv SET expires_at = ? WHERE key = ? AND value = ? AND expires_at >= ?"
# An expired counter restarts from this increment, with this call's TTL.
_INCR = """
INSERT INTO counters (key, value, expires_at) VALUES (:key, :amount, :expires_at)
ON CONFLICT (key) DO UPDATE SET
    value = iif(counters.expires_at < :now, excluded.value, counters.value + excluded.value),
    expires_at = iif(counters.expires_at < :now, excluded.expires_at, counters.expires_at)
RETURNING value
"""
_GROUP_EXPIRED_MEMBERS = """
DELETE FROM task_group_members WHERE group_id IN
    (SELECT group_id FROM task_groups WHERE group_id = ? AND expires_at < ?)
"""
_GROUP_INIT = """
INSERT INTO task_groups (group_id, size, expires_at) VALUES (:group_id, :size, :expires_at)
ON CONFLICT (group_id) DO UPDATE SET size = excluded.size, expires_at = excluded.expires_at
    WHERE task_groups.expires_at < :now
"""
_GROUP_SIZE = "SELECT size FROM task_groups WHERE group_id = ? AND expires_at >= ?"
# ON CONFLICT DO NOTHING: a duplicate report keeps the first result and adds no row.
_GROUP_ADD = """
INSERT INTO task_group_members (group_id, idx, result) VALUES (?, ?, ?) ON CONFLICT DO NOTHING
"""
_GROUP_COUNT = "SELECT count(*) FROM task_group_members WHERE group_id = ?"
_GROUP_RESULTS = """
SELECT m.result FROM task_group_members AS m JOIN task_groups AS g USING (group_id)
WHERE m.group_id = ? AND g.expires_at >= ? ORDER BY m.idx
"""
_REVOKE = """
INSERT INTO revoked (task_id, expires_at) VALUES (?, ?)
ON CONFLICT (task_id) DO UPDATE SET expires_at = max(revoked.expires_at, excluded.expires_at)
"""
_IS_REVOKED = "SELECT 1 FROM revoked WHERE task_id = ? AND expires_at >= ?"
_LIST_REVOKED = "SELECT task_id FROM revoked WHERE expires_at >= ?"
_PUT_WORKER = """
INSERT INTO workers (id, heartbeat, expires_at) VALUES (?, ?, ?)
ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat, expires_at = excluded.expires_at
"""
_LIST_WORKERS = "SELECT heartbeat FROM workers WHERE expires_at >= ? ORDER BY id"
_REMOVE_WORKER = "DELETE FROM workers WHERE id = ?"

# Members first: they are found through their expired group row.
_PURGE_EXPIRED = (
    "DELETE FROM results WHERE expires_at < :now",
    "DELETE FROM kv WHERE expires_at < :now",
    "DELETE FROM counters WHERE expires_at < :now",
    """DELETE FROM task_group_members WHERE group_id IN
        (SELECT group_id FROM task_groups WHERE expires_at < :now)""",
    "DELETE FROM task_groups WHERE expires_at < :now",
    "DELETE FROM revoked WHERE expires_at < :now",
    "DELETE FROM workers WHERE expires_at < :now",
    """DELETE FROM chord_results WHERE chord_id IN
        (SELECT id FROM chords WHERE expires_at < :now)""",
    "DELETE FROM chords WHERE expires_at < :now",
    "DELETE FROM task_records WHERE expires_at < :now",
)


def _json(value: Any) -> bytes | None:
    return None if value is None else dumps_json(value)


def _row(result: TaskResult, now: float) -> tuple[Any, ...]:
    error = result.error
    return (
        result.task_id, str(result.state), result.name, result.queue, _json(result.value),
        error.type if error else None, error.message if error else None,
        error.traceback if error else None, result.attempt, result.worker, result.started_at,
        result.finished_at, result.progress, _json(result.progress_data),
        dumps_json(result.meta), result.expires_at, now,
    )  # fmt: skip


def _loads(data: bytes | None) -> Any:
    return None if data is None else orjson.loads(data)


def _check_index(index: int, size: int, group_id: str) -> None:
    if not 0 <= index < size:
        raise ValueError(f"group {group_id} has {size} members; index {index} is out of range")


def _result(row: Sequence[Any]) -> TaskResult:
    (task_id, state, name, queue, value, error_type, error_message, error_traceback,
     attempt, worker, started_at, finished_at, progress, progress_data, meta,
     expires_at) = row  # fmt: skip
    error = (
        None
        if error_type is None
        else ErrorInfo(error_type, error_message or "", error_traceback or "")
    )
    return TaskResult(
        task_id=task_id, state=TaskState(state), name=name, queue=queue, value=_loads(value),
        error=error, attempt=attempt, worker=worker, started_at=started_at,
        finished_at=finished_at, progress=progress, progress_data=_loads(progress_data),
        meta=_loads(meta) or {}, expires_at=expires_at,
    )  # fmt: skip


class SqliteBackend:
    """The `ResultBackend` port on SQLite, on a `Database` it shares with the broker
    (`appliance.stores.sqlite.open_store`). One per process."""

    def __init__(self, db: Database, url: str) -> None:
        self.url = url
        self._db = db

    def store(self, results: Sequence[TaskResult]) -> None:
        """Upsert the batch in one transaction (all or none)."""
        if not results:
            return
        now = time.time()
        rows = [_row(result, now) for result in results]  # encode before taking the lock
        self._db.write(lambda conn: conn.executemany(_STORE, rows))

    def get(self, task_id: str) -> TaskResult | None:
        row = self._db.read(lambda conn: conn.execute(_GET, (task_id, time.time())).fetchone())
        return _result(row) if row else None

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        if not task_ids:
            return {}
        ids = orjson.dumps(list(task_ids)).decode()

        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_GET_MANY, (ids, time.time())).fetchall()

        return {row[0]: _result(row) for row in self._db.read(work)}

    def forget(self, task_ids: Sequence[str]) -> None:
        if not task_ids:
            return
        keys = [(task_id,) for task_id in task_ids]
        self._db.write(lambda conn: conn.executemany(_FORGET, keys))

    def purge_expired(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            now = {"now": time.time()}
            return sum(conn.execute(sql, now).rowcount for sql in _PURGE_EXPIRED)

        return self._db.write(work)

    # -- keys with a TTL ---------------------------------------------------------------

    def put_if_absent(self, key: str, value: bytes | str, ttl: float) -> bool:
        check_ttl(ttl)
        data = as_bytes(value)

        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            row = {"key": key, "value": data, "expires_at": now + ttl, "now": now}
            return conn.execute(_PUT_IF_ABSENT, row).rowcount > 0

        return self._db.write(work)

    def get_key(self, key: str) -> bytes | None:
        row = self._db.read(lambda conn: conn.execute(_GET_KEY, (key, time.time())).fetchone())
        return None if row is None else bytes(row[0])

    def delete_key(self, key: str, value: bytes | str | None = None) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            if value is None:
                return conn.execute(_DELETE_KEY, (key, time.time())).rowcount > 0
            args = (key, time.time(), as_bytes(value))
            return conn.execute(_DELETE_KEY_IF, args).rowcount > 0

        return self._db.write(work)

    def refresh_key(self, key: str, value: bytes | str, ttl: float) -> bool:
        check_ttl(ttl)
        data = as_bytes(value)

        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            return conn.execute(_REFRESH_KEY, (now + ttl, key, data, now)).rowcount > 0

        return self._db.write(work)

    # -- counters ----------------------------------------------------------------------

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        if ttl is not None:
            check_ttl(ttl)

        def work(conn: sqlite3.Connection) -> int:
            now = time.time()
            expires_at = None if ttl is None else now + ttl
            row = {"key": key, "amount": amount, "expires_at": expires_at, "now": now}
            value: int = conn.execute(_INCR, row).fetchall()[0][0]  # run RETURNING to the end
            return value

        return self._db.write(work)

    # -- groups and chords -------------------------------------------------------------

    def group_init(self, group_id: str, size: int, ttl: float) -> bool:
        check_ttl(ttl)
        if size < 0:
            raise ValueError(f"a group cannot have {size} members")

        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            # An expired group is replaced by an empty one: its old members must go.
            conn.execute(_GROUP_EXPIRED_MEMBERS, (group_id, now))
            row = {"group_id": group_id, "size": size, "expires_at": now + ttl, "now": now}
            return conn.execute(_GROUP_INIT, row).rowcount > 0

        return self._db.write(work)

    def group_add_result(self, group_id: str, index: int, result: TaskResult) -> int:
        data = encode_result(result)  # encode before taking the lock

        def work(conn: sqlite3.Connection) -> int:
            found = conn.execute(_GROUP_SIZE, (group_id, time.time())).fetchone()
            if found is None:
                return 0
            _check_index(index, found[0], group_id)
            conn.execute(_GROUP_ADD, (group_id, index, data))
            count: int = conn.execute(_GROUP_COUNT, (group_id,)).fetchone()[0]
            return count

        return self._db.write(work)

    def group_results(self, group_id: str) -> list[TaskResult]:
        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_GROUP_RESULTS, (group_id, time.time())).fetchall()

        return [decode_result(row[0]) for row in self._db.read(work)]

    # -- revokes -----------------------------------------------------------------------

    def revoke(self, task_ids: Sequence[str], ttl: float) -> None:
        check_ttl(ttl)
        if not task_ids:
            return

        def work(conn: sqlite3.Connection) -> None:
            expires_at = time.time() + ttl
            conn.executemany(_REVOKE, [(task_id, expires_at) for task_id in task_ids])

        self._db.write(work)

    def is_revoked(self, task_id: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            return conn.execute(_IS_REVOKED, (task_id, time.time())).fetchone() is not None

        return self._db.read(work)

    def list_revoked(self) -> set[str]:
        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_LIST_REVOKED, (time.time(),)).fetchall()

        return {row[0] for row in self._db.read(work)}

    # -- worker heartbeats -------------------------------------------------------------

    def put_worker_heartbeat(self, heartbeat: WorkerHeartbeat, ttl: float) -> None:
        check_ttl(ttl)
        data = encode_heartbeat(heartbeat)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(_PUT_WORKER, (heartbeat.id, data, time.time() + ttl))

        self._db.write(work, durable=False)  # the next beat replaces it in seconds

    def list_workers(self) -> list[WorkerHeartbeat]:
        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_LIST_WORKERS, (time.time(),)).fetchall()

        return [decode_heartbeat(row[0]) for row in self._db.read(work)]

    def remove_worker(self, worker_id: str) -> None:
        self._db.write(lambda conn: conn.execute(_REMOVE_WORKER, (worker_id,)))

    def close(self) -> None:
        """Nothing of its own to release: the shared connection is the `Stores`' to close."""
