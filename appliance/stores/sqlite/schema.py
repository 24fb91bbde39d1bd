"""The whole SQLite storage layout, in one place, as sqlite-utils migrations.

The broker and the result backend share one database file by default, so one
migration set covers both; each adapter applies it (idempotently) when it opens.
sqlite-utils is used for migrations only: the hot path runs fixed SQL on raw sqlite3.

messages       one row per message waiting or in flight
  id           INTEGER PRIMARY KEY AUTOINCREMENT: enqueue order. AUTOINCREMENT so an id
               is never reused: a late ACK deletes "by id regardless" (the task did
               finish) and must not hit a newer message that got a recycled rowid.
  task_id      the envelope id (NULL only for a replayed payload that does not decode)
  name, queue, priority (higher runs first), attempt: copied from the envelope so that
               claims never decode payloads
  state        'ready' (claimable) | 'delayed' (until not_before) | 'leased'
  not_before   epoch seconds; NULL = as soon as possible
  lease_until  CLOCK_BOOTTIME seconds (not epoch: immune to wall-clock jumps); set while
               leased
  owner        `Consumer.name` (host:pid:starttime) of the lease holder
  deliveries   claims of the current attempt (incremented by the claim itself)
  enqueued_at  epoch seconds
  payload      the encoded envelope, verbatim

dead_letters   one row per dead letter; newest first is rowid DESC (insertion order,
               immune to wall-clock steps)
  id           uuid4 hex (the public DLQ entry id)
  attempts     runs made (attempt + 1); deliveries: claims of the last attempt

results        one row per task id (`ResultBackend`); JSON columns hold orjson bytes
  expires_at   epoch seconds; NULL keeps the row until purged

The `ResultBackend` primitives (0002). Every `expires_at` is epoch seconds: a row past
it is absent to readers (each query checks it) and deleted by `purge_expired`.
kv             `put_if_absent` keys (unique tasks, locks); value is raw bytes
counters       `incr` counters; expires_at NULL keeps the counter until deleted
task_groups    one row per group or chord: how many members it has
task_group_members  one row per finished member; (group_id, idx) is the key, so a
               duplicate report cannot count twice; result is a `TaskResult` as JSON
revoked        revoked task ids
workers        one row per supervisor: its last `WorkerHeartbeat` as JSON

Every hot query is a search on a partial index, so its cost stays flat from 1k to 1M
rows: claim reads messages_ready in (queue, priority DESC, id) order; promotion and
`next_due` read messages_delayed; lease expiry and recovery read messages_leased.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ConfigError
from appliance.stores.sqlite.db import APPLICATION_ID, BUSY_DEADLINE, MOUNTINFO, connect, parse_url
from appliance.stores.sqlite.db import Database as SqliteDatabase

if TYPE_CHECKING:
    from sqlite_utils.migrations import Migrations

MIGRATION_SET = "stem"

_INITIAL = (
    """
    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id     TEXT,
        name        TEXT    NOT NULL DEFAULT '',
        queue       TEXT    NOT NULL,
        priority    INTEGER NOT NULL DEFAULT 0,
        state       TEXT    NOT NULL CHECK (state IN ('ready', 'delayed', 'leased')),
        not_before  REAL,
        lease_until REAL,
        owner       TEXT,
        deliveries  INTEGER NOT NULL DEFAULT 0,
        attempt     INTEGER NOT NULL DEFAULT 0,
        enqueued_at REAL    NOT NULL,
        payload     BLOB    NOT NULL
    )
    """,
    """
    CREATE INDEX messages_ready ON messages (queue, priority DESC, id)
        WHERE state = 'ready'
    """,
    """
    CREATE INDEX messages_delayed ON messages (queue, not_before)
        WHERE state = 'delayed'
    """,
    # owner is in the key so that recovery's "which owners hold leases" is index-only.
    """
    CREATE INDEX messages_leased ON messages (lease_until, owner)
        WHERE state = 'leased'
    """,
    "CREATE INDEX messages_task_id ON messages (task_id)",
    """
    CREATE TABLE dead_letters (
        id          TEXT    PRIMARY KEY,
        task_id     TEXT,
        name        TEXT,
        queue       TEXT    NOT NULL,
        priority    INTEGER NOT NULL DEFAULT 0,
        reason      TEXT    NOT NULL,
        error_type  TEXT    NOT NULL DEFAULT '',
        message     TEXT    NOT NULL DEFAULT '',
        traceback   TEXT    NOT NULL DEFAULT '',
        attempts    INTEGER NOT NULL,
        deliveries  INTEGER NOT NULL DEFAULT 0,
        payload     BLOB    NOT NULL,
        enqueued_at REAL,
        dead_at     REAL    NOT NULL
    )
    """,
    "CREATE INDEX dead_letters_queue ON dead_letters (queue)",
    """
    CREATE TABLE results (
        task_id         TEXT PRIMARY KEY,
        state           TEXT NOT NULL,
        name            TEXT NOT NULL DEFAULT '',
        queue           TEXT NOT NULL DEFAULT '',
        value           BLOB,
        error_type      TEXT,
        error_message   TEXT,
        error_traceback TEXT,
        attempt         INTEGER NOT NULL DEFAULT 0,
        worker          TEXT NOT NULL DEFAULT '',
        started_at      REAL,
        finished_at     REAL,
        progress        REAL,
        progress_data   BLOB,
        meta            BLOB,
        expires_at      REAL,
        updated_at      REAL NOT NULL
    )
    """,
    "CREATE INDEX results_expires_at ON results (expires_at) WHERE expires_at IS NOT NULL",
)


# Every table gets an index on expires_at: purging must not scan the live rows.
_PRIMITIVES = (
    """
    CREATE TABLE kv (
        key        TEXT PRIMARY KEY,
        value      BLOB NOT NULL,
        expires_at REAL NOT NULL
    )
    """,
    "CREATE INDEX kv_expires_at ON kv (expires_at)",
    """
    CREATE TABLE counters (
        key        TEXT    PRIMARY KEY,
        value      INTEGER NOT NULL,
        expires_at REAL
    )
    """,
    "CREATE INDEX counters_expires_at ON counters (expires_at) WHERE expires_at IS NOT NULL",
    """
    CREATE TABLE task_groups (
        group_id   TEXT    PRIMARY KEY,
        size       INTEGER NOT NULL,
        expires_at REAL    NOT NULL
    )
    """,
    "CREATE INDEX task_groups_expires_at ON task_groups (expires_at)",
    # WITHOUT ROWID: the members of a group are stored together, in index order.
    """
    CREATE TABLE task_group_members (
        group_id TEXT    NOT NULL,
        idx      INTEGER NOT NULL,
        result   BLOB    NOT NULL,
        PRIMARY KEY (group_id, idx)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE revoked (
        task_id    TEXT PRIMARY KEY,
        expires_at REAL NOT NULL
    )
    """,
    "CREATE INDEX revoked_expires_at ON revoked (expires_at)",
    """
    CREATE TABLE workers (
        id         TEXT PRIMARY KEY,
        heartbeat  BLOB NOT NULL,
        expires_at REAL NOT NULL
    )
    """,
    "CREATE INDEX workers_expires_at ON workers (expires_at)",
)


# The control channel (appliance/control) and paused queues (0004).
# control_requests   one row per request; `seq` is the order every worker reads in from
#                    its own cursor (a fan-out: no worker consumes a row for another)
#   target           '*' (every live worker) or one worker id
#   args             JSON object
# control_replies    one row per (request, worker) that answered; reply is JSON
# paused_queues      one row per paused queue; claims skip them
_CONTROL = (
    """
    CREATE TABLE control_requests (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        target     TEXT NOT NULL,
        command    TEXT NOT NULL,
        args       BLOB NOT NULL,
        sent_at    REAL NOT NULL,
        expires_at REAL NOT NULL
    )
    """,
    "CREATE INDEX control_requests_expires_at ON control_requests (expires_at)",
    """
    CREATE TABLE control_replies (
        request_id TEXT NOT NULL,
        worker     TEXT NOT NULL,
        reply      BLOB NOT NULL,
        replied_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (request_id, worker)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX control_replies_expires_at ON control_replies (expires_at)",
    """
    CREATE TABLE paused_queues (
        queue     TEXT PRIMARY KEY,
        paused_at REAL NOT NULL
    )
    """,
)

# Beat (0005): the schedules every instance dispatches, and their runs. A slot's guard
# is a `kv` row "beat:<name>:<slot>": its insert, the message, `last_slot` and the run
# row are one transaction (`stores/sqlite/beat.py`).
# schedules      entry: the entry's table as JSON (`ScheduleEntry.to_table`); enabled:
#                the operator's word; applied_at: the catch-up baseline before a run
# schedule_runs  one row per dispatched (or failed) slot, trimmed per entry
_BEAT = (
    """
    CREATE TABLE schedules (
        name        TEXT PRIMARY KEY,
        entry       BLOB NOT NULL,
        enabled     INTEGER NOT NULL,
        origin      TEXT NOT NULL,
        applied_at  REAL NOT NULL,
        last_slot   TEXT,
        last_run_at REAL,
        last_error  TEXT
    )
    """,
    """
    CREATE TABLE schedule_runs (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        name          TEXT NOT NULL,
        slot          TEXT NOT NULL,
        dispatched_at REAL NOT NULL,
        task_id       TEXT,
        drift_ms      REAL,
        error         TEXT
    )
    """,
    "CREATE INDEX schedule_runs_name ON schedule_runs (name, id)",
)

# Task options and the canvas (0006).
# messages.rate_key, rate_interval  a rate-limited message's limiter and the seconds
#                between its runs (`appliance.ratelimit`); NULL for every other message,
#                and for one that holds a booked slot
# rate_limits    one row per limiter key: its theoretical arrival time (epoch seconds)
# chords         one row per chord: its size, how many members succeeded, and the
#                callback's sealed message, stored by the settle that completes it
# chord_results  one row per succeeded member; (chord_id, idx) is the key, so a
#                redelivered member never counts twice; value is its result as JSON
# task_records   lineage, canvas place and duplicates of the tasks that have any (a task
#                enqueued by a task, a canvas member, a unique task with duplicates);
#                children are the rows whose parent_id is the task
_OPTIONS = (
    "ALTER TABLE messages ADD COLUMN rate_key TEXT",
    "ALTER TABLE messages ADD COLUMN rate_interval REAL",
    """
    CREATE TABLE rate_limits (
        key TEXT PRIMARY KEY,
        tat REAL NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE chords (
        id          TEXT    PRIMARY KEY,
        size        INTEGER NOT NULL,
        done        INTEGER NOT NULL DEFAULT 0,
        callback_id TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        queue       TEXT    NOT NULL,
        priority    INTEGER NOT NULL,
        rate_key    TEXT,
        rate_interval REAL,
        payload     BLOB    NOT NULL,
        created_at  REAL    NOT NULL,
        expires_at  REAL    NOT NULL
    )
    """,
    "CREATE INDEX chords_expires_at ON chords (expires_at)",
    """
    CREATE TABLE chord_results (
        chord_id TEXT    NOT NULL,
        idx      INTEGER NOT NULL,
        value    BLOB    NOT NULL,
        PRIMARY KEY (chord_id, idx)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE task_records (
        task_id           TEXT PRIMARY KEY,
        parent_id         TEXT,
        root_id           TEXT,
        canvas            BLOB,
        duplicates        INTEGER NOT NULL DEFAULT 0,
        last_duplicate_at REAL,
        expires_at        REAL NOT NULL
    )
    """,
    "CREATE INDEX task_records_parent ON task_records (parent_id) WHERE parent_id IS NOT NULL",
    "CREATE INDEX task_records_expires_at ON task_records (expires_at)",
)

# (name, statements) in order. Append new steps; never edit an applied one.
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("0001_initial", _INITIAL),
    ("0002_backend_primitives", _PRIMITIVES),
    # The file's mark (see db.APPLICATION_ID): read commands refuse unmarked files.
    ("0003_application_id", (f"PRAGMA application_id = {APPLICATION_ID}",)),
    ("0004_control", _CONTROL),
    ("0005_beat", _BEAT),
    ("0006_options_and_canvas", _OPTIONS),
)


def _step(name: str, statements: tuple[str, ...]) -> Callable[[Any], None]:
    def run(db: Any) -> None:
        # One statement at a time: executescript() would COMMIT the open transaction.
        for statement in statements:
            db.execute(statement)

    run.__name__ = name
    return run


def migrations() -> Migrations:
    """The migration set. Built on demand: importing sqlite-utils costs ~120 ms, which
    every process that opens an up-to-date database is spared (see `is_current`)."""
    from sqlite_utils.migrations import Migrations

    result = Migrations(MIGRATION_SET)
    for name, statements in STEPS:
        result(name=name)(_step(name, statements))
    return result


def apply(conn: sqlite3.Connection) -> None:
    """Bring the schema up to date. Call inside a `BEGIN IMMEDIATE` transaction, so that
    processes opening a new database at once apply each migration exactly once."""
    from sqlite_utils import Database

    migrations().apply(Database(conn, recursive_triggers=False, execute_plugins=False))


def is_current(conn: sqlite3.Connection) -> bool:
    """True when every step is applied (read-only, no sqlite-utils import)."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlite_migrations'"
    ).fetchone()
    if found is None:
        return False
    rows = conn.execute(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (MIGRATION_SET,)
    ).fetchall()
    return {name for name, _ in STEPS} <= {row[0] for row in rows}


def open_current(
    url: str,
    synchronous: str,
    *,
    mountinfo: Path = MOUNTINFO,
    busy_deadline: float = BUSY_DEADLINE,
    create: bool = True,
) -> SqliteDatabase:
    """Open the database of `url` with its schema up to date: created and migrated if
    needed, or (`create=False`, for reads) only an existing one, never changed: a schema
    this version would have to migrate is an error that says how to upgrade."""
    target = parse_url(url, synchronous)
    db = connect(target, mountinfo=mountinfo, busy_deadline=busy_deadline, create=create)
    try:
        if create:
            ensure(db)
        elif not db.read(is_current):
            raise ConfigError(
                "broker_url", str(target.path), "the database was made by an older version "
                "of Stem; start a worker (or enqueue a task) once to upgrade its schema",
            )  # fmt: skip
    except BaseException:
        db.close()
        raise
    return db


def ensure(db: SqliteDatabase) -> None:
    """Apply pending migrations; takes the write lock only when something is pending."""
    if not db.read(is_current):
        db.write(apply)
