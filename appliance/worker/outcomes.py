"""From what happened to a delivery to what the stores should record.

Pure functions: an outcome (or a pre-run verdict) in, a `Settlement` for the broker and
a `TaskResult` for the backend out. The supervisor applies them in batches.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from appliance import flow
from appliance.backend.protocol import ErrorInfo, TaskResult
from appliance.broker.protocol import DeadLetterInfo, Delivery, Settlement
from appliance.envelope import Envelope, EnvelopeCodec
from appliance.envelope_rules import MAX_HEADERS
from appliance.errors import DecodeError, SignatureInvalid
from appliance.records import record
from appliance.retry import Decision, decide
from appliance.states import DeadLetterReason, OutcomeStatus, SettleKind, TaskEvent, TaskState
from appliance.tasks import Task
from appliance.telemetry import FOLLOWS_HEADER, PREVIOUS_ATTEMPT_HEADER
from appliance.worker.ipc import ErrorFields, Outcome
from appliance.worker.limits import BYSTANDER, COLD_SHUTDOWN, KillReason


@record
class Settled:
    """What the stores should record for one delivery, and what it was (the event)."""

    settlement: Settlement
    result: TaskResult | None
    event: TaskEvent
    more: tuple[TaskResult, ...] = ()  # results of other tasks it decided (`flow`)
    runtime: float | None = None  # seconds the attempt ran, when it ran (metrics)


# `from_outcome` builds its TaskResult by position: a reordered field must fail here,
# not land a worker name in `queue`.
_RESULT_FIELDS = (
    "task_id", "state", "name", "queue", "value", "error", "attempt", "worker",
    "started_at", "finished_at", "progress", "progress_data", "meta", "expires_at",
)  # fmt: skip
if tuple(TaskResult.__dataclass_fields__) != _RESULT_FIELDS:
    raise ImportError(f"TaskResult's fields are no longer {_RESULT_FIELDS}")


def _error(fields: ErrorFields | None) -> ErrorInfo:
    if fields is None:
        return ErrorInfo("Error", "")
    return ErrorInfo(fields.type, fields.message, fields.traceback)


def _with_header(envelope: Envelope, name: str, value: str) -> Envelope:
    """`envelope` with one trace header more: none when it already has as many headers
    as a message may (the task still runs; only its span is not connected)."""
    headers = envelope.headers
    if name not in headers and len(headers) >= MAX_HEADERS:
        return envelope
    return replace(envelope, headers={**headers, name: value})


def _follows(follow: flow.FollowUps | None, traceparent: str | None) -> flow.FollowUps | None:
    """The follow-ups (a chain's next step, links) with the finished task's execution
    span as their parent (`FOLLOWS_HEADER`), when tracing is on."""
    if follow is None or not traceparent or not follow.enqueue:
        return follow
    enqueue = tuple(_with_header(e, FOLLOWS_HEADER, traceparent) for e in follow.enqueue)
    return replace(follow, enqueue=enqueue)


def _result_ttl(task: Task | None, default_ttl: float, now: float) -> float:
    ttl = task.options.result_ttl if task and task.options.result_ttl is not None else default_ttl
    return now + ttl


def from_outcome(
    delivery: Delivery,
    envelope: Envelope,
    task: Task,
    outcome: Outcome,
    *,
    worker: str,
    default_ttl: float,
) -> Settled:
    """Settle one finished attempt according to the task's retry policy."""
    now = time.time()
    try:
        decision = decide(
            failed=not outcome.ok,
            permanent=outcome.status is OutcomeStatus.REJECTED,
            attempt=envelope.attempt,
            max_retries=envelope.max_retries,
            strategy=task.options.strategy,
            now=now,
            countdown=outcome.countdown,
        )
    except Exception as exc:  # a user RetryStrategy raised: this task ends, not the worker
        decision = Decision(SettleKind.DEAD, reason=DeadLetterReason.PERMANENT)
        broken = ErrorFields(type(exc).__name__, f"the retry strategy failed: {exc}")
        outcome = replace(outcome, error=broken)
    expires_at = _result_ttl(task, default_ttl, now)

    def result(state: TaskState, value: Any = None, error: ErrorInfo | None = None) -> TaskResult:
        # By position: once per task, a keyword call of these 14 fields cost twice as much.
        return TaskResult(
            envelope.id, state, envelope.name, envelope.queue, value, error, envelope.attempt,
            worker, outcome.started, outcome.finished or now, outcome.progress, None,
            envelope.meta, expires_at,
        )  # fmt: skip

    if decision.kind is SettleKind.ACK:
        success = None if task.options.ignore_result else result(TaskState.SUCCESS, outcome.value)
        follow, more = flow.after_success(envelope, outcome.value, now, default_ttl)
        follow = _follows(follow, outcome.traceparent)
        return Settled(
            Settlement.ack(delivery, follow), success, TaskEvent.SUCCESS, more, outcome.runtime
        )
    error = _error(outcome.error)
    if decision.kind is SettleKind.RETRY:
        assert decision.not_before is not None
        retry = result(TaskState.RETRY, error=error)
        following = envelope.next_attempt(decision.not_before)
        if outcome.traceparent:  # the next attempt's span links to this one
            following = _with_header(following, PREVIOUS_ATTEMPT_HEADER, outcome.traceparent)
        settlement = Settlement.retry(delivery, following)
        return Settled(settlement, retry, TaskEvent.RETRY, runtime=outcome.runtime)
    reason = decision.reason or DeadLetterReason.EXHAUSTED
    dead = result(TaskState.DEAD, error=error)
    info = DeadLetterInfo(reason, error.type, error.message, error.traceback)
    follow, more = flow.after_failure(envelope, error, now, default_ttl, failed=True)
    follow = _follows(follow, outcome.traceparent)
    settlement = Settlement.dead_letter(delivery, info, follow)
    return Settled(settlement, dead, TaskEvent.DEAD, more, outcome.runtime)


def dead_before_run(
    delivery: Delivery,
    envelope: Envelope | None,
    reason: DeadLetterReason,
    error_type: str,
    message: str,
    *,
    default_ttl: float,
) -> Settled:
    """Dead-letter a delivery that will not run (undecodable, unknown task, poison pill)."""
    now = time.time()
    info = DeadLetterInfo(reason, error_type, message)
    if envelope is None:
        return Settled(Settlement.dead_letter(delivery, info), None, TaskEvent.DEAD)
    error = ErrorInfo(error_type, message)
    result = TaskResult(
        task_id=envelope.id, state=TaskState.DEAD, name=envelope.name,
        queue=envelope.queue, attempt=envelope.attempt, error=error, finished_at=now,
        meta=envelope.meta, expires_at=now + default_ttl,
    )  # fmt: skip
    follow, more = flow.after_failure(envelope, error, now, default_ttl, failed=True)
    return Settled(Settlement.dead_letter(delivery, info, follow), result, TaskEvent.DEAD, more)


REVOKED_BEFORE_RUN = "revoked before it could run"
REVOKED_TERMINATED = "revoked and terminated while it ran"
EXPIRED = "expired before it could run"


def revoked(
    delivery: Delivery, envelope: Envelope, why: str, *, worker: str = "", default_ttl: float
) -> Settled:
    """Cancel a delivery for good, not retried: revoked (before or while it ran) or past
    its `expires` time. `result()` raises `TaskRevokedError` saying which."""
    now = time.time()
    error = ErrorInfo("TaskRevokedError", why)
    result = TaskResult(
        task_id=envelope.id, state=TaskState.REVOKED, name=envelope.name,
        queue=envelope.queue, attempt=envelope.attempt, worker=worker, finished_at=now,
        error=error, meta=envelope.meta, expires_at=now + default_ttl,
    )  # fmt: skip
    follow, more = flow.after_failure(envelope, error, now, default_ttl, failed=False)
    return Settled(Settlement.ack(delivery, follow), result, TaskEvent.REVOKED, more)


def worker_lost(
    delivery: Delivery,
    envelope: Envelope,
    task: Task,
    message: str,
    *,
    worker: str,
    default_ttl: float,
) -> Settled:
    """The child died under the task: give it back at once, still counted, so a task
    that kills every child it runs on reaches the DLQ as a poison pill."""
    now = time.time()
    if delivery.deliveries >= task.options.max_deliveries:
        return dead_before_run(
            delivery, envelope, DeadLetterReason.POISON_PILL, "WorkerLostError",
            f"{message}; the child died under this task {delivery.deliveries} times",
            default_ttl=default_ttl,
        )  # fmt: skip
    result = TaskResult(
        task_id=envelope.id, state=TaskState.RETRY, name=envelope.name, queue=envelope.queue,
        attempt=envelope.attempt, worker=worker, finished_at=now,
        error=ErrorInfo("WorkerLostError", message), meta=envelope.meta,
        expires_at=now + default_ttl,
    )  # fmt: skip
    return Settled(Settlement.release(delivery, count_delivery=True), result, TaskEvent.RELEASED)


def triage(
    delivery: Delivery, registry: Mapping[str, Task], codec: EnvelopeCodec, *, default_ttl: float
) -> Settled | tuple[Envelope, Task]:
    """Before running: a verdict for deliveries that must not run (undecodable, unknown
    task, poison pill, expired), else the envelope and task to run."""
    # The signature of a message that will run is checked by its child, right before it
    # runs (`child._handle`): spread over the children, not on this loop (measured: the
    # HMAC check cost the supervisor, which bounds the drain, 8% of its time). A message
    # this loop settles itself, without running it, is checked here first.
    try:
        envelope = codec.decode(delivery.payload, verify=False)
    except DecodeError as exc:
        return dead_before_run(delivery, None, DeadLetterReason.UNDECODABLE, "DecodeError",
                               str(exc), default_ttl=default_ttl)  # fmt: skip
    task = registry.get(envelope.name)
    runs = (
        task is not None
        and delivery.deliveries <= task.options.max_deliveries
        and (envelope.expires is None or envelope.expires >= time.time())
    )
    if not runs:
        try:
            codec.verify(delivery.payload)
        except SignatureInvalid as exc:
            return signature_invalid(delivery, str(exc), default_ttl=default_ttl)
    if task is None:
        return dead_before_run(
            delivery, envelope, DeadLetterReason.UNKNOWN_TASK, "NotRegistered",
            f"no task named {envelope.name!r} is registered with this worker",
            default_ttl=default_ttl,
        )  # fmt: skip
    if delivery.deliveries > task.options.max_deliveries:
        return dead_before_run(
            delivery, envelope, DeadLetterReason.POISON_PILL, "WorkerLostError",
            f"delivered {delivery.deliveries} times without finishing", default_ttl=default_ttl,
        )  # fmt: skip
    if envelope.expires is not None and envelope.expires < time.time():
        return revoked(delivery, envelope, EXPIRED, default_ttl=default_ttl)
    return envelope, task


def signature_invalid(delivery: Delivery, message: str, *, default_ttl: float) -> Settled:
    """Dead-letter a message whose signature does not hold. Nobody vouches for its fields,
    so none is acted on: no result under the id it claims (it could be another task's),
    no link or chord follow-up; the DLQ record still shows what it claims to be."""
    return dead_before_run(delivery, None, DeadLetterReason.SIGNATURE_INVALID,
                           "SignatureInvalid", message, default_ttl=default_ttl)  # fmt: skip


def released(delivery: Delivery) -> Settled:
    """Give a delivery back unstarted: not counted against the task."""
    return Settled(Settlement.release(delivery, count_delivery=False), None, TaskEvent.RELEASED)


def after_child_death(
    delivery: Delivery,
    envelope: Envelope,
    task: Task,
    kill: KillReason | None,
    *,
    running: bool,
    exit_text: str,
    worker: str,
    default_ttl: float,
) -> Settled:
    """What happens to a delivery its child held when the child died.

    Not running yet, stopped by a cold shutdown, or killed for another task's limit:
    back uncounted. Killed for a limit
    the task broke (time, memory): a failure under its retry policy. Otherwise the child
    was lost under it (a crash, a signal, silence): back at once, counted (poison pills).
    """
    if not running or kill is COLD_SHUTDOWN or kill is BYSTANDER:
        return released(delivery)
    if kill is not None and kill.counts_as_task_failure:
        failed = Outcome(0, OutcomeStatus.FAILED, error=ErrorFields(kill.error_type, kill.message),
                         finished=time.time())  # fmt: skip
        return from_outcome(
            delivery, envelope, task, failed, worker=worker, default_ttl=default_ttl
        )
    reason = kill.message if kill is not None else exit_text
    return worker_lost(delivery, envelope, task, reason, worker=worker, default_ttl=default_ttl)
