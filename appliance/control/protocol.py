"""The control channel: requests to live workers and their replies, through the store.

Every worker sharing a store reads the same log of requests, each from its own cursor,
so a broadcast reaches every live worker (a fan-out, not a competing consumer) and a
targeted request reaches the one it names. A request is a row (SQLite) or a stream
entry (Redis) plus a wake-up poke, so a worker sees it in milliseconds; each reply is
stored under its request id and worker. Requests and replies expire after their TTL.

Which workers should answer is the client's business (`control.client`): it knows the
live ones from their heartbeat records and waits for each, or for its timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Every command a worker serves (`control.server`), with what its reply holds.
COMMANDS = ("ping", "stats", "inspect", "revoke", "refresh", "shutdown")
BROADCAST = "*"  # the target of a request every live worker should answer
REQUEST_TTL_S = 60.0  # requests and replies are kept this long


def new_request_id() -> str:
    return os.urandom(8).hex()


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """One command to one worker (`target`) or to every live one (`BROADCAST`)."""

    command: str
    args: dict[str, Any] = field(default_factory=dict)
    target: str = BROADCAST
    id: str = field(default_factory=new_request_id)
    sent_at: float = field(default_factory=time.time)

    def for_worker(self, worker: str) -> bool:
        return self.target in (BROADCAST, worker)


@dataclass(frozen=True, slots=True)
class ControlReply:
    """What one worker answered to one request."""

    request_id: str
    worker: str
    reply: dict[str, Any]
    replied_at: float = field(default_factory=time.time)


class ControlChannel(Protocol):
    """The store's half of the control channel (one per `Stores`)."""

    def cursor(self) -> str:
        """The position just after the newest request now: a worker that starts reads
        from here, so it never runs commands sent before it existed."""
        ...

    def send(self, request: ControlRequest, ttl: float = REQUEST_TTL_S) -> None:
        """Store the request and wake every worker listening on this store."""
        ...

    def receive(self, after: str, worker: str) -> tuple[list[ControlRequest], str]:
        """Requests after the cursor `after` for `worker` (or every worker), oldest
        first, and the cursor to read from next time."""
        ...

    def reply(self, replies: Sequence[ControlReply], ttl: float = REQUEST_TTL_S) -> None:
        """Store replies, each under its request id and worker."""
        ...

    def replies(self, request_id: str) -> list[ControlReply]:
        """Every reply stored so far for the request."""
        ...

    def purge_expired(self) -> int:
        """Delete requests and replies past their TTL. Returns how many."""
        ...
