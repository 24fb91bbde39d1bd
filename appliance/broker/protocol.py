"""The `Broker` port. Every adapter (SQLite, Redis) keeps the semantics written here;
`tests/contract/` checks them against each adapter.

Vocabulary
- A *message* is one encoded `Envelope` waiting in a queue.
- A *delivery* is one lease on a message: claimed by a consumer until `lease_until`
  (wall clock). While the lease holds, no other consumer can claim the message. When
  it expires the message is claimable again (at-least-once).
- A delivery is *settled* exactly once by its owner: ack, retry, dead-letter or release.
  A message leaves the broker only through ack or dead-letter ("rows leave only on ack").
- `deliveries` counts claims of the current attempt (incremented in the claim itself),
  so a task that kills its child on every run is still counted (poison pill).
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.envelope import Envelope
from appliance.flow import FollowUps
from appliance.records import record
from appliance.states import DeadLetterReason, SettleKind


class Wake(enum.Flag):
    """What a wake-up said: new messages may be due, a control request was sent."""

    NONE = 0
    MESSAGES = enum.auto()
    CONTROL = enum.auto()


@dataclass(frozen=True, slots=True)
class Consumer:
    """Who holds a lease: host, pid and process start time (pids are reused)."""

    host: str
    pid: int
    started: float  # process create time, epoch seconds

    @classmethod
    def this_process(cls) -> Consumer:
        import psutil

        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}:{self.started:.3f}"

    @classmethod
    def parse(cls, name: str) -> Consumer:
        host, pid, started = name.rsplit(":", 2)
        return cls(host, int(pid), float(started))


# psutil's create_time is rounded; two readings of one process can differ slightly.
CREATE_TIME_SLACK_S = 1.0  # seconds: psutil's create time is tick-rounded


def consumer_gone(owner: str, me: Consumer) -> bool:
    """True when `owner` is a consumer on this host whose process provably ended: its
    pid is not running, is a zombie, or now belongs to a process started at another time."""
    import psutil

    try:
        holder = Consumer.parse(owner)
    except ValueError:
        return False  # not ours to judge
    if holder.host != me.host:
        return False
    if holder.pid == me.pid:
        return abs(holder.started - me.started) > CREATE_TIME_SLACK_S
    try:
        process = psutil.Process(holder.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return abs(process.create_time() - holder.started) > CREATE_TIME_SLACK_S
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False  # another user's live process


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One line of `stem health`: what was checked, whether it passed, and the figure."""

    name: str
    ok: bool
    detail: str


@record
class Delivery:
    """One claimed message. `receipt` identifies the lease to the adapter that made it."""

    receipt: str
    queue: str
    payload: bytes  # the raw envelope bytes (may not decode: see `Worker` handling)
    deliveries: int  # claims of the current attempt, this one included
    lease_until: float


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """Why and how a task ended in the DLQ."""

    reason: DeadLetterReason
    error_type: str = ""
    message: str = ""
    traceback: str = ""


@record
class Settlement:
    """What to do with a delivery. Built by the worker, applied by `Broker.settle`."""

    kind: SettleKind
    delivery: Delivery
    envelope: Envelope | None = None  # RETRY: the next attempt's envelope
    dead: DeadLetterInfo | None = None  # DEAD: the reason and error
    count_delivery: bool = True  # RELEASE: False gives back the claim (never started)
    # ACK, DEAD: applied in the same transaction, only by the settle that removes the
    # message (see `appliance.flow`)
    follow: FollowUps | None = None

    @classmethod
    def ack(cls, delivery: Delivery, follow: FollowUps | None = None) -> Settlement:
        return cls(SettleKind.ACK, delivery, follow=follow)

    @classmethod
    def retry(cls, delivery: Delivery, envelope: Envelope) -> Settlement:
        return cls(SettleKind.RETRY, delivery, envelope=envelope)

    @classmethod
    def dead_letter(
        cls, delivery: Delivery, info: DeadLetterInfo, follow: FollowUps | None = None
    ) -> Settlement:
        return cls(SettleKind.DEAD, delivery, dead=info, follow=follow)

    @classmethod
    def release(cls, delivery: Delivery, *, count_delivery: bool) -> Settlement:
        return cls(SettleKind.RELEASE, delivery, count_delivery=count_delivery)


@dataclass(frozen=True, slots=True)
class QueueStats:
    queue: str
    ready: int = 0  # claimable now
    delayed: int = 0  # waiting for not_before
    in_flight: int = 0  # leased
    dead: int = 0  # in the DLQ
    paused: bool = False  # workers do not claim from it (`Broker.pause`)


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """A message as observed (CLI `observe tasks list`)."""

    task_id: str
    name: str
    queue: str
    priority: int
    attempt: int
    deliveries: int
    state: str  # "ready" | "delayed" | "leased"
    not_before: float | None
    lease_until: float | None
    owner: str | None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """What the broker keeps about a task beyond its message (`stem observe tasks show`):
    its lineage, its place in a canvas, its children and its duplicates."""

    task_id: str
    parent_id: str | None = None
    root_id: str | None = None
    canvas: dict[str, Any] | None = None  # {kind, id, index, size}
    children: tuple[str, ...] = ()  # tasks it enqueued (links and chain steps included)
    duplicates: int = 0  # enqueues of the same unique task it absorbed
    last_duplicate_at: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One DLQ row."""

    id: str  # the DLQ entry id (adapter-specific, stable)
    task_id: str | None
    name: str | None
    queue: str
    reason: str
    error_type: str
    message: str
    traceback: str
    attempts: int
    payload: bytes
    enqueued_at: float | None
    dead_at: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Copies:
    """Messages that are `envelope` in every stored field but their task id and payload
    (`payloads[i]` is what `EnvelopeCodec` encoded for `ids[i]`): how `Stem.enqueue_many`
    hands a broker many tasks of one template without an `Envelope` each. A lone
    envelope is `Copies.of` it."""

    envelope: Envelope
    ids: list[str]
    payloads: list[bytes]

    @classmethod
    def of(cls, envelope: Envelope, payload: bytes) -> Copies:
        return cls(envelope, [envelope.id], [payload])


@dataclass(slots=True)
class Parked:
    """What a parked claim brought: deliveries to run; deliveries to give back unstarted
    (`give_back`: rate-limited, for the ordinary claim to book into their slot); and
    whether the pool should claim at once (`claim_now`: the park came back full, so more
    may be waiting; or it failed, and the ordinary claim must see for itself)."""

    deliveries: list[Delivery] = field(default_factory=list)
    give_back: list[Delivery] = field(default_factory=list)
    claim_now: bool = False


class ClaimParking(Protocol):
    """Claims that wait inside the store: an idle pool's claim is left blocked in the
    store (Redis: XREADGROUP BLOCK on a connection of its own), so a new message is
    handed to the worker in the producer's own round trip instead of a wake-up and then
    a claim. One park per pool (`key`), holding room for `count` deliveries: before any
    ordinary claim for that pool, `cancel` it, so the pool is never given more than it
    has room for."""

    def fd(self, key: str) -> int:
        """A descriptor that turns readable when the park of `key` has a reply (watch it
        with poll or select); the same number for the life of this object."""
        ...

    def park(
        self, key: str, queues: Sequence[str], count: int, *, consumer: Consumer, lease: float
    ) -> bool:
        """Wait for up to `count` new messages of `queues`; False when it cannot now (no
        stream known yet, a recent failure): the wake-up and the poll still serve."""
        ...

    def is_parked(self, key: str) -> bool: ...

    def collect(self, key: str) -> Parked:
        """Read the reply after `fd(key)` turned readable."""
        ...

    def cancel(self, key: str) -> Parked:
        """Stop waiting; what was delivered before the cancel took effect is returned."""
        ...

    def covers(self, key: str) -> bool:
        """Whether every message the last wake-up (`Broker.clear_wake`) announced for the
        queues of `key`'s park will come through the park itself."""
        ...

    def close(self) -> None: ...


class Broker(Protocol):
    """Durable queues with leases. All methods are safe to call from any process that
    opened its own broker (connections never cross a fork)."""

    url: str

    def enqueue(self, envelopes: Sequence[Envelope], *, connection: Any = None) -> None:
        """Store the messages durably (on disk / in the AOF) before returning; all or none
        (callers send at most a few thousand at once: `Stem.enqueue_many` chunks).

        `connection` (SQLite only): write inside the caller's open transaction on the same
        database file, so the messages commit or roll back with the caller's work.
        Raises `BrokerFull` when out of space, `BrokerUnavailable` when unreachable.
        """
        ...

    def enqueue_copies(self, batches: Sequence[Copies]) -> None:
        """Store the messages of `batches`, already encoded, in order, as `enqueue` would
        store the envelopes they stand for: durably, all or none, then wake listeners."""
        ...

    def enqueue_guarded(
        self, envelope: Envelope, key: str, ttl: float, *, note_duplicate: bool = False
    ) -> str | None:
        """Store one message only if the guard `key` is free: take the guard (its value:
        the envelope's task id, for `ttl` seconds) and store the message, atomically (one
        transaction, one script); or store nothing and return the task id the guard
        holds (with `note_duplicate`, counted on that task's record). Unique tasks and
        Beat's slots are guards; the settle that ends a unique task releases its guard
        (`FollowUps.release`)."""
        ...

    def enqueue_chord(
        self, chord_id: str, members: Sequence[Envelope], callback: Envelope, ttl: float
    ) -> None:
        """Store a chord: its record (size, the callback's sealed message, kept `ttl`
        seconds) and its members, all or none. The settle whose member count completes
        the chord stores the callback (`FollowUps.chord`)."""
        ...

    def chord_values(self, chord_id: str, size: int) -> list[Any]:
        """The values of a complete chord's members, in member order (the callback's
        `previous`). Raises `LookupError` if the chord is unknown, expired or short."""
        ...

    def task_record(self, task_id: str) -> TaskRecord | None:
        """Lineage, canvas place, children and duplicates of a task, if it has any."""
        ...

    def claim(
        self, queues: Sequence[str], limit: int, *, consumer: Consumer, lease: float
    ) -> list[Delivery]:
        """Lease up to `limit` due messages from `queues`, atomically.

        Within a queue: higher `priority` first, then enqueue order. Never returns a
        message before its `not_before`. Each claim increments `deliveries`. A
        rate-limited message whose slot has not come is booked into its next slot
        (delayed, not counted) and the claim goes on (`appliance.ratelimit`).
        Returns [] at once when nothing is due (never blocks; see `wake_fd`).
        """
        ...

    def settle(self, settlements: Sequence[Settlement]) -> None:
        """Apply many settlements in one transaction / round trip (group commit).

        ACK removes the message. RETRY replaces the payload with the next attempt's
        envelope, resets `deliveries` and makes it claimable at `envelope.not_before`.
        DEAD moves it to the DLQ with its reason. RELEASE makes it claimable now
        (uncounting the claim when `count_delivery` is False). A settlement for a lease
        that was lost (expired and re-claimed by another consumer) changes nothing
        except that ACK and DEAD still remove the message (the task did finish).
        The follow-ups of an ACK or DEAD (`appliance.flow`) are applied in the same
        transaction, only if that settle removed the message.
        """
        ...

    def extend(self, deliveries: Sequence[Delivery], lease: float) -> list[Delivery]:
        """Push the leases of still-held deliveries to now + `lease` seconds. Returns the
        deliveries whose lease was lost (it expired and the message was claimed again,
        settled, or is gone): those are not extended, and their owner should know."""
        ...

    def recover(self, consumer: Consumer) -> int:
        """Make claimable the messages whose leases have expired, and those leased by
        consumers on this host that are provably dead. Returns how many."""
        ...

    def next_due(self, queues: Sequence[str]) -> float | None:
        """The earliest `not_before` of delayed messages in `queues`, or None."""
        ...

    def wake_fd(self, queues: Sequence[str]) -> int | None:
        """A file descriptor that turns readable when new messages may be due in
        `queues`, or a control request was sent (`Stores.control`), for a select loop;
        None if this adapter can only be polled."""
        ...

    def clear_wake(self) -> Wake:
        """Consume pending wake-ups after `wake_fd` turned readable; what they were."""
        ...

    def parking(self) -> ClaimParking | None:
        """Parked claims for this worker's pools (see `ClaimParking`), or None where the
        store has none (SQLite: its claim is an in-process transaction) or may not
        (Redis over TLS, or an ACL without CLIENT UNBLOCK)."""
        ...

    def durability_warnings(self) -> list[str]:
        """Why an enqueue that returned could still be lost with this store's settings
        (Redis without AOF or with an evicting policy, SQLite synchronous=NORMAL); the
        worker logs them at start. Empty when the store keeps what it acknowledged."""
        ...

    def watch_identity(self) -> str | None:
        """Check that the store still holds the data this broker opened (a supervisor
        calls this every few seconds). Raises `StoreReplaced` when this process can no
        longer serve it: the SQLite file was deleted or replaced under it (producers
        already write to another file). Returns a warning, once, when the store lost its
        data but can still be served: a Redis that restarted without persistence or was
        flushed. None when all is well."""
        ...

    def health_checks(self) -> list[HealthCheck]:
        """What `stem health` should say about this store beyond reachability: SQLite its
        integrity (`quick_check`) and WAL size; Redis its durability settings and memory.
        Each check names itself; none raises for a reachable store."""
        ...

    def idle(self) -> None:
        """Upkeep for a consumer with nothing to do. SQLite checkpoints the WAL into the
        database and truncates it, so it cannot grow without bound under steady load;
        stores that need no upkeep do nothing. Never raises for a busy store."""
        ...

    # --- pausing queues ----------------------------------------------------------------

    def pause(self, queue: str) -> bool:
        """Mark `queue` paused (stored: every worker on this store, and one started later,
        stops claiming from it; its messages stay). False if it already was."""
        ...

    def resume(self, queue: str) -> bool:
        """Unpause `queue`. False if it was not paused."""
        ...

    def paused(self) -> dict[str, float]:
        """The paused queues, each with when it was paused (epoch seconds)."""
        ...

    # --- observation and the DLQ -----------------------------------------------------

    def queue_stats(self) -> list[QueueStats]:
        """Counts per queue (every queue that holds messages or dead letters, or is
        paused), sorted by queue name."""
        ...

    def list_messages(
        self, queue: str | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[MessageInfo]:
        """Messages waiting or in flight, in claim order."""
        ...

    def find_message(self, task_id: str) -> MessageInfo | None:
        """The waiting or in-flight message of a task id, if any."""
        ...

    def dlq_list(
        self, queue: str | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[DeadLetterEntry]:
        """Dead letters, newest first."""
        ...

    def dlq_count(self, queue: str | None = None) -> int: ...

    def dlq_get(self, entry_id: str) -> DeadLetterEntry | None: ...

    def dlq_replay(self, queue: str | None = None, *, limit: int | None = None) -> list[str]:
        """Move dead letters (oldest first) back onto their original queues as fresh
        first attempts, atomically per entry. Returns the replayed task ids."""
        ...

    def dlq_purge(self, queue: str | None = None) -> int:
        """Delete dead letters for good. Returns how many."""
        ...

    def close(self) -> None: ...
