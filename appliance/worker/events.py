"""What the supervisor tells the world as things happen: signals (`appliance.signals`)
and telemetry (`appliance.telemetry`), from one place.

Every method is cheap when nobody listens: a signal without receivers is one attribute
check (its payload is never built), and telemetry off is the no-op `Telemetry`. The
supervisor, its process tree and its store round each hold the one `SupervisorEvents`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Literal, TypedDict

from appliance import signals
from appliance.states import TaskEvent
from appliance.telemetry import NOOP, Telemetry

if TYPE_CHECKING:
    from appliance.broker.protocol import Delivery
    from appliance.envelope import Envelope
    from appliance.worker.outcomes import Settled


class SupervisorEvents:
    """Signals and telemetry of one supervisor (`worker` is its id)."""

    def __init__(self, worker: str = "", telemetry: Telemetry = NOOP) -> None:
        self.worker = worker
        self.telemetry = telemetry

    # --- tasks -------------------------------------------------------------------------

    def received(self, envelope: Envelope, pool: str, delivery: Delivery) -> None:
        if signals.task_received.receivers:
            signals.task_received.send(signals.TaskReceived(
                task_id=envelope.id, name=envelope.name, queue=envelope.queue,
                attempt=envelope.attempt, worker=self.worker, pool=pool,
                deliveries=delivery.deliveries, enqueued_at=envelope.enqueued_at,
            ))  # fmt: skip

    def settled(self, settled: Settled) -> None:
        """One settlement queued: metrics, and the retry/revoke/dead-letter signals."""
        result = settled.result
        event = settled.event
        if self.telemetry.enabled:
            name, queue = (result.name, result.queue) if result else ("", "")
            self.telemetry.record_outcome(str(event), name, queue, settled.runtime)
        if event is TaskEvent.RETRY and signals.task_retry.receivers:
            signals.task_retry.send_lazy(lambda: self._retry(settled))
        elif event is TaskEvent.REVOKED and signals.task_revoked.receivers:
            signals.task_revoked.send_lazy(lambda: self._revoked(settled))
        elif event is TaskEvent.DEAD and signals.task_dead_lettered.receivers:
            signals.task_dead_lettered.send_lazy(lambda: self._dead(settled))
        if (
            result is not None
            and result.error is not None
            and result.error.type == "SoftTimeLimitExceeded"
            and signals.task_timeout.receivers
        ):
            signals.task_timeout.send(signals.TaskTimeout(
                task_id=result.task_id, name=result.name, queue=result.queue,
                attempt=result.attempt, worker=self.worker, kind="soft", limit=0.0,
                child_pid=0,
            ))  # fmt: skip

    def _retry(self, settled: Settled) -> signals.TaskRetry:
        result, envelope = settled.result, settled.settlement.envelope
        not_before = envelope.not_before if envelope and envelope.not_before else time.time()
        error = result.error if result else None
        return signals.TaskRetry(
            **_task_fields(settled), worker=self.worker,
            error_type=error.type if error else "", message=error.message if error else "",
            countdown=max(0.0, not_before - time.time()), not_before=not_before,
        )  # fmt: skip

    def _revoked(self, settled: Settled) -> signals.TaskRevoked:
        error = settled.result.error if settled.result else None
        why = error.message if error else ""
        reason = (
            "expired" if "expired" in why else "terminated" if "terminated" in why else "revoked"
        )
        return signals.TaskRevoked(
            **_task_fields(settled), worker=self.worker, reason=reason,
            terminated=reason == "terminated",
        )  # fmt: skip

    def _dead(self, settled: Settled) -> signals.TaskDeadLettered:
        dead = settled.settlement.dead
        return signals.TaskDeadLettered(
            **_task_fields(settled), worker=self.worker,
            reason=str(dead.reason) if dead else "", error_type=dead.error_type if dead else "",
            message=dead.message if dead else "",
        )  # fmt: skip

    def hard_timeout(self, envelope: Envelope, limit: float, child_pid: int) -> None:
        if signals.task_timeout.receivers:
            signals.task_timeout.send(signals.TaskTimeout(
                task_id=envelope.id, name=envelope.name, queue=envelope.queue,
                attempt=envelope.attempt, worker=self.worker, kind="hard", limit=limit,
                child_pid=child_pid,
            ))  # fmt: skip

    def lease_renewals(self, count: int) -> None:
        if count and self.telemetry.enabled:
            self.telemetry.record_lease_renewals(count)

    # --- children ------------------------------------------------------------------------

    def child_spawned(self, pool: str, slot: int, pid: int) -> None:
        if signals.child_spawned.receivers:
            signals.child_spawned.send(
                signals.ChildSpawned(worker=self.worker, pool=pool, slot=slot, child_pid=pid)
            )

    def child_died(
        self, pool: str, slot: int, pid: int, code: int, reason: str, *, expected: bool,
        task_id: str | None,
    ) -> None:  # fmt: skip
        if self.telemetry.enabled:
            self.telemetry.record_child_restart(pool, reason)
        if signals.child_died.receivers:
            signals.child_died.send(signals.ChildDied(
                worker=self.worker, pool=pool, slot=slot, child_pid=pid, exit_code=code,
                reason=reason, expected=expected, task_id=task_id,
            ))  # fmt: skip

    # --- the worker ------------------------------------------------------------------------

    def worker_init(self, pools: tuple[str, ...], queues: tuple[str, ...], size: int) -> None:
        signals.worker_init.send_lazy(lambda: signals.WorkerInit(
            worker=self.worker, pid=os.getpid(), host=os.uname().nodename, pools=pools,
            queues=queues, concurrency=size,
        ))  # fmt: skip

    def worker_ready(self, pools: tuple[str, ...], queues: tuple[str, ...], size: int) -> None:
        signals.worker_ready.send_lazy(lambda: signals.WorkerReady(
            worker=self.worker, pid=os.getpid(), host=os.uname().nodename, pools=pools,
            queues=queues, concurrency=size,
        ))  # fmt: skip

    def worker_heartbeat(self, in_flight: int, processed: int, failed: int, children: int) -> None:
        signals.worker_heartbeat.send_lazy(lambda: signals.WorkerHeartbeat(
            worker=self.worker, pid=os.getpid(), in_flight=in_flight, processed=processed,
            failed=failed, children=children,
        ))  # fmt: skip

    def worker_shutdown(self, mode: Literal["warm", "cold"], processed: int, failed: int) -> None:
        signals.worker_shutdown.send_lazy(lambda: signals.WorkerShutdown(
            worker=self.worker, pid=os.getpid(), mode=mode, processed=processed, failed=failed,
        ))  # fmt: skip


class _TaskFields(TypedDict):
    task_id: str
    name: str
    queue: str
    attempt: int


def _task_fields(settled: Settled) -> _TaskFields:
    result = settled.result
    if result is not None:
        return {"task_id": result.task_id, "name": result.name, "queue": result.queue,
                "attempt": result.attempt}  # fmt: skip
    delivery = settled.settlement.delivery
    return {"task_id": "", "name": "", "queue": delivery.queue, "attempt": 0}
