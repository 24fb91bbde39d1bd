"""`SqliteBroker`: durable queues with leases in one SQLite file (WAL).

The supervisor claims and settles in batches, each batch ONE `BEGIN IMMEDIATE`
transaction: with synchronous=FULL a commit costs one fsync (~0.15 ms here), so
throughput comes from group commit, not from more processes. Hot paths therefore run
precomputed SQL through `executemany`, never decode payloads, and never query per row.

Receipts and the settle plan of a batch: `settle.py`.

Wake-ups: each listening broker binds a unix datagram socket in `<db>-wake/`; every
enqueue commit sends one byte to each. See `SqliteWaker`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from appliance.broker.protocol import (
    Consumer,
    Copies,
    DeadLetterEntry,
    Delivery,
    HealthCheck,
    MessageInfo,
    QueueStats,
    Settlement,
    TaskRecord,
    Wake,
    consumer_gone,
)
from appliance.envelope import Envelope, EnvelopeCodec
from appliance.errors import BrokerError, StoreReplaced
from appliance.stores.common import QueueRotation, replay_of
from appliance.stores.sqlite import flow
from appliance.stores.sqlite.db import Database, translate
from appliance.stores.sqlite.settle import LEASE_MATCH, SettlePlan, parse_receipt, receipt
from appliance.stores.sqlite.wake import CONTROL, MESSAGES, SqliteWaker

# The row a claim, settle or observation touches is always found through an index
# (see schema.py); `test_sqlite_broker.py` checks the claim plan.
_GUARD_HOLDER = "SELECT value FROM kv WHERE key = ? AND expires_at >= ?"
_PROMOTE = (
    "UPDATE messages SET state = 'ready' WHERE state = 'delayed' AND queue = ? AND not_before <= ?"
)
CLAIM_SQL = (
    "UPDATE messages SET state = 'leased', lease_until = ?, owner = ?, "
    "deliveries = deliveries + 1 "
    "WHERE id IN (SELECT id FROM messages WHERE state = 'ready' AND queue = ? "
    "ORDER BY priority DESC, id LIMIT ?) "
    "RETURNING id, queue, priority, attempt, deliveries, payload, rate_key, rate_interval"
)
# Claims that met rate-limited messages go on claiming for what was booked away, at
# most this many times per queue and claim (each pass books everything it meets).
_CLAIM_PASSES = 4
_EXTEND = "UPDATE messages SET lease_until = ? " + LEASE_MATCH
# ?1 = now, ?2 = the latest end a lease granted now could have: a lease ending later
# was taken before a reboot (CLOCK_BOOTTIME restarted) and its owner is gone.
_ANY_EXPIRED = (
    "SELECT 1 FROM messages WHERE state = 'leased' AND (lease_until < ?1 OR lease_until > ?2) "
    "LIMIT 1"
)
_LEASE_OWNERS = "SELECT DISTINCT owner FROM messages WHERE state = 'leased'"
_EXPIRE = (
    "UPDATE messages SET state = 'ready', owner = NULL, lease_until = NULL "
    "WHERE state = 'leased' AND (lease_until < ?1 OR lease_until > ?2)"
)
_FREE_OWNER = (
    "UPDATE messages SET state = 'ready', owner = NULL, lease_until = NULL "
    "WHERE state = 'leased' AND owner = ?"
)
_NEXT_DUE = "SELECT MIN(not_before) FROM messages WHERE state = 'delayed' AND queue = ?"
_COUNT_READY = "SELECT queue, COUNT(*) FROM messages WHERE state = 'ready' GROUP BY queue"
_COUNT_DELAYED = (
    "SELECT queue, TOTAL(not_before <= ?), TOTAL(not_before > ?) FROM messages "
    "WHERE state = 'delayed' GROUP BY queue"
)
_COUNT_LEASED = "SELECT queue, COUNT(*) FROM messages WHERE state = 'leased' GROUP BY queue"
_COUNT_DEAD = "SELECT queue, COUNT(*) FROM dead_letters GROUP BY queue"
_PAUSED = "SELECT queue, paused_at FROM paused_queues"
_PAUSE = "INSERT INTO paused_queues (queue, paused_at) VALUES (?, ?) ON CONFLICT DO NOTHING"
_RESUME = "DELETE FROM paused_queues WHERE queue = ?"
_MESSAGE_COLUMNS = (
    "COALESCE(task_id, ''), name, queue, priority, attempt, deliveries, state, "
    "not_before, lease_until, owner"
)
# Claim order: in flight first, then what a claim would take next, then by due time.
_LIST_MESSAGES = (
    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE (?1 IS NULL OR queue = ?1) "
    "ORDER BY CASE state WHEN 'leased' THEN 0 WHEN 'ready' THEN 1 ELSE 2 END, "
    "CASE WHEN state = 'delayed' THEN not_before END, priority DESC, id "
    "LIMIT ?2 OFFSET ?3"
)
_FIND_MESSAGE = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE task_id = ? ORDER BY id LIMIT 1"
_DLQ_COLUMNS = (
    "id, task_id, name, queue, reason, error_type, message, traceback, attempts, payload, "
    "enqueued_at, dead_at, deliveries, priority"
)
_DLQ_LIST = f"SELECT {_DLQ_COLUMNS} FROM dead_letters ORDER BY rowid DESC LIMIT ? OFFSET ?"
_DLQ_LIST_QUEUE = (
    f"SELECT {_DLQ_COLUMNS} FROM dead_letters WHERE queue = ? ORDER BY rowid DESC LIMIT ? OFFSET ?"
)
_DLQ_GET = f"SELECT {_DLQ_COLUMNS} FROM dead_letters WHERE id = ?"
_DLQ_COUNT = "SELECT COUNT(*) FROM dead_letters WHERE (?1 IS NULL OR queue = ?1)"
_DLQ_OLDEST = (
    "SELECT id, queue, priority, payload, enqueued_at, task_id FROM dead_letters "
    "WHERE (?1 IS NULL OR queue = ?1) ORDER BY rowid LIMIT ?2"
)
_DLQ_DELETE = "DELETE FROM dead_letters WHERE id = ?"
_DLQ_PURGE = "DELETE FROM dead_letters WHERE (?1 IS NULL OR queue = ?1)"


def _limited(rows: list[Any]) -> bool:
    """True when a claimed row is rate-limited (its rate_key, second to last, is set)."""
    return any(row[-2] is not None for row in rows)


# A WAL that stays above this was not checkpointed: a reader keeps an old snapshot open
# ("Write-Ahead Logging" section 6), and it grows without bound until that reader goes.
WAL_HEALTHY_BYTES = 256 * 2**20
MAX_LEASE_S = 86400.0  # leases are renewed while held, so none needs to be longer


def lease_clock() -> float:
    """The clock of SQLite leases: CLOCK_BOOTTIME, shared by every process on the host
    (one database file serves one host) and never moved by wall-clock jumps, which
    would otherwise expire the lease of a task its live owner is still running."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _lease_window() -> tuple[float, float]:
    now = lease_clock()
    return now, now + MAX_LEASE_S


def _message_info(row: Sequence[Any]) -> MessageInfo:
    """A message for display, its lease end turned back into wall-clock time."""
    info = MessageInfo(*row)
    if info.lease_until is None:
        return info
    return replace(info, lease_until=time.time() + info.lease_until - lease_clock())


def _message_row(env: Envelope, now: float, codec: EnvelopeCodec) -> tuple[Any, ...]:
    return flow.message_row(env, now, codec.encode(env))


class SqliteBroker:
    """The `Broker` port on SQLite, on a `Database` it shares with the result backend
    (`appliance.stores.sqlite.open_store`). One per process."""

    def __init__(self, db: Database, url: str, codec: EnvelopeCodec) -> None:
        self.codec = codec
        self.url = url
        self._db = db
        self._rotation = QueueRotation()
        self._waker = SqliteWaker(db.path)
        self._identity = _file_identity(db.path)  # the file this connection opened

    @property
    def path(self) -> Path:
        return self._db.path

    # --- enqueue -------------------------------------------------------------------

    def enqueue(self, envelopes: Sequence[Envelope], *, connection: Any = None) -> None:
        """One transaction for the whole batch (all or none), then wake the listeners."""
        if not envelopes:
            return
        now = time.time()
        if connection is not None:
            self._enqueue_in(connection, [_message_row(env, now, self.codec) for env in envelopes])
            records = flow.record_rows(envelopes, now)
            if records:
                connection.executemany(flow.INSERT_RECORD, records)
            return  # no wake-up: the caller has not committed yet (1 s poll covers it)
        # Encoded before the write lock is taken, so the lock is held only for the insert
        # (5,000 rows, the largest batch `Stem.enqueue_many` sends: ~40 ms here).
        rows = [_message_row(env, now, self.codec) for env in envelopes]
        self._store(rows, flow.record_rows(envelopes, now))

    def enqueue_copies(self, batches: Sequence[Copies]) -> None:
        now = time.time()
        rows: list[tuple[Any, ...]] = []
        records: list[tuple[Any, ...]] = []
        for copies in batches:
            rows += flow.message_rows(copies, now)
            records += flow.copy_record_rows(copies.envelope, copies.ids, now)
        if rows:
            self._store(rows, records)

    def _store(self, rows: list[tuple[Any, ...]], records: list[tuple[Any, ...]]) -> None:
        """Insert messages and their records in one transaction, then wake listeners."""

        def work(conn: sqlite3.Connection) -> None:
            flow.insert_messages(conn, rows)
            if records:
                conn.executemany(flow.INSERT_RECORD, records)

        self._db.write(work)
        self._db.on_commit(self._waker.poke)

    def enqueue_guarded(
        self, envelope: Envelope, key: str, ttl: float, *, note_duplicate: bool = False
    ) -> str | None:
        row = _message_row(envelope, time.time(), self.codec)  # encoded outside the lock

        def work(conn: sqlite3.Connection) -> str | None:
            now = time.time()
            if not flow.take_guard(conn, key, envelope.id, ttl, now):
                held = conn.execute(_GUARD_HOLDER, (key, now)).fetchone()
                holder = bytes(held[0]).decode() if held else ""
                if note_duplicate and holder:
                    flow.note_duplicate(conn, holder, now)
                return holder
            conn.execute(flow.INSERT_MESSAGE, row)
            flow.write_records(conn, [envelope], now)
            return None

        holder = self._db.write(work)
        if holder is None:
            self._db.on_commit(self._waker.poke)
        return holder

    def enqueue_chord(
        self, chord_id: str, members: Sequence[Envelope], callback: Envelope, ttl: float
    ) -> None:
        now = time.time()
        rows = [_message_row(env, now, self.codec) for env in members]
        callback_payload = self.codec.encode(callback)
        records = flow.record_rows([*members, callback], now)

        def work(conn: sqlite3.Connection) -> None:
            flow.create_chord(conn, chord_id, len(members), callback, callback_payload, ttl, now)
            flow.insert_messages(conn, rows)
            conn.executemany(flow.INSERT_RECORD, records)

        self._db.write(work)
        self._db.on_commit(self._waker.poke)

    def chord_values(self, chord_id: str, size: int) -> list[Any]:
        found = self._db.read(lambda conn: flow.chord_values(conn, chord_id))
        if len(found) != size or any(index != i for i, (index, _) in enumerate(found)):
            raise LookupError(
                f"chord {chord_id}: {len(found)} of {size} member results are stored (the "
                "chord's record expired, or was purged)"
            )
        return [orjson.loads(value) for _, value in found]

    def task_record(self, task_id: str) -> TaskRecord | None:
        return self._db.read(lambda conn: flow.read_record(conn, task_id, time.time()))

    def _enqueue_in(self, connection: Any, rows: list[tuple[Any, ...]]) -> None:
        """Transactional outbox: insert in the caller's transaction; the caller commits."""
        if not isinstance(connection, sqlite3.Connection):
            raise TypeError(f"connection= must be an sqlite3.Connection, got {connection!r}")
        if connection.isolation_level is None and not connection.in_transaction:
            raise ValueError(
                "connection= is in autocommit mode with no open transaction; "
                "run BEGIN first so the messages commit with your own writes"
            )
        try:
            self._check_same_file(connection)
            flow.insert_messages(connection, rows)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    def _check_same_file(self, connection: sqlite3.Connection) -> None:
        rows = connection.execute("PRAGMA database_list").fetchall()
        main = next((row[2] for row in rows if row[1] == "main"), "")
        if not main or os.path.realpath(main) != os.path.realpath(self.path):
            raise ValueError(
                f"connection= is open on {main or 'a temporary database'!r}, but the broker "
                f"database is {str(self.path)!r}; open your connection on the broker's file"
            )

    # --- claim and settle ------------------------------------------------------------

    def claim(
        self, queues: Sequence[str], limit: int, *, consumer: Consumer, lease: float
    ) -> list[Delivery]:
        """Promote due delayed messages, then lease up to `limit`, in one transaction."""
        if limit <= 0 or not queues:
            return []
        order = self._rotation.order(queues)
        owner = consumer.name

        lease = min(lease, MAX_LEASE_S)

        def work(conn: sqlite3.Connection) -> tuple[list[Any], float]:
            now = time.time()
            conn.executemany(_PROMOTE, [(queue, now) for queue in order])
            ends = lease_clock() + lease
            rows: list[Any] = []
            for queue in order:
                for _ in range(_CLAIM_PASSES):
                    taken = conn.execute(CLAIM_SQL, (ends, owner, queue, limit - len(rows)))
                    got = taken.fetchall()
                    kept = flow.book_limited(conn, got, now) if _limited(got) else got
                    rows += kept
                    if len(kept) == len(got) or len(rows) >= limit:
                        break  # nothing was booked away, or the claim is full
                if len(rows) >= limit:
                    break
            return rows, now + lease

        rows, lease_until = self._db.write(work)
        rows.sort(key=lambda row: (-row[2], row[0]))  # RETURNING has no defined order
        return [
            Delivery(receipt(mid, attempt, count, owner), queue, payload, count, lease_until)
            for mid, queue, _priority, attempt, count, payload, _key, _interval in rows
        ]

    def settle(self, settlements: Sequence[Settlement]) -> None:
        """All settlements in one transaction (group commit)."""
        if not settlements:
            return
        plan = SettlePlan()
        now = time.time()
        for settlement in settlements:
            plan.add(settlement, now, self.codec)
        self._db.write(lambda conn: plan.apply(conn, self.codec))
        if plan.frees_messages:
            self._db.on_commit(self._waker.poke)

    def extend(self, deliveries: Sequence[Delivery], lease: float) -> list[Delivery]:
        """Push still-held leases to now + `lease`; lost leases are left alone and
        returned. One statement per lease (renewals are few: a third of a visibility
        timeout apart), so each says whether it still matched."""
        if not deliveries:
            return []
        keys = [parse_receipt(delivery.receipt) for delivery in deliveries]

        def work(conn: sqlite3.Connection) -> list[Delivery]:
            ends = lease_clock() + min(lease, MAX_LEASE_S)
            return [
                delivery for delivery, key in zip(deliveries, keys, strict=True)
                if conn.execute(_EXTEND, (ends, *key)).rowcount == 0
            ]  # fmt: skip

        return self._db.write(work)

    def recover(self, consumer: Consumer) -> int:
        """Free expired leases and those of dead consumers on this host. Cheap when there
        is nothing to do: one read, one liveness check per distinct owner, no write."""

        def scan(conn: sqlite3.Connection) -> tuple[bool, list[str]]:
            expired = conn.execute(_ANY_EXPIRED, _lease_window()).fetchone() is not None
            return expired, [row[0] for row in conn.execute(_LEASE_OWNERS)]

        expired, owners = self._db.read(scan)
        dead = [owner for owner in owners if consumer_gone(owner, consumer)]
        if not expired and not dead:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            count = conn.execute(_EXPIRE, _lease_window()).rowcount
            for owner in dead:
                count += conn.execute(_FREE_OWNER, (owner,)).rowcount
            return count

        count = self._db.write(work)
        if count:
            self._db.on_commit(self._waker.poke)
        return count

    def next_due(self, queues: Sequence[str]) -> float | None:
        """The earliest not_before of delayed messages (one index probe per queue)."""

        def work(conn: sqlite3.Connection) -> float | None:
            found = [conn.execute(_NEXT_DUE, (queue,)).fetchone()[0] for queue in queues]
            due = [value for value in found if value is not None]
            return min(due) if due else None

        return self._db.read(work)

    # --- wake-ups --------------------------------------------------------------------

    def wake_fd(self, queues: Sequence[str]) -> int | None:
        """Readable after any enqueue to this database (queues are not told apart: a
        spurious wake-up costs one empty claim)."""
        return self._waker.listen()

    def parking(self) -> None:
        """None: a claim here is a local transaction that a wake-up starts at once; there
        is no round trip to save."""
        return None

    def clear_wake(self) -> Wake:
        seen = self._waker.drain()
        woke = Wake.NONE
        if MESSAGES[0] in seen:
            woke |= Wake.MESSAGES
        if CONTROL[0] in seen:
            woke |= Wake.CONTROL
        return woke

    @property
    def waker(self) -> SqliteWaker:
        """The wake-up sockets, shared with the control channel of the same file."""
        return self._waker

    # --- pausing queues --------------------------------------------------------------

    def pause(self, queue: str) -> bool:
        count: int = self._db.write(
            lambda conn: conn.execute(_PAUSE, (queue, time.time())).rowcount
        )
        return count > 0

    def resume(self, queue: str) -> bool:
        count: int = self._db.write(lambda conn: conn.execute(_RESUME, (queue,)).rowcount)
        return count > 0

    def paused(self) -> dict[str, float]:
        rows = self._db.read(lambda conn: conn.execute(_PAUSED).fetchall())
        return {queue: paused_at for queue, paused_at in rows}

    # --- observation -----------------------------------------------------------------

    def queue_stats(self) -> list[QueueStats]:
        """Counts per queue from the partial indexes (one snapshot)."""

        def work(conn: sqlite3.Connection) -> list[QueueStats]:
            now = time.time()
            counts: dict[str, dict[str, int]] = defaultdict(dict)

            def add(queue: str, key: str, value: float) -> None:
                counts[queue][key] = counts[queue].get(key, 0) + int(value)

            for queue, ready in conn.execute(_COUNT_READY):
                add(queue, "ready", ready)
            # A delayed row past its not_before is claimable now: the next claim promotes it.
            for queue, due, waiting in conn.execute(_COUNT_DELAYED, (now, now)):
                add(queue, "ready", due)
                add(queue, "delayed", waiting)
            for queue, leased in conn.execute(_COUNT_LEASED):
                add(queue, "in_flight", leased)
            for queue, dead in conn.execute(_COUNT_DEAD):
                add(queue, "dead", dead)
            paused = {row[0] for row in conn.execute(_PAUSED)}
            for queue in paused:
                counts.setdefault(queue, {})
            return [
                QueueStats(queue, **values, paused=queue in paused)
                for queue, values in sorted(counts.items())
            ]

        return self._db.read(work)

    def list_messages(
        self, queue: str | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[MessageInfo]:
        rows = self._db.read(
            lambda conn: conn.execute(_LIST_MESSAGES, (queue, limit, offset)).fetchall()
        )
        return [_message_info(row) for row in rows]

    def find_message(self, task_id: str) -> MessageInfo | None:
        row = self._db.read(lambda conn: conn.execute(_FIND_MESSAGE, (task_id,)).fetchone())
        return _message_info(row) if row else None

    # --- the DLQ ---------------------------------------------------------------------

    def dlq_list(
        self, queue: str | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[DeadLetterEntry]:
        """Newest first. Two statements so each filter has its own index plan."""
        params: tuple[Any, ...]
        if queue is None:
            sql, params = _DLQ_LIST, (limit, offset)
        else:
            sql, params = _DLQ_LIST_QUEUE, (queue, limit, offset)
        rows = self._db.read(lambda conn: conn.execute(sql, params).fetchall())
        return [_dead_letter(row) for row in rows]

    def dlq_count(self, queue: str | None = None) -> int:
        count: int = self._db.read(lambda conn: conn.execute(_DLQ_COUNT, (queue,)).fetchone()[0])
        return count

    def dlq_get(self, entry_id: str) -> DeadLetterEntry | None:
        row = self._db.read(lambda conn: conn.execute(_DLQ_GET, (entry_id,)).fetchone())
        return _dead_letter(row) if row else None

    def dlq_replay(self, queue: str | None = None, *, limit: int | None = None) -> list[str]:
        """Oldest first, back onto their queues as fresh first attempts; one transaction."""
        if limit is not None and limit <= 0:
            return []

        def work(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            entries = conn.execute(_DLQ_OLDEST, (queue, -1 if limit is None else limit))
            rows, task_ids, entry_ids = [], [], []
            for entry_id, entry_queue, priority, payload, enqueued_at, task_id in entries:
                replay = replay_of(self.codec, entry_queue, priority, payload, task_id)
                rate = replay.rate or (None, None)
                rows.append((
                    replay.task_id, replay.name, replay.queue, replay.priority, "ready", None,
                    0, replay.enqueued_at or enqueued_at or now, replay.payload, *rate,
                ))  # fmt: skip
                entry_ids.append((entry_id,))
                if replay.task_id is not None:
                    task_ids.append(replay.task_id)
            flow.insert_messages(conn, rows)
            conn.executemany(_DLQ_DELETE, entry_ids)
            return task_ids

        task_ids = self._db.write(work)
        self._db.on_commit(self._waker.poke)
        return task_ids

    def dlq_purge(self, queue: str | None = None) -> int:
        count: int = self._db.write(lambda conn: conn.execute(_DLQ_PURGE, (queue,)).rowcount)
        return count

    def durability_warnings(self) -> list[str]:
        if self._db.target.synchronous == "FULL":
            return []
        return [
            f"{self.path}: synchronous={self._db.target.synchronous}: survives a process "
            "crash, but the last commits can be lost on power loss (FULL keeps them)"
        ]

    def watch_identity(self) -> str | None:
        """The path must still name the file this connection opened: SQLite keeps
        serving a deleted inode without a word, while producers create a new file."""
        now = _file_identity(self.path)
        if now == self._identity:
            return None
        what = "deleted" if now is None else "replaced by another file"
        raise StoreReplaced(
            f"{self.path} was {what} while this worker had it open: tasks enqueued from "
            "now on go to a database this worker does not serve. Never delete or move a "
            "live database (nor its -wal and -shm); restart the worker to serve the file "
            "that is there now"
        )

    def health_checks(self) -> list[HealthCheck]:
        result = self._db.read(lambda conn: conn.execute("PRAGMA quick_check").fetchall())
        problems = [row[0] for row in result if row[0] != "ok"]
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            wal = 0
        durable = not self.durability_warnings()
        return [
            HealthCheck("sqlite integrity", not problems,
                        "quick_check ok" if not problems else "; ".join(problems[:3])),
            HealthCheck("sqlite wal", wal <= WAL_HEALTHY_BYTES,
                        f"{wal / 2**20:.1f} MiB (checkpointed when workers are idle; "
                        f"over {WAL_HEALTHY_BYTES / 2**20:.0f} MiB means a reader holds it)"),
            HealthCheck("durability", True,
                        f"synchronous={self._db.target.synchronous}" + (
                            "" if durable else " (survives crashes, not power loss)")),
        ]  # fmt: skip

    def idle(self) -> None:
        # TRUNCATE waits for nothing: if a reader holds an old snapshot it checkpoints
        # what it can and the next idle turn finishes the job.
        with contextlib.suppress(BrokerError):
            self._db.autocommit(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))

    def close(self) -> None:
        """Release our wake socket (the shared connection is the `Stores`' to close); a
        no-op in a forked child, which must not remove the parent's socket."""
        if os.getpid() == self._db.pid:
            self._waker.close()


def _dead_letter(row: Sequence[Any]) -> DeadLetterEntry:
    (entry_id, task_id, name, queue, reason, error_type, message, traceback, attempts,
     payload, enqueued_at, dead_at, deliveries, priority) = row  # fmt: skip
    return DeadLetterEntry(
        entry_id, task_id, name, queue, reason, error_type, message, traceback, attempts,
        payload, enqueued_at, dead_at, extra={"deliveries": deliveries, "priority": priority},
    )  # fmt: skip


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None when nothing is there."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino
