"""What both store adapters do the same way, written once: the order in which a claim
visits queues, and what a replayed dead letter becomes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.envelope import EnvelopeCodec, peek_id


class QueueRotation:
    """Rotates the first queue a claim visits between calls, so a busy queue listed
    first cannot starve the queues after it."""

    def __init__(self) -> None:
        self._turn = 0

    def order(self, queues: Sequence[str]) -> list[str]:
        start = self._turn % len(queues)
        self._turn += 1
        return [*queues[start:], *queues[:start]]


@dataclass(frozen=True, slots=True)
class Replay:
    """A dead letter as the fresh first attempt that goes back on its queue."""

    task_id: str | None
    name: str  # "" when the payload does not decode
    queue: str
    priority: int
    enqueued_at: float | None
    payload: bytes
    rate: list[Any] | None = None  # [limiter key, interval]: a replay is limited again


def replay_of(
    codec: EnvelopeCodec, queue: str, priority: int, payload: bytes, task_id: str | None
) -> Replay:
    """What to store for a replayed dead letter of `queue` with the recorded `priority`
    and `task_id`.

    A payload that decodes becomes attempt 0 on its envelope's queue, re-encoded. One
    that does not decode goes back verbatim, on its original queue, with the priority
    and the task id its DLQ record kept (or whatever id can be peeked from it), so the
    worker dead-letters it again, visibly."""
    envelope = codec.peek(payload)
    if envelope is None:
        return Replay(task_id or peek_id(payload), "", queue, priority, None, payload)
    fresh = envelope.for_replay()
    return Replay(
        fresh.id, fresh.name, fresh.queue, fresh.priority, fresh.enqueued_at or None,
        codec.reencode(fresh), fresh.rate,
    )  # fmt: skip
