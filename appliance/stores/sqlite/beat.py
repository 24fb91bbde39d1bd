"""Beat's schedules and runs on SQLite (migration 0005). A slot is dispatched in one
transaction: its guard row in `kv`, the message, the entry's `last_slot` and the run."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from appliance.beat.calendar import format_slot
from appliance.beat.spec import ScheduleEntry
from appliance.beat.store import RUNS_KEPT, ScheduleRun, StoredSchedule, guard_key
from appliance.envelope import Envelope
from appliance.stores.sqlite.broker import SqliteBroker
from appliance.stores.sqlite.db import Database

_COLUMNS = "name, entry, enabled, origin, applied_at, last_slot, last_run_at, last_error"
_LIST = f"SELECT {_COLUMNS} FROM schedules ORDER BY name"
_GET = f"SELECT {_COLUMNS} FROM schedules WHERE name = ?"
_UPSERT = """
INSERT INTO schedules (name, entry, enabled, origin, applied_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET entry = excluded.entry, origin = excluded.origin
    WHERE schedules.entry != excluded.entry OR schedules.origin != excluded.origin
"""
_ENABLE = """
UPDATE schedules SET enabled = ?1, applied_at = iif(?1 AND NOT enabled, ?2, applied_at)
WHERE name = ?3
"""
_DELETE = "DELETE FROM schedules WHERE name = ?"
_DELETE_RUNS = "DELETE FROM schedule_runs WHERE name = ?"
_DISPATCHED = """
UPDATE schedules SET last_slot = ?, last_run_at = ?, last_error = NULL WHERE name = ?
"""
_FAILED = "UPDATE schedules SET last_error = ?, last_run_at = ?, last_slot = ? WHERE name = ?"
_RUN = """
INSERT INTO schedule_runs (name, slot, dispatched_at, task_id, drift_ms, error)
VALUES (?, ?, ?, ?, ?, ?)
"""
_TRIM = """
DELETE FROM schedule_runs WHERE name = ?1 AND id <= (
    SELECT id FROM schedule_runs WHERE name = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)
"""
_RUNS = """
SELECT name, slot, dispatched_at, task_id, drift_ms, error FROM schedule_runs
WHERE name = ? ORDER BY id DESC LIMIT ?
"""


def _stored(row: Sequence[Any]) -> StoredSchedule:
    name, entry, enabled, origin, applied_at, last_slot, last_run_at, last_error = row
    return StoredSchedule(
        ScheduleEntry.from_table(orjson.loads(entry), f"the stored schedule {name!r}"),
        bool(enabled), origin, applied_at,
        datetime.fromisoformat(last_slot).astimezone(UTC) if last_slot else None,
        last_run_at, last_error,
    )  # fmt: skip


class SqliteSchedules:
    """`ScheduleStore` on the store's database, beside the broker it enqueues through."""

    def __init__(self, db: Database, broker: SqliteBroker) -> None:
        self._db = db
        self._broker = broker

    def apply(self, entries: Sequence[ScheduleEntry], origin: str) -> list[str]:
        now = time.time()
        rows = [(e.name, orjson.dumps(e.to_table()), int(e.enabled), origin, now)
                for e in entries]  # fmt: skip

        def work(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in rows if conn.execute(_UPSERT, row).rowcount]

        return self._db.write(work)

    def entries(self) -> list[StoredSchedule]:
        return [_stored(row) for row in self._db.read(lambda c: c.execute(_LIST).fetchall())]

    def get(self, name: str) -> StoredSchedule | None:
        row = self._db.read(lambda c: c.execute(_GET, (name,)).fetchone())
        return _stored(row) if row else None

    def set_enabled(self, name: str, enabled: bool) -> bool:
        count: int = self._db.write(
            lambda c: c.execute(_ENABLE, (int(enabled), time.time(), name)).rowcount
        )
        return count > 0

    def delete(self, name: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            conn.execute(_DELETE_RUNS, (name,))
            return conn.execute(_DELETE, (name,)).rowcount > 0

        return self._db.write(work)

    def dispatch(
        self, name: str, slot: datetime, envelope: Envelope, *, drift_ms: float, guard_ttl: float
    ) -> bool:
        text = format_slot(slot)
        with self._db.unit_of_work():  # the guard, the message and the run: one commit
            if self._broker.enqueue_guarded(envelope, guard_key(name, slot), guard_ttl):
                return False  # another instance (or an earlier tick) has this slot
            now = time.time()
            self._db.write(lambda c: self._record(c, name, text, now, envelope.id, drift_ms))
        return True

    @staticmethod
    def _record(
        conn: sqlite3.Connection, name: str, slot: str, now: float, task_id: str, drift: float
    ) -> None:
        conn.execute(_DISPATCHED, (slot, now, name))
        conn.execute(_RUN, (name, slot, now, task_id, drift, None))
        conn.execute(_TRIM, (name, RUNS_KEPT))

    def record_failure(self, name: str, slot: datetime, error: str) -> None:
        now = time.time()

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(_FAILED, (error, now, format_slot(slot), name))
            conn.execute(_RUN, (name, format_slot(slot), now, None, None, error))
            conn.execute(_TRIM, (name, RUNS_KEPT))

        self._db.write(work)

    def runs(self, name: str, limit: int = 50) -> list[ScheduleRun]:
        rows = self._db.read(lambda c: c.execute(_RUNS, (name, limit)).fetchall())
        return [ScheduleRun(*row) for row in rows]
