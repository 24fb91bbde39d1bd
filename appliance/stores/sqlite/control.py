"""The control channel on SQLite: requests and replies in two tables of the store's
file (migration 0004), and a control byte on the wake-up sockets the supervisors
already listen on, so a request is seen at once, not at the next poll."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import orjson

from appliance.control.protocol import REQUEST_TTL_S, ControlReply, ControlRequest
from appliance.stores.sqlite.db import Database
from appliance.stores.sqlite.wake import CONTROL, SqliteWaker

_SEND = """
INSERT INTO control_requests (id, target, command, args, sent_at, expires_at)
VALUES (?, ?, ?, ?, ?, ?)
"""
_NEWEST = "SELECT COALESCE(MAX(seq), 0) FROM control_requests"
_RECEIVE = """
SELECT seq, id, target, command, args, sent_at FROM control_requests
WHERE seq > ? AND (target = '*' OR target = ?) AND expires_at >= ? ORDER BY seq
"""
_REPLY = """
INSERT INTO control_replies (request_id, worker, reply, replied_at, expires_at)
VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET reply = excluded.reply,
replied_at = excluded.replied_at, expires_at = excluded.expires_at
"""
_REPLIES = """
SELECT request_id, worker, reply, replied_at FROM control_replies
WHERE request_id = ? AND expires_at >= ? ORDER BY replied_at
"""
_PURGE = (
    "DELETE FROM control_requests WHERE expires_at < ?",
    "DELETE FROM control_replies WHERE expires_at < ?",
)


class SqliteControl:
    """`ControlChannel` on the store's database and wake-up sockets."""

    def __init__(self, db: Database, waker: SqliteWaker) -> None:
        self._db = db
        self._waker = waker

    def cursor(self) -> str:
        newest: int = self._db.read(lambda conn: conn.execute(_NEWEST).fetchone()[0])
        return str(newest)

    def send(self, request: ControlRequest, ttl: float = REQUEST_TTL_S) -> None:
        row = (request.id, request.target, request.command, orjson.dumps(request.args),
               request.sent_at, time.time() + ttl)  # fmt: skip
        self._db.write(lambda conn: conn.execute(_SEND, row))
        self._waker.poke(CONTROL)

    def receive(self, after: str, worker: str) -> tuple[list[ControlRequest], str]:
        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_RECEIVE, (int(after), worker, time.time())).fetchall()

        rows = self._db.read(work)
        requests = [
            ControlRequest(command, orjson.loads(args), target, request_id, sent_at)
            for _, request_id, target, command, args, sent_at in rows
        ]
        return requests, str(rows[-1][0]) if rows else after

    def reply(self, replies: Sequence[ControlReply], ttl: float = REQUEST_TTL_S) -> None:
        if not replies:
            return
        expires_at = time.time() + ttl
        rows = [(r.request_id, r.worker, orjson.dumps(r.reply), r.replied_at, expires_at)
                for r in replies]  # fmt: skip
        self._db.write(lambda conn: conn.executemany(_REPLY, rows))

    def replies(self, request_id: str) -> list[ControlReply]:
        rows = self._db.read(
            lambda conn: conn.execute(_REPLIES, (request_id, time.time())).fetchall()
        )
        return [
            ControlReply(rid, worker, orjson.loads(reply), at) for rid, worker, reply, at in rows
        ]

    def purge_expired(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            now = time.time()
            return sum(conn.execute(sql, (now,)).rowcount for sql in _PURGE)

        return self._db.write(work)
