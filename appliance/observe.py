"""The one read façade over the broker and the result backend.

The CLI and the TUI read (and act on the DLQ) only through `Observer`, so both show the
same merged view of a task and both reset replayed tasks the same way. Everything
returned is a plain frozen dataclass: no printing, no formatting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from appliance.states import TaskState, derive_state

if TYPE_CHECKING:
    import sqlite3

    from appliance.app import Stem
    from appliance.backend.protocol import TaskResult, WorkerHeartbeat
    from appliance.broker.protocol import Broker, DeadLetterEntry, MessageInfo, QueueStats
    from appliance.envelope import Envelope
    from appliance.stores import Stores
    from appliance.stores.sqlite.broker import SqliteBroker


@dataclass(frozen=True, slots=True)
class TaskDetail:
    """One task as the broker and the backend know it, merged."""

    task_id: str
    state: TaskState
    message: MessageInfo | None  # waiting or in flight
    result: TaskResult | None  # stored state, value or error
    # Lineage and canvas (`Broker.task_record`), read for `task_show` only.
    parent_id: str | None = None
    root_id: str | None = None
    children: tuple[str, ...] = ()
    canvas: dict[str, Any] | None = (
        None  # {kind: chain|group|chord|chord callback, id, index, size}
    )
    duplicates: int = 0  # enqueues of this unique task that returned its handle instead
    last_duplicate_at: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A DLQ entry with its payload decoded for display (`args` None if it does not
    decode as a JSON object; `raw` then holds the payload as text)."""

    id: str
    task_id: str | None
    name: str | None
    queue: str
    reason: str
    error_type: str
    message: str
    traceback: str
    attempts: int
    enqueued_at: float | None
    dead_at: float
    args: dict[str, Any] | None
    raw: str | None


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """One page of the DLQ (1-based `page`) and the total it was cut from."""

    entries: list[DeadLetter]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.page_size))


class Observer:
    """Reads queues, tasks and the DLQ of one `Stem`'s stores; replays and purges."""

    def __init__(self, stem: Stem) -> None:
        self.stem = stem

    def queue_stats(self) -> list[QueueStats]:
        return sorted(self.stem.broker.queue_stats(), key=lambda s: s.queue)

    def workers(self) -> list[WorkerHeartbeat]:
        """The supervisors alive now (their heartbeat records, which expire on their own)."""
        return self.stem.backend.list_workers()

    def tasks_list(
        self, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[MessageInfo]:
        """Messages waiting or in flight, in claim order."""
        return self.stem.broker.list_messages(queue, limit=limit, offset=offset)

    def task_show(self, task_id: str) -> TaskDetail | None:
        """The merged view of a task, or None when neither store knows the id."""
        detail = read_task(self.stem.stores, task_id, with_record=True)
        known = detail.message or detail.result or detail.parent_id or detail.children
        return detail if known else None

    def dlq_list(
        self, queue: str | None = None, page: int = 1, page_size: int = 20
    ) -> DeadLetterPage:
        """Dead letters, newest first, one page at a time."""
        if page < 1 or page_size < 1:
            raise ValueError("page and page_size must be >= 1")
        broker = self.stem.broker
        entries = broker.dlq_list(queue, limit=page_size, offset=(page - 1) * page_size)
        return DeadLetterPage(
            [_dead_letter(e) for e in entries], broker.dlq_count(queue), page, page_size
        )

    def dlq_count(self, queue: str | None = None) -> int:
        return self.stem.broker.dlq_count(queue)

    def dlq_show(self, entry_id: str) -> DeadLetter | None:
        entry = self.stem.broker.dlq_get(entry_id)
        return _dead_letter(entry) if entry is not None else None

    def dlq_replay(self, queue: str | None = None, limit: int | None = None) -> list[str]:
        """Put dead letters back on their queues; returns the replayed task ids.

        Their stored DEAD results are forgotten, so the tasks read PENDING again instead
        of looking finished while they wait to run.
        """
        task_ids = self.stem.broker.dlq_replay(queue, limit=limit)
        if task_ids:
            self.stem.backend.forget(task_ids)
        return task_ids

    def dlq_purge(self, queue: str | None = None) -> int:
        """Delete dead letters for good; their DEAD results stay as history."""
        return self.stem.broker.dlq_purge(queue)

    # --- for the TUI: filtered pages and chosen entries --------------------------------

    def dlq_find(
        self, where: DeadLetterFilter, page: int = 1, page_size: int = 20
    ) -> DeadLetterPage:
        """Dead letters matching `where`, newest first, one page at a time."""
        return _dlq_find(self, where, page, page_size)

    def dlq_replay_entries(self, entry_ids: Sequence[str]) -> list[str]:
        """Replay the chosen dead letters (ids from `dlq_list`); returns the replayed
        task ids, whose DEAD results are forgotten as `dlq_replay` does.

        The results are forgotten before the messages go back (on SQLite in the same
        transaction): a worker can run a replayed task at once, and forgetting after it
        would delete the new result."""
        entries = [e for e in map(self.stem.broker.dlq_get, entry_ids) if e is not None]
        task_ids = [e.task_id for e in entries if e.task_id is not None]
        return _replay_entries(self.stem.stores, [e.id for e in entries], task_ids)

    def dlq_purge_entries(self, entry_ids: Sequence[str]) -> int:
        """Delete the chosen dead letters for good; returns how many were deleted."""
        return _purge_entries(self.stem.broker, entry_ids)

    def dlq_envelope(self, entry_id: str) -> Envelope | None:
        """A dead letter's whole envelope (meta, headers, parent and root ids, retry
        settings) for the detail view; None if it is gone or does not decode."""
        entry = self.stem.broker.dlq_get(entry_id)
        return self.stem.codec.peek(entry.payload) if entry is not None else None


def read_task(stores: Stores, task_id: str, *, with_record: bool = False) -> TaskDetail:
    """What the stores hold about a task and its state (`derive_state`): the one read
    behind `TaskHandle.state()`, `stem observe tasks show` and the TUI. The message is
    read first, then the result (see `derive_state` for why the order matters), then
    (`with_record`) its lineage and canvas place."""
    message = stores.broker.find_message(task_id)
    result = stores.backend.get(task_id)
    state = derive_state(
        message.state if message is not None else None, result.state if result else None
    )
    record = stores.broker.task_record(task_id) if with_record else None
    if record is None:
        return TaskDetail(task_id, state, message, result)
    return TaskDetail(
        task_id, state, message, result, record.parent_id, record.root_id, record.children,
        record.canvas, record.duplicates, record.last_duplicate_at,
    )  # fmt: skip


def _dead_letter(entry: DeadLetterEntry) -> DeadLetter:
    args: dict[str, Any] | None = None
    raw: str | None = None
    try:
        decoded = orjson.loads(entry.payload)
    except orjson.JSONDecodeError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("args"), dict):
        args = decoded["args"]
    else:  # undecodable: show what is there rather than nothing
        raw = entry.payload.decode("utf-8", errors="replace")
    return DeadLetter(
        id=entry.id,
        task_id=entry.task_id,
        name=entry.name,
        queue=entry.queue,
        reason=entry.reason,
        error_type=entry.error_type,
        message=entry.message,
        traceback=entry.traceback,
        attempts=entry.attempts,
        enqueued_at=entry.enqueued_at,
        dead_at=entry.dead_at,
        args=args,
        raw=raw,
    )


# --- schedules (Beat) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """One Beat entry for `stem schedule list`, `stem observe schedules` and the TUI."""

    name: str
    task: str
    spec: str
    enabled: bool
    next_run: str | None  # ISO 8601 UTC of the next slot, None when there is none
    last_run: str | None  # the last slot dispatched (ISO 8601 UTC)
    last_run_at: float | None  # when it was dispatched (epoch seconds)
    last_error: str | None
    runs: int  # runs recorded (the newest ones are kept)
    drift_ms: dict[str, float] | None  # p50, p99, max of the recorded dispatches
    origin: str


def schedule_views(stem: Stem, limit: int = 200) -> list[ScheduleView]:
    """Every stored Beat entry with its next slot and the drift of its recent runs."""
    from datetime import UTC, datetime

    from appliance.beat.calendar import format_slot, next_slot

    now = datetime.now(UTC)
    views = []
    schedules = stem.stores.schedules
    for stored in schedules.entries():
        entry = stored.entry
        upcoming = next_slot(entry, now) if stored.enabled else None
        runs = schedules.runs(entry.name, limit)
        drifts = sorted(r.drift_ms for r in runs if r.drift_ms is not None)
        views.append(ScheduleView(
            entry.name, entry.task, entry.spec, stored.enabled,
            format_slot(upcoming) if upcoming else None,
            format_slot(stored.last_slot) if stored.last_slot else None, stored.last_run_at,
            stored.last_error or None, len(runs), _drift(drifts), stored.origin,
        ))  # fmt: skip
    return views


def _drift(ordered: list[float]) -> dict[str, float] | None:
    if not ordered:
        return None

    def pick(pct: float) -> float:
        return ordered[min(len(ordered) - 1, int(pct / 100 * len(ordered)))]

    return {"p50": round(pick(50), 2), "p99": round(pick(99), 2), "max": round(ordered[-1], 2)}


# --- the TUI's DLQ view: filters and chosen entries -----------------------------------

# Dead letters read per query while a name or reason filter scans the DLQ (newest first).
DLQ_SCAN_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """What a DLQ view narrows to: the original queue exactly (an indexed query), the
    task name and the reason as case-insensitive substrings (a scan; see `dlq_find`)."""

    queue: str | None = None
    name: str = ""
    reason: str = ""

    @property
    def scans(self) -> bool:
        return bool(self.name or self.reason)

    def matches(self, entry: DeadLetterEntry) -> bool:
        return (
            self.name.casefold() in (entry.name or "").casefold()
            and self.reason.casefold() in entry.reason.casefold()
        )


def _dlq_find(
    observer: Observer, where: DeadLetterFilter, page: int, page_size: int
) -> DeadLetterPage:
    """A page of the dead letters `where` matches, newest first, with their total.

    Queue alone is the broker's indexed page. A name or reason filter reads the queue's
    (or the whole) DLQ in chunks and decodes only the page's entries: the brokers have
    no index on name or reason, so this costs one pass over the DLQ (about 10,000
    entries in well under a second on SQLite)."""
    if page < 1 or page_size < 1:
        raise ValueError("page and page_size must be >= 1")
    if not where.scans:
        return observer.dlq_list(where.queue, page=page, page_size=page_size)
    broker = observer.stem.broker
    first = (page - 1) * page_size
    total, chosen, offset = 0, [], 0
    while True:
        chunk = broker.dlq_list(where.queue, limit=DLQ_SCAN_CHUNK, offset=offset)
        for entry in chunk:
            if where.matches(entry):
                if first <= total < first + page_size:
                    chosen.append(_dead_letter(entry))
                total += 1
        if len(chunk) < DLQ_SCAN_CHUNK:
            return DeadLetterPage(chosen, total, page, page_size)
        offset += DLQ_SCAN_CHUNK


def _replay_entries(stores: Stores, entry_ids: Sequence[str], task_ids: list[str]) -> list[str]:
    """Forget `task_ids`' results, then replay the chosen dead letters (each atomically;
    an id already gone is skipped).

    Stopgap: the `Broker` port replays and purges by queue only, so this reaches into
    each adapter for the per-entry step its own `dlq_replay` takes. It belongs in the
    port as `dlq_replay_ids(ids)`; then this becomes one call."""
    from appliance.stores.sqlite.broker import SqliteBroker

    broker = stores.broker
    if isinstance(broker, SqliteBroker):
        with stores.unit_of_work():
            if task_ids:
                stores.backend.forget(task_ids)
            replayed = _sqlite_replay(broker, entry_ids)
            # After the commit, so the woken workers see the messages.
            broker._db.on_commit(broker._waker.poke)
        return replayed
    if task_ids:
        stores.backend.forget(task_ids)
    replayed = []
    for entry_id in entry_ids:
        entry = broker.dlq_get(entry_id)
        if entry is not None and _redis_replay_one(broker, entry) and entry.task_id is not None:
            replayed.append(entry.task_id)
    return replayed


def _sqlite_replay(broker: SqliteBroker, entry_ids: Sequence[str]) -> list[str]:
    from appliance.stores.common import replay_of
    from appliance.stores.sqlite import broker as sq
    from appliance.stores.sqlite import flow

    def work(conn: sqlite3.Connection) -> list[str]:
        now = time.time()
        task_ids = []
        for entry_id in entry_ids:
            row = conn.execute(sq._DLQ_GET, (entry_id,)).fetchone()
            if row is None:
                continue  # replayed or purged meanwhile
            entry = sq._dead_letter(row)
            priority = int(entry.extra.get("priority", 0))
            replay = replay_of(broker.codec, entry.queue, priority, entry.payload, entry.task_id)
            rate = replay.rate or (None, None)
            conn.execute(flow.INSERT_MESSAGE, (
                replay.task_id, replay.name, replay.queue, replay.priority, "ready", None, 0,
                replay.enqueued_at or entry.enqueued_at or now, replay.payload, *rate,
            ))  # fmt: skip
            conn.execute(sq._DLQ_DELETE, (entry_id,))
            if replay.task_id is not None:
                task_ids.append(replay.task_id)
        return task_ids

    task_ids: list[str] = broker._db.write(work)
    return task_ids


def _redis_replay_one(broker: Broker, entry: DeadLetterEntry) -> bool:
    from appliance.stores.redis.broker import RedisBroker

    if not isinstance(broker, RedisBroker):
        raise TypeError(f"no per-entry DLQ replay for {type(broker).__name__}")
    with broker._guard("dlq_replay"):
        return broker._replay_one(entry)


def _purge_entries(broker: Broker, entry_ids: Sequence[str]) -> int:
    """Delete the chosen dead letters; how many were there. Stopgap like
    `_replay_entries`: belongs in the port as `dlq_delete(ids)`."""
    from appliance.stores.sqlite.broker import SqliteBroker

    if isinstance(broker, SqliteBroker):
        from appliance.stores.sqlite import broker as sq

        def work(conn: sqlite3.Connection) -> int:
            return sum(conn.execute(sq._DLQ_DELETE, (i,)).rowcount for i in entry_ids)

        deleted: int = broker._db.write(work)
        return deleted
    from appliance.stores.redis.broker import RedisBroker

    if not isinstance(broker, RedisBroker):
        raise TypeError(f"no per-entry DLQ purge for {type(broker).__name__}")
    count = 0
    with broker._guard("dlq_purge"):
        for entry_id in entry_ids:
            entry = broker.dlq_get(entry_id)
            if entry is None:
                continue
            keys = broker.keys
            pipe = broker.client.pipeline(transaction=True)
            pipe.zrem(keys.dlq, entry_id)
            pipe.zrem(keys.dlq_queue(entry.queue), entry_id)
            pipe.hdel(keys.dlq_entry, entry_id)
            pipe.hdel(keys.dlq_payload, entry_id)
            removed, *_ = pipe.execute()
            count += int(removed)
    return count
