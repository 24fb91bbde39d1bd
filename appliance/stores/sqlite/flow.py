"""The SQLite side of task options and the canvas, run inside the broker's transactions:
rate-limit booking at claim, follow-ups at settle, chords, task records, duplicates.

Every function takes the open connection of a write transaction: what it does commits
with the claim, settle or enqueue around it (`appliance.flow` says why that matters).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any

import orjson

from appliance.broker.protocol import Copies, TaskRecord
from appliance.envelope import Envelope, EnvelopeCodec
from appliance.flow import RECORD_TTL_S, FollowUps, canvas_of
from appliance.ratelimit import book

INSERT_MESSAGE = (
    "INSERT INTO messages (task_id, name, queue, priority, state, not_before, attempt, "
    "enqueued_at, payload, rate_key, rate_interval) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_RECORD = (
    "INSERT INTO task_records (task_id, parent_id, root_id, canvas, expires_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id) DO NOTHING"
)
_NOTE_DUPLICATE = (
    "INSERT INTO task_records (task_id, duplicates, last_duplicate_at, expires_at) "
    "VALUES (?1, 1, ?2, ?3) ON CONFLICT (task_id) DO UPDATE SET "
    "duplicates = duplicates + 1, last_duplicate_at = ?2, expires_at = MAX(expires_at, ?3)"
)
_RECORD = (
    "SELECT parent_id, root_id, canvas, duplicates, last_duplicate_at FROM task_records "
    "WHERE task_id = ? AND expires_at >= ?"
)
_CHILDREN = (
    "SELECT task_id FROM task_records WHERE parent_id = ? AND expires_at >= ? ORDER BY rowid"
)
_TAKE_GUARD = """
INSERT INTO kv (key, value, expires_at) VALUES (:key, :value, :expires_at)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
    WHERE kv.expires_at < :now
"""
_RELEASE_GUARD = "DELETE FROM kv WHERE key = ? AND value = ?"
_INSERT_CHORD = (
    "INSERT INTO chords (id, size, callback_id, name, queue, priority, rate_key, "
    "rate_interval, payload, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COUNT_MEMBER = (
    "INSERT INTO chord_results (chord_id, idx, value) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
)
_CHORD_DONE = (
    "UPDATE chords SET done = done + 1 WHERE id = ? AND expires_at >= ? RETURNING done, size, "
    "callback_id, name, queue, priority, rate_key, rate_interval, payload"
)
_CHORD_VALUES = "SELECT idx, value FROM chord_results WHERE chord_id = ? ORDER BY idx"
_TAT = "SELECT tat FROM rate_limits WHERE key = ?"
_SET_TAT = (
    "INSERT INTO rate_limits (key, tat) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET tat = ?2"
)
# A booked message waits for its slot like a delayed one, holding it (no limiter), with
# its claim given back: the wait is not an attempt.
_BOOK = (
    "UPDATE messages SET state = 'delayed', not_before = ?, rate_key = NULL, "
    "rate_interval = NULL, owner = NULL, lease_until = NULL, deliveries = deliveries - 1 "
    "WHERE id = ?"
)


def state_of(envelope: Envelope, now: float) -> str:
    due = envelope.not_before is not None and envelope.not_before > now
    return "delayed" if due else "ready"


# Batches are inserted this many rows per INSERT statement: a statement costs SQLite
# its AUTOINCREMENT lookup and write-back, and Python a call, per execution, so one
# row per execution (executemany) took 8.4-8.8 us a row against 4.0-5.4 us like this
# (1,000-row batches, measured). 1,100 variables: the claim's RETURNING needs SQLite
# 3.35 anyway, whose limit is 32,766. The rest of a batch goes one row per execution,
# so only one wide statement is ever prepared.
_WIDE_ROWS = 100
_ROW = "(" + ", ".join("?" * len(INSERT_MESSAGE.split(" VALUES ")[1].split(","))) + ")"
_INSERT_WIDE = INSERT_MESSAGE.split(" VALUES ")[0] + " VALUES " + ", ".join([_ROW] * _WIDE_ROWS)


def insert_messages(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert `message_rows` in their order (their ids are assigned in that order)."""
    wide = len(rows) - len(rows) % _WIDE_ROWS
    for start in range(0, wide, _WIDE_ROWS):
        conn.execute(_INSERT_WIDE, list(chain.from_iterable(rows[start : start + _WIDE_ROWS])))
    if wide < len(rows):
        conn.executemany(INSERT_MESSAGE, rows[wide:])


def message_row(envelope: Envelope, now: float, payload: bytes) -> tuple[Any, ...]:
    shared, limiter = _row_parts(envelope, now)
    return (envelope.id, *shared, payload, *limiter)


def message_rows(copies: Copies, now: float) -> list[tuple[Any, ...]]:
    """The `INSERT_MESSAGE` rows of messages that differ only in task id and payload."""
    shared, limiter = _row_parts(copies.envelope, now)
    return [
        (task_id, *shared, payload, *limiter)
        for task_id, payload in zip(copies.ids, copies.payloads, strict=True)
    ]


def _row_parts(env: Envelope, now: float) -> tuple[tuple[Any, ...], tuple[Any, Any]]:
    """What a message row holds besides its task id and payload: the columns between
    them, and the limiter's two after them (see `INSERT_MESSAGE`)."""
    rate = env.rate
    shared = (env.name, env.queue, env.priority, state_of(env, now), env.not_before,
              env.attempt, env.enqueued_at or now)  # fmt: skip
    return shared, ((rate[0], rate[1]) if rate else (None, None))


# --- task records ------------------------------------------------------------------------


def record_rows(envelopes: Sequence[Envelope], now: float) -> list[tuple[Any, ...]]:
    """The task records of the envelopes that have lineage or a canvas place (plain
    enqueues from outside a task have neither and cost nothing here)."""
    rows = []
    for envelope in envelopes:
        rows += copy_record_rows(envelope, (envelope.id,), now)
    return rows


def copy_record_rows(envelope: Envelope, ids: Sequence[str], now: float) -> list[tuple[Any, ...]]:
    """The task records of copies of `envelope` with these ids (see `record_rows`)."""
    if envelope.parent_id is None and envelope.flow is None:
        return []
    canvas = canvas_of(envelope)
    fixed = (envelope.parent_id, envelope.root_id,
             None if canvas is None else orjson.dumps(canvas), now + RECORD_TTL_S)  # fmt: skip
    return [(task_id, *fixed) for task_id in ids]


def write_records(conn: sqlite3.Connection, envelopes: Sequence[Envelope], now: float) -> None:
    rows = record_rows(envelopes, now)
    if rows:
        conn.executemany(INSERT_RECORD, rows)


def note_duplicate(conn: sqlite3.Connection, holder: str, now: float) -> None:
    conn.execute(_NOTE_DUPLICATE, (holder, now, now + RECORD_TTL_S))


def read_record(conn: sqlite3.Connection, task_id: str, now: float) -> TaskRecord | None:
    row = conn.execute(_RECORD, (task_id, now)).fetchone()
    children = [r[0] for r in conn.execute(_CHILDREN, (task_id, now))]
    if row is None and not children:
        return None
    parent, root, canvas, duplicates, last = row if row else (None, None, None, 0, None)
    return TaskRecord(
        task_id, parent, root, None if canvas is None else orjson.loads(canvas),
        tuple(children), duplicates, last,
    )  # fmt: skip


# --- guards --------------------------------------------------------------------------------


def take_guard(conn: sqlite3.Connection, key: str, value: str, ttl: float, now: float) -> bool:
    guard = {"key": key, "value": value.encode(), "expires_at": now + ttl, "now": now}
    return conn.execute(_TAKE_GUARD, guard).rowcount > 0


# --- follow-ups ------------------------------------------------------------------------------


def apply_follow(
    conn: sqlite3.Connection, follow: FollowUps, codec: EnvelopeCodec, now: float
) -> bool:
    """Apply the follow-ups of the settle that removed `follow.task_id`'s message; True
    if a message was stored (the listeners need a wake-up)."""
    stored = False
    for envelope in follow.enqueue:
        unique = (envelope.flow or {}).get("unique")
        if unique and not take_guard(conn, str(unique[0]), envelope.id, float(unique[1]), now):
            continue  # a duplicate of a live unique task: it stores nothing
        conn.execute(INSERT_MESSAGE, message_row(envelope, now, codec.reencode(envelope)))
        stored = True
    write_records(conn, follow.enqueue, now)
    if follow.chord is not None:
        stored |= _count_member(conn, follow.chord.chord_id, follow.chord.index,
                                follow.chord.value, now)  # fmt: skip
    if follow.release is not None:
        conn.execute(_RELEASE_GUARD, (follow.release, follow.task_id.encode()))
    return stored


def _count_member(
    conn: sqlite3.Connection, chord_id: str, index: int, value: bytes, now: float
) -> bool:
    """Count a member once; the settle whose count completes the chord stores the
    callback's message. True if it did."""
    if conn.execute(_COUNT_MEMBER, (chord_id, index, value)).rowcount == 0:
        return False  # counted before (a redelivered member)
    row = conn.execute(_CHORD_DONE, (chord_id, now)).fetchone()
    if row is None or row[0] != row[1]:
        return False
    _, _, callback_id, name, queue, priority, rate_key, rate_interval, payload = row
    conn.execute(INSERT_MESSAGE, (callback_id, name, queue, priority, "ready", None, 0, now,
                                  payload, rate_key, rate_interval))  # fmt: skip
    return True


# --- chords ---------------------------------------------------------------------------------


def create_chord(
    conn: sqlite3.Connection, chord_id: str, size: int, callback: Envelope, payload: bytes,
    ttl: float, now: float,
) -> None:  # fmt: skip
    rate = callback.rate
    conn.execute(_INSERT_CHORD, (
        chord_id, size, callback.id, callback.name, callback.queue, callback.priority,
        rate[0] if rate else None, rate[1] if rate else None, payload, now, now + ttl,
    ))  # fmt: skip


def chord_values(conn: sqlite3.Connection, chord_id: str) -> list[tuple[int, bytes]]:
    return conn.execute(_CHORD_VALUES, (chord_id,)).fetchall()


# --- rate limits --------------------------------------------------------------------------------


def book_limited(conn: sqlite3.Connection, rows: list[Any], now: float) -> list[Any]:
    """Of claimed rows (id, ..., rate_key, rate_interval last), keep those that may run
    now; book the others into their limiter's next slot (`appliance.ratelimit`)."""
    kept = []
    tats: dict[str, float | None] = {}
    for row in rows:
        key, interval = row[-2], row[-1]
        if key is None:
            kept.append(row)
            continue
        if key not in tats:
            found = conn.execute(_TAT, (key,)).fetchone()
            tats[key] = found[0] if found else None
        start, tats[key] = book(tats[key], now, interval)
        if start <= now:
            kept.append(row)
        else:
            conn.execute(_BOOK, (start, row[0]))
    if tats:
        conn.executemany(_SET_TAT, list(tats.items()))
    return kept
