"""How the SQLite broker settles a batch: the receipt of a lease, and `SettlePlan`, the
parameter rows of one settle batch grouped by statement (one `executemany` each).

A receipt is "id:attempt:deliveries:owner". `attempt` and `deliveries` pin one lease of
one attempt, so a settle for a lease that was lost (expired, re-claimed, maybe retried)
matches no row for RETRY, RELEASE and extend. ACK and DEAD remove by id regardless:
the task did finish, and AUTOINCREMENT ids are never reused.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from appliance.broker.protocol import Settlement
from appliance.envelope import EnvelopeCodec
from appliance.flow import FollowUps
from appliance.states import SettleKind
from appliance.stores.sqlite import flow

LEASE_MATCH = "WHERE id = ? AND attempt = ? AND deliveries = ? AND owner = ? AND state = 'leased'"
_DELETE = "DELETE FROM messages WHERE id = ?"
_RETRY = (
    "UPDATE messages SET payload = ?, name = ?, queue = ?, priority = ?, attempt = ?, "
    "not_before = ?, state = ?, rate_key = ?, rate_interval = ?, deliveries = 0, "
    "owner = NULL, lease_until = NULL " + LEASE_MATCH
)
_RELEASE = (
    "UPDATE messages SET state = 'ready', owner = NULL, lease_until = NULL, "
    "deliveries = deliveries - ? " + LEASE_MATCH
)
# INSERT ... SELECT: a message already gone (settled twice) yields no DLQ row.
_DEAD = (
    "INSERT INTO dead_letters (id, task_id, name, queue, priority, reason, error_type, "
    "message, traceback, attempts, deliveries, payload, enqueued_at, dead_at) "
    "SELECT ?, task_id, NULLIF(name, ''), queue, priority, ?, ?, ?, ?, attempt + 1, "
    "deliveries, payload, enqueued_at, ? FROM messages WHERE id = ?"
)


def receipt(message_id: int, attempt: int, deliveries: int, owner: str) -> str:
    return f"{message_id}:{attempt}:{deliveries}:{owner}"


def parse_receipt(text: str) -> tuple[int, int, int, str]:
    try:
        message_id, attempt, deliveries, owner = text.split(":", 3)
        return int(message_id), int(attempt), int(deliveries), owner
    except ValueError:
        raise ValueError(f"not a receipt of the SQLite broker: {text!r}") from None


@dataclass(slots=True)
class SettlePlan:
    """Parameter rows of one settle batch, grouped by statement (for executemany)."""

    deletes: list[tuple[int]] = field(default_factory=list)
    deads: list[tuple[Any, ...]] = field(default_factory=list)
    retries: list[tuple[Any, ...]] = field(default_factory=list)
    releases: list[tuple[int, int, int, int, str]] = field(default_factory=list)
    # Settlements with follow-ups, applied one by one: each only if it removes its row.
    followed: list[tuple[int, tuple[Any, ...] | None, FollowUps]] = field(default_factory=list)
    stored: bool = False  # a follow-up stored a message

    @property
    def frees_messages(self) -> bool:
        return bool(self.retries or self.releases or self.stored)

    def add(self, settlement: Settlement, now: float, codec: EnvelopeCodec) -> None:
        message_id, attempt, deliveries, owner = parse_receipt(settlement.delivery.receipt)
        kind = settlement.kind
        if kind == SettleKind.ACK:
            if settlement.follow is not None:
                self.followed.append((message_id, None, settlement.follow))
            else:
                self.deletes.append((message_id,))
        elif kind == SettleKind.DEAD:
            info = settlement.dead
            if info is None:
                raise ValueError("a DEAD settlement needs `dead` (DeadLetterInfo)")
            dead = (uuid.uuid4().hex, str(info.reason), info.error_type, info.message,
                    info.traceback, now, message_id)  # fmt: skip
            if settlement.follow is not None:
                self.followed.append((message_id, dead, settlement.follow))
            else:
                self.deads.append(dead)
                self.deletes.append((message_id,))
        elif kind == SettleKind.RETRY:
            env = settlement.envelope
            if env is None:
                raise ValueError("a RETRY settlement needs the next attempt's `envelope`")
            rate = env.rate or (None, None)
            self.retries.append(
                (codec.reencode(env), env.name, env.queue, env.priority, env.attempt,
                 env.not_before, flow.state_of(env, now), rate[0], rate[1], message_id, attempt,
                 deliveries, owner)
            )  # fmt: skip
        elif kind == SettleKind.RELEASE:
            uncount = 0 if settlement.count_delivery else 1
            self.releases.append((uncount, message_id, attempt, deliveries, owner))
        else:
            raise ValueError(f"unknown settle kind {kind!r}")

    def apply(self, conn: sqlite3.Connection, codec: EnvelopeCodec) -> None:
        # DLQ rows first: they copy the message rows that the deletes then remove.
        if self.deads:
            conn.executemany(_DEAD, self.deads)
        if self.deletes:
            conn.executemany(_DELETE, self.deletes)
        if self.retries:
            conn.executemany(_RETRY, self.retries)
        if self.releases:
            conn.executemany(_RELEASE, self.releases)
        now = time.time()
        for message_id, dead, follow in self.followed:
            if dead is not None:
                conn.execute(_DEAD, dead)
            if conn.execute(_DELETE, (message_id,)).rowcount:  # this settle removed it
                self.stored |= flow.apply_follow(conn, follow, codec, now)
