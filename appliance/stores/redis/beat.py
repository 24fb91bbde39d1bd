"""Beat's schedules and runs on Redis (keys in `keys.py`): a hash per entry, a list of
runs per entry, and one script (`BEAT_DISPATCH`) for the exactly-once dispatch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from appliance.beat.calendar import format_slot
from appliance.beat.spec import ScheduleEntry
from appliance.beat.store import RUNS_KEPT, ScheduleRun, StoredSchedule, guard_key
from appliance.envelope import Envelope
from appliance.stores.redis import scripts
from appliance.stores.redis.broker import RedisBroker
from appliance.stores.redis.keys import Keys
from appliance.stores.redis.records import text
from appliance.stores.redis.session import RedisSession

_FIELDS = ("entry", "enabled", "origin", "applied_at", "last_slot", "last_run_at", "last_error")


class RedisSchedules:
    """`ScheduleStore` on the store's Redis session, beside the broker."""

    def __init__(self, session: RedisSession, keys: Keys, broker: RedisBroker) -> None:
        self.session = session
        self.client = session.client
        self.keys = keys
        self.broker = broker
        self._dispatch = session.script(scripts.source(scripts.BEAT_DISPATCH))

    def apply(self, entries: Sequence[ScheduleEntry], origin: str) -> list[str]:
        now = repr(time.time())
        with self.session.guard("reading schedules"):
            pipe = self.client.pipeline(transaction=False)
            for entry in entries:
                pipe.hmget(self.keys.schedule(entry.name), "entry", "origin")
            found = pipe.execute()
        changed, pipe = [], self.client.pipeline(transaction=True)
        for entry, (stored, stored_origin) in zip(entries, found, strict=True):
            table = orjson.dumps(entry.to_table())
            if stored == table and text(stored_origin or b"") == origin:
                continue
            changed.append(entry.name)
            key = self.keys.schedule(entry.name)
            pipe.hset(key, mapping={"entry": table, "origin": origin})
            if stored is None:  # new: its own enabled flag, and the catch-up baseline
                pipe.hset(key, mapping={"enabled": int(entry.enabled), "applied_at": now})
            pipe.sadd(self.keys.schedules, entry.name)
        with self.session.guard("applying schedules"):
            pipe.execute()
        return changed

    def entries(self) -> list[StoredSchedule]:
        with self.session.guard("reading schedules"):
            names = sorted(text(n) for n in self.client.smembers(self.keys.schedules))
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hmget(self.keys.schedule(name), *_FIELDS)
            rows = pipe.execute()
        return [_stored(name, row) for name, row in zip(names, rows, strict=True) if row[0]]

    def get(self, name: str) -> StoredSchedule | None:
        with self.session.guard("reading a schedule"):
            row: Any = self.client.hmget(self.keys.schedule(name), *_FIELDS)
        return _stored(name, row) if row[0] else None

    def set_enabled(self, name: str, enabled: bool) -> bool:
        key = self.keys.schedule(name)
        with self.session.guard("enabling a schedule"):
            was: Any = self.client.hget(key, "enabled")
            if was is None:
                return False
            updates: dict[Any, Any] = {"enabled": int(enabled)}
            if enabled and was == b"0":  # re-enabled: missed slots are not made up
                updates["applied_at"] = repr(time.time())
            self.client.hset(key, mapping=updates)
        return True

    def delete(self, name: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.schedule(name), self.keys.schedule_runs(name))
        pipe.srem(self.keys.schedules, name)
        with self.session.guard("deleting a schedule"):
            deleted, _ = pipe.execute()
        return bool(deleted)

    def dispatch(
        self, name: str, slot: datetime, envelope: Envelope, *, drift_ms: float, guard_ttl: float
    ) -> bool:
        now = time.time()
        slot_text = format_slot(slot)
        run = orjson.dumps({"slot": slot_text, "dispatched_at": now, "task_id": envelope.id,
                            "drift_ms": drift_ms})  # fmt: skip
        args = [
            *self.broker.head, name, slot_text, guard_key(name, slot),
            max(1, int(guard_ttl * 1000)), repr(now), run, RUNS_KEPT,
            *self.broker.args.message(envelope, now),
        ]  # fmt: skip
        with self.session.guard("dispatching a slot"):
            self.session.load_scripts()
            return bool(self.session.call(self._dispatch, args))

    def record_failure(self, name: str, slot: datetime, error: str) -> None:
        now = time.time()
        run = orjson.dumps({"slot": format_slot(slot), "dispatched_at": now, "error": error})
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.schedule(name), mapping={
            "last_error": error, "last_run_at": now, "last_slot": format_slot(slot),
        })  # fmt: skip
        pipe.lpush(self.keys.schedule_runs(name), run)
        pipe.ltrim(self.keys.schedule_runs(name), 0, RUNS_KEPT - 1)
        with self.session.guard("recording a failed slot"):
            pipe.execute()

    def runs(self, name: str, limit: int = 50) -> list[ScheduleRun]:
        with self.session.guard("reading runs"):
            raws: Any = self.client.lrange(self.keys.schedule_runs(name), 0, limit - 1)
        found = []
        for raw in raws:
            data = orjson.loads(raw)
            found.append(ScheduleRun(
                name, data["slot"], data["dispatched_at"], data.get("task_id"),
                data.get("drift_ms"), data.get("error"),
            ))  # fmt: skip
        return found


def _stored(name: str, row: Sequence[Any]) -> StoredSchedule:
    entry, enabled, origin, applied_at, last_slot, last_run_at, last_error = row
    return StoredSchedule(
        ScheduleEntry.from_table(orjson.loads(entry), f"the stored schedule {name!r}"),
        enabled != b"0", text(origin or b""), float(applied_at or 0),
        datetime.fromisoformat(text(last_slot)).astimezone(UTC) if last_slot else None,
        float(last_run_at) if last_run_at else None, text(last_error) if last_error else None,
    )  # fmt: skip
