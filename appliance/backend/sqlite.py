"""`SqliteBackend`: task results in the `results` table (see broker/sqlite_schema.py).

By default it shares the broker's database file (and migration set). JSON values are
orjson bytes; an error is three columns (type, message, traceback), NULL when none.
The file is the namespace: environments that must not meet use different files.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from appliance.backend.protocol import ErrorInfo, TaskResult
from appliance.broker import sqlite_schema
from appliance.config import Settings
from appliance.envelope import dumps_json
from appliance.sqlite_db import MOUNTINFO, Database, connect, parse_url
from appliance.states import TaskState

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
_PURGE_EXPIRED = "DELETE FROM results WHERE expires_at < ?"


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
    """The `ResultBackend` port on SQLite. Open one per process (`from_url`)."""

    def __init__(self, db: Database, url: str) -> None:
        self.url = url
        self._db = db

    @classmethod
    def from_url(
        cls, url: str, settings: Settings, *, mountinfo: Path = MOUNTINFO
    ) -> SqliteBackend:
        """Open (creating if needed) the database of `url` and bring its schema up to date."""
        db = connect(parse_url(url, settings.sqlite_synchronous), mountinfo=mountinfo)
        try:
            sqlite_schema.ensure(db)
        except BaseException:
            db.close()
            raise
        return cls(db, url)

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
            return conn.execute(_PURGE_EXPIRED, (time.time(),)).rowcount

        return self._db.write(work)

    def close(self) -> None:
        """Close the connection (a no-op in a forked child: never touch the parent's)."""
        self._db.close()
