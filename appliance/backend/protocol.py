"""The `ResultBackend` port: task states and results keyed by task id, plus the shared
primitives built on the same store (keys with a TTL, counters, group counts, revokes,
worker heartbeats).

Semantics every adapter keeps (checked by `tests/contract/`):
- `store` upserts a batch atomically; a later write for the same task id replaces the
  earlier one (states only move forward in practice because one owner writes them).
- A result whose `expires_at` has passed is gone: `get` returns None for it, and
  `purge_expired` deletes it for good.
- Any process that opened its own backend sees a stored result (waiting works across
  processes: callers poll `get`).
- Every primitive is atomic across processes and hosts sharing the store; each method
  says what must be atomic. An entry whose TTL has passed is absent to every reader,
  whether or not the store has deleted it yet (`purge_expired` deletes it for good).
- TTLs are seconds (floats, > 0). On SQLite they are measured on this host's wall
  clock; on Redis on the server's clock, so hosts with skewed clocks still agree.
- On SQLite every write joins an enclosing `Database.unit_of_work` (one transaction with
  the broker's settles); on Redis each call is one atomic command or script.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import orjson

from appliance.envelope import dumps_json
from appliance.records import record
from appliance.states import TaskState


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure as data: it crossed a process boundary, so no exception objects."""

    type: str
    message: str
    traceback: str = ""


@record
class TaskResult:
    """The stored state of one task."""

    task_id: str
    state: TaskState
    name: str = ""
    queue: str = ""
    value: Any = None  # JSON value returned by the task (SUCCESS)
    error: ErrorInfo | None = None
    attempt: int = 0
    worker: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    progress: float | None = None
    progress_data: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    expires_at: float | None = None  # epoch seconds; None keeps it until purged


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """One child slot of a supervisor, as its last beat saw it (the TUI's Workers view)."""

    slot: int
    pool: str
    pid: int
    state: str  # starting | idle | running | exiting | empty
    task_id: str | None = None
    task: str | None = None  # the task's name
    runtime_s: float | None = None  # of the task running
    soft_limit_s: float | None = None
    hard_limit_s: float | None = None
    progress: float | None = None  # percent
    rss: int | None = None  # bytes
    beat_age_s: float | None = None  # since the child last said it was alive
    tasks_done: int = 0


@dataclass(frozen=True, slots=True)
class WorkerHeartbeat:
    """What one supervisor publishes about itself (SPEC 3), replaced on every beat."""

    id: str  # the worker's name (`stem worker run --name`, default HOST:PID): unique
    host: str
    pid: int
    pools: tuple[str, ...]
    queues: tuple[str, ...]
    concurrency: int  # children across all pools
    in_flight: int  # deliveries held right now
    processed: int  # tasks settled since start
    failed: int  # of those, tasks that ended in a failure
    started_at: float  # epoch seconds
    version: str  # stem-appliance version
    sent_at: float  # epoch seconds, when this beat was written
    consumer: str = ""  # the process (`Consumer.name`: host:pid:starttime)
    status: str = "serving"  # serving | draining | store unreachable since ... | starting
    paused: tuple[str, ...] = ()  # queues this worker is not claiming from
    children: tuple[ChildInfo, ...] = ()
    interval_s: float = 0.0  # seconds between beats (a beat older than ~2 of these is late)


# One codec per record, shared by both stores (Redis values and SQLite BLOB columns).
_RESULT_FIELDS = tuple(f.name for f in fields(TaskResult))


def encode_result(result: TaskResult) -> bytes:
    """A `TaskResult` as JSON bytes (`dumps_json` refuses NaN and non-JSON values), in a
    buffer of its own size: orjson 3.12+ returns at least 4 KiB however short the JSON
    (a no-op task's result is ~250 bytes), and the supervisor encodes a whole settle
    batch (up to 256) before it sends it: 1 MB of its peak RSS in a drain. The copy
    costs ~0.2 us."""
    return bytes(memoryview(dumps_json({name: getattr(result, name) for name in _RESULT_FIELDS})))


def decode_result(raw: bytes) -> TaskResult:
    data: dict[str, Any] = orjson.loads(raw)
    error = data.pop("error", None)
    return TaskResult(
        **data | {"state": TaskState(data["state"]), "error": ErrorInfo(**error) if error else None}
    )


def encode_heartbeat(heartbeat: WorkerHeartbeat) -> bytes:
    return dumps_json(asdict(heartbeat))


def decode_heartbeat(raw: bytes) -> WorkerHeartbeat:
    data: dict[str, Any] = orjson.loads(raw)
    data = {k: v for k, v in data.items() if k in _HEARTBEAT_FIELDS}  # a newer writer's extras
    # JSON has no tuples: restore them, so a decoded beat equals (and hashes like) the sent one.
    return WorkerHeartbeat(
        **data | {
            "pools": tuple(data["pools"]), "queues": tuple(data["queues"]),
            "paused": tuple(data.get("paused", ())),
            "children": tuple(ChildInfo(**c) for c in data.get("children", ())),
        }
    )  # fmt: skip


_HEARTBEAT_FIELDS = frozenset(f.name for f in fields(WorkerHeartbeat))


def check_ttl(ttl: float) -> float:
    """`ttl` if it is a usable TTL; a zero or negative TTL is a caller bug, not "expired"."""
    if not ttl > 0:  # also refuses NaN
        raise ValueError(f"a TTL must be a positive number of seconds, got {ttl!r}")
    return ttl


def as_bytes(value: bytes | str) -> bytes:
    """Key values are compared byte for byte, so text is stored as its UTF-8 bytes."""
    return value.encode() if isinstance(value, str) else value


class ResultBackend(Protocol):
    """Stores and serves `TaskResult`s, and the primitives that unique tasks, locks,
    rate limits, chords, revokes and worker listings are built on."""

    url: str

    def store(self, results: Sequence[TaskResult]) -> None:
        """Upsert results, all or none, durably."""
        ...

    def get(self, task_id: str) -> TaskResult | None:
        """The stored result, or None if unknown or expired."""
        ...

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        """Stored, unexpired results of the ids that have one."""
        ...

    def forget(self, task_ids: Sequence[str]) -> None:
        """Delete results (DLQ replay resets a task to PENDING this way)."""
        ...

    def purge_expired(self) -> int:
        """Delete expired results and expired primitive entries (keys, counters, groups,
        revokes, heartbeats). Returns how many entries were deleted."""
        ...

    # -- keys with a TTL: unique tasks and locks ---------------------------------------

    def put_if_absent(self, key: str, value: bytes | str, ttl: float) -> bool:
        """Store `value` under `key` for `ttl` seconds unless a live entry exists.

        Atomic test-and-set: of any number of concurrent callers (any process, any host)
        exactly one gets True. An expired entry counts as absent and is replaced.
        """
        ...

    def get_key(self, key: str) -> bytes | None:
        """The live value of `key` (text comes back as its UTF-8 bytes), or None."""
        ...

    def delete_key(self, key: str, value: bytes | str | None = None) -> bool:
        """Delete `key`; with `value`, only if the live entry still holds that value
        (a lock is released only by its owner, never after it expired and was taken
        over). The compare and the delete are one atomic step. True if deleted."""
        ...

    def refresh_key(self, key: str, value: bytes | str, ttl: float) -> bool:
        """Set the TTL of `key` to `ttl` seconds from now, only if its live entry still
        holds `value` (a lease is extended only while it is ours). Atomic compare and
        set; True if extended, False if the entry is gone, expired or someone else's."""
        ...

    # -- counters ------------------------------------------------------------------------

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add `amount` (may be negative) to the counter `key` (absent: 0) and return the
        new value. Atomic: concurrent increments from any processes all count.

        `ttl` applies when this call creates the counter (a fixed window: rate limits
        use one key per window); later increments keep that expiry. Counters are a
        keyspace of their own: `get_key` does not see them.
        """
        ...

    # -- groups and chords -----------------------------------------------------------------

    def group_init(self, group_id: str, size: int, ttl: float) -> bool:
        """Create a group of `size` members that expires `ttl` seconds from now.

        Idempotent (enqueues are at-least-once): if the live group exists this changes
        nothing and returns False, so a repeated init never forgets finished members.
        An expired group is replaced by a fresh, empty one (True).
        """
        ...

    def group_add_result(self, group_id: str, index: int, result: TaskResult) -> int:
        """Record member `index` (0 <= index < size) as finished with `result`; return
        how many distinct members have finished.

        Atomic: the insert and the count are one step, so of concurrent reports exactly
        one sees the count reach `size`. A repeated report of the same index (at-least-
        once delivery) keeps the first result and returns the count unchanged, so the
        caller that completes a chord may see `size` twice: the callback enqueue must be
        idempotent itself (e.g. `put_if_absent` on the group id). A whole `TaskResult`
        is stored, not just its value, so the chord can tell success from failure.
        Returns 0 for an unknown or expired group; raises ValueError for a bad index.
        """
        ...

    def group_results(self, group_id: str) -> list[TaskResult]:
        """The results of the members reported so far, in index order (all of them once
        `group_add_result` returned the size). Empty for an unknown or expired group."""
        ...

    # -- revokes ------------------------------------------------------------------------------

    def revoke(self, task_ids: Sequence[str], ttl: float) -> None:
        """Mark tasks revoked for `ttl` seconds (long enough to outlive their messages).
        Stored, all or none: a supervisor started later still honours it. Revoking an
        id again never shortens its earlier expiry."""
        ...

    def is_revoked(self, task_id: str) -> bool:
        """True while a revoke of `task_id` is live."""
        ...

    def list_revoked(self) -> set[str]:
        """Every live revoked task id (a supervisor loads them at start and on a timer)."""
        ...

    # -- worker heartbeats --------------------------------------------------------------------

    def put_worker_heartbeat(self, heartbeat: WorkerHeartbeat, ttl: float) -> None:
        """Publish (replace) the record of `heartbeat.id`; it vanishes `ttl` seconds
        later unless published again, so a dead worker drops out by itself."""
        ...

    def list_workers(self) -> list[WorkerHeartbeat]:
        """The live heartbeat records, ordered by worker id."""
        ...

    def remove_worker(self, worker_id: str) -> None:
        """Delete the record at once (a clean shutdown does not wait for the TTL)."""
        ...

    def close(self) -> None: ...
