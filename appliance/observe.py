"""The one read façade over the broker and the result backend.

The CLI and the TUI read (and act on the DLQ) only through `Observer`, so both show the
same merged view of a task and both reset replayed tasks the same way. Everything
returned is a plain frozen dataclass: no printing, no formatting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from appliance.states import TaskState, derive_state

if TYPE_CHECKING:
    from appliance.app import Stem
    from appliance.backend.protocol import TaskResult, WorkerHeartbeat
    from appliance.broker.protocol import DeadLetterEntry, MessageInfo, QueueStats
    from appliance.stores import Stores


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
