"""Data for the TUI tests and the bench: real rows in a real store, made the way a
worker makes them (claim, then settle as dead), plus heartbeat records."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from textual.pilot import Pilot

from appliance.app import EnqueueRequest, Stem
from appliance.backend.protocol import ChildInfo, ErrorInfo, TaskResult, WorkerHeartbeat
from appliance.broker.protocol import Consumer, DeadLetterInfo, Settlement
from appliance.envelope import peek_id
from appliance.states import DeadLetterReason, TaskState
from tui.app import StemTui
from tui.screens.base import StemScreen

T = TypeVar("T")
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "app/tasks.py", line 12, in send\n'
    '    raise ValueError(f"mailbox {box} is full")\n'
    "ValueError: mailbox ops@example.com is full"
)


def dead_letters(
    stem: Stem,
    names: Sequence[str],
    *,
    queue: str = "default",
    reason: DeadLetterReason = DeadLetterReason.EXHAUSTED,
    task_ids: Sequence[str] | None = None,
    chunk: int = 500,
) -> list[str]:
    """Dead-letter one fresh task per name (newest last); returns their task ids."""
    given = task_ids or [None] * len(names)
    handles = stem.enqueue_many(
        EnqueueRequest(name, {"n": i}, queue=queue, task_id=task_id)
        for i, (name, task_id) in enumerate(zip(names, given, strict=True))
    )
    ids = [h.id for h in handles]
    info = DeadLetterInfo(reason, "ValueError", "mailbox ops@example.com is full", TRACEBACK)
    consumer = Consumer.this_process()
    left = len(ids)
    while left:
        claimed = stem.broker.claim([queue], min(chunk, left), consumer=consumer, lease=60)
        assert claimed, "nothing to claim: the seeded tasks went elsewhere"
        stray = {peek_id(d.payload) for d in claimed} - set(ids)
        assert not stray, f"{queue} held other tasks first: seed dead letters before them"
        # One settle per delivery keeps the DLQ in claim order (its order is dead time).
        for delivery in claimed:
            stem.broker.settle([Settlement.dead_letter(delivery, info)])
        left -= len(claimed)
    # A worker stores the DEAD result with the dead letter.
    error = ErrorInfo(info.error_type, info.message, TRACEBACK)
    stem.backend.store([
        TaskResult(i, TaskState.DEAD, name=n, queue=queue, error=error)
        for i, n in zip(ids, names, strict=True)
    ])  # fmt: skip
    return ids


def heartbeat(
    worker: str = "edge-1",
    *,
    now: float | None = None,
    age: float = 0.3,
    processed: int = 120,
    children: tuple[ChildInfo, ...] | None = None,
) -> WorkerHeartbeat:
    now = time.time() if now is None else now
    if children is None:
        children = (
            ChildInfo(0, "default", 5001, "running", "6f1c2a9e0b7d4c3f8a5e1d2c3b4a5f60",
                      "mail.send", 3.2, 8.0, 10.0, 40.0, 38_000_000, 0.3, 17),
            ChildInfo(1, "default", 5002, "idle", rss=30_000_000, beat_age_s=0.2, tasks_done=20),
            ChildInfo(2, "default", 5003, "running", "0b255791b87a476f916870f7ab913452",
                      "report.build", 9.1, None, 10.0, None, 50_000_000, 3.4, 5),
            ChildInfo(3, "default", 0, "empty"),
        )  # fmt: skip
    return WorkerHeartbeat(
        id=worker, host="edge", pid=4242, pools=("default",), queues=("default", "reports"),
        concurrency=len(children), in_flight=2, processed=processed, failed=3,
        started_at=now - 3723, version="0.1.0", sent_at=now - age, interval_s=2.0,
        children=children,
    )  # fmt: skip


def publish(stem: Stem, beat: WorkerHeartbeat, ttl: float = 600.0) -> None:
    stem.backend.put_worker_heartbeat(beat, ttl=ttl)


async def until(pilot: Pilot[None], predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the app run until `predicate` holds (bounded: fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the app never got there"
        await pilot.pause(0.02)


def loaded(app: StemTui, screen_type: type[StemScreen[T]]) -> Callable[[], bool]:
    """True once the current screen is `screen_type` and has shown data of its own since
    (not only `app.loads` moved: the view just left may finish a load after the switch)."""
    marker = app.loads

    def check() -> bool:
        screen = app.screen
        return isinstance(screen, screen_type) and screen.shown_at_load > marker

    return check
