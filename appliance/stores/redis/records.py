"""How the Redis broker turns its stored records into the protocol's dataclasses:
dead-letter records and the view of a stream entry (`observe tasks`)."""

from __future__ import annotations

from typing import Any

import orjson

from appliance.broker.protocol import DeadLetterEntry, MessageInfo, Settlement
from appliance.envelope import EnvelopeCodec, peek_id


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def dead_record(codec: EnvelopeCodec, s: Settlement, dead_at: float) -> dict[str, Any]:
    info = s.dead
    envelope = codec.peek(s.delivery.payload)
    if envelope is not None:
        task_id: str | None = envelope.id
        name: str | None = envelope.name
        attempts, priority = envelope.attempt + 1, envelope.priority
        enqueued_at: float | None = envelope.enqueued_at
    else:
        task_id, name, attempts, enqueued_at = peek_id(s.delivery.payload), None, 1, None
        priority = 0
    return {
        "task_id": task_id, "name": name, "queue": s.delivery.queue,
        "reason": str(info.reason) if info else "", "error_type": info.error_type if info else "",
        "message": info.message if info else "", "traceback": info.traceback if info else "",
        "attempts": attempts, "enqueued_at": enqueued_at, "dead_at": dead_at,
        "extra": {"deliveries": s.delivery.deliveries, "priority": priority},
    }  # fmt: skip


def dead_entry(entry_id: str, record: bytes, payload: bytes) -> DeadLetterEntry:
    data = orjson.loads(record)
    return DeadLetterEntry(id=entry_id, payload=payload, **data)


def stream_info(
    codec: EnvelopeCodec, queue: str, entry_id: str, fields: dict[bytes, bytes],
    held: dict[str, Any], leases: dict[str, float], now: float,
) -> MessageInfo:  # fmt: skip
    base = int(fields.get(b"b", b"0"))
    payload = fields.get(b"p", b"")
    pend = held.get(entry_id)
    if pend is None:
        return message_info(codec, queue, payload, "ready", base=base)
    owner = text(pend["consumer"])
    idle = pend["time_since_delivered"] / 1000
    lease = leases.get(owner)
    return message_info(
        codec, queue, payload, "leased", base=base + pend["times_delivered"], owner=owner,
        lease_until=None if lease is None else now - idle + lease,
    )  # fmt: skip


def message_info(
    codec: EnvelopeCodec, queue: str, payload: bytes, state: str, *, base: int,
    not_before: float | None = None, lease_until: float | None = None, owner: str | None = None,
) -> MessageInfo:  # fmt: skip
    env = codec.peek(payload)
    if env is not None:
        task_id, name, priority, attempt = env.id, env.name, env.priority, env.attempt
        not_before = not_before if not_before is not None else env.not_before
    else:
        task_id, name, priority, attempt = peek_id(payload) or "", "", 0, 0
    return MessageInfo(
        task_id=task_id, name=name, queue=queue, priority=priority, attempt=attempt,
        deliveries=base, state=state, not_before=not_before, lease_until=lease_until,
        owner=owner,
    )  # fmt: skip
