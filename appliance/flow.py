"""What settling a task sets in motion: links, a chain's next step, a chord's count, the
release of a unique task's lock. Pure functions, run by the supervisor.

Every follow-up rides on the settlement of the task before it and is applied by the
broker in the same transaction (SQLite) or script (Redis) that removes that task's
message, and only if that settle is the one that removes it: a task run twice (its
lease lost while it ran) settles twice, but only one settle finds its message, so a
link or a chain step is enqueued once, and a crash between a task and its follow-ups
is impossible (they commit together). A chord's count is idempotent on its own: each
member index counts once (`Broker` keeps the values), so the settle that completes it
is unique too.

The follow-up envelopes were built, checked and sealed by the producer (`canvas`);
here they only get `previous` (the result they follow) and, for a countdown, their
`not_before`: the two fields a worker may set (signing leaves them out for that reason).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from appliance.backend.protocol import ErrorInfo, TaskResult
from appliance.envelope import Envelope, dumps_json, from_raw
from appliance.errors import DecodeError
from appliance.states import TaskState

log = logging.getLogger("stem.worker")

RECORD_TTL_S = 7 * 86400.0  # a task's record (lineage, canvas place) outlives its result


@dataclass(frozen=True, slots=True)
class ChordCount:
    """A chord member's success: its value (JSON) counts once per index."""

    chord_id: str
    index: int
    value: bytes


@dataclass(frozen=True, slots=True)
class FollowUps:
    """What the broker applies with the settle that removes the message."""

    task_id: str  # the task whose settle this rides on
    enqueue: tuple[Envelope, ...] = ()  # links, a chain's next step
    chord: ChordCount | None = None
    release: str | None = None  # the unique lock this task holds (its value: the task id)


def canvas_of(envelope: Envelope) -> dict[str, Any] | None:
    """Where a task stands in a canvas, for `stem observe tasks show`."""
    flow = envelope.flow
    if not flow:
        return None
    for kind in ("chain", "group", "chord"):
        if kind in flow:
            place = flow[kind]
            return {"kind": kind, "id": place["id"], "index": place["index"],
                    "size": place["size"]}  # fmt: skip
    if "chord_of" in flow:
        return {"kind": "chord callback", "id": flow["chord_of"]["id"], "index": None,
                "size": flow["chord_of"]["size"]}  # fmt: skip
    return None


def _flow(envelope: Envelope) -> dict[str, Any]:
    return envelope.flow or {}


def has_flow(envelope: Envelope) -> bool:
    """True when settling this envelope may set something in motion (most do not)."""
    return envelope.flow is not None or envelope.then is not None


def after_success(
    envelope: Envelope, value: Any, now: float, ttl: float
) -> tuple[FollowUps | None, tuple[TaskResult, ...]]:
    """Links with `previous=value`, the chain's next step, the chord's count, the lock."""
    if not has_flow(envelope):
        return None, ()
    flow = _flow(envelope)
    follow = [_ready(raw, value, now, envelope) for raw in flow.get("link", ())]
    if envelope.then:
        step = _ready(envelope.then[0], value, now, envelope)
        if step is not None:
            follow.append(replace(step, then=envelope.then[1:] or None))
    chord = flow.get("chord")
    count = None
    if chord is not None:
        count = ChordCount(str(chord["id"]), int(chord["index"]), dumps_json(value))
    return _made(follow, count, envelope), ()


def after_failure(
    envelope: Envelope, error: ErrorInfo, now: float, ttl: float, *, failed: bool
) -> tuple[FollowUps | None, tuple[TaskResult, ...]]:
    """The task ended without success: failed for good (`failed`: its `link_error`s run
    with `previous={task_id, error_type, message}`) or was revoked or expired. Either
    way a chain ends (its later steps get `ChainError`) and a chord fails (its callback
    gets `ChordError`)."""
    if not has_flow(envelope):
        return None, ()
    flow = _flow(envelope)
    follow: list[Envelope | None] = []
    if failed:
        previous = {"task_id": envelope.id, "error_type": error.type, "message": error.message}
        follow = [_ready(raw, previous, now, envelope) for raw in flow.get("link_error", ())]
    results: list[TaskResult] = []
    chain = flow.get("chain")
    if envelope.then and chain is not None:
        why = (
            f"chain step {int(chain['index']) + 1} of {chain['size']} ({envelope.name}, task "
            f"{envelope.id}) ended {error.type}: {error.message}; this step never ran"
        )
        results += [_failed(raw, "ChainError", why, now, ttl) for raw in envelope.then]
    chord = flow.get("chord")
    if chord is not None:
        why = (
            f"chord member {chord['index']} of {chord['size']} ({envelope.name}, task "
            f"{envelope.id}) ended {error.type}: {error.message}; the callback never ran"
        )
        callback = {"id": str(chord["callback"]), "name": "", "queue": ""}
        results.append(_failed(callback, "ChordError", why, now, ttl))
    return _made(follow, None, envelope), tuple(results)


def _made(
    follow: list[Envelope | None], count: ChordCount | None, envelope: Envelope
) -> FollowUps | None:
    unique = _flow(envelope).get("unique")
    release = str(unique[0]) if unique else None
    enqueue = tuple(e for e in follow if e is not None)
    if not enqueue and count is None and release is None:
        return None
    return FollowUps(envelope.id, enqueue, count, release)


def _ready(raw: Any, previous: Any, now: float, source: Envelope) -> Envelope | None:
    """A pre-built envelope made ready to store: `previous` and its `not_before`. One that
    does not decode (the stored message was tampered with) is skipped and logged: the
    task it follows did finish, and its settle must not fail."""
    try:
        envelope = from_raw(raw)
    except DecodeError as exc:
        log.error(
            "task %s: a follow-up it carries does not decode (%s); it is not enqueued",
            source.id, exc, extra={"task_id": source.id},
        )  # fmt: skip
        return None
    delay = _flow(envelope).get("delay")
    not_before = now + float(delay) if delay else envelope.not_before
    return replace(envelope, previous=previous, not_before=not_before)


def _failed(raw: Any, error_type: str, why: str, now: float, ttl: float) -> TaskResult:
    task_id = str(raw.get("id", "")) if isinstance(raw, dict) else ""
    return TaskResult(
        task_id=task_id, state=TaskState.FAILURE, name=str(raw.get("name", "")),
        queue=str(raw.get("queue", "")), error=ErrorInfo(error_type, why),
        finished_at=now, expires_at=now + ttl,
    )  # fmt: skip
