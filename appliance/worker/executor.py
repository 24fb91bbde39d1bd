"""Running one task inside a child and turning what happened into an outcome message.

Everything that can go wrong in user code becomes data here: the outcome crosses a
pipe to the supervisor, which decides retry or dead-letter. Nothing raised by a task
may kill the child; only the supervisor kills children.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from appliance import signals
from appliance.context import TaskContext, TaskRuntime, current_task
from appliance.envelope import Envelope, dumps_json
from appliance.errors import Reject, ResultTooLarge, Retry, SoftTimeLimitExceeded
from appliance.states import OutcomeStatus
from appliance.tasks import Task
from appliance.worker.ipc import ErrorFields, Outcome

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def safe_text(value: object) -> str:
    """str(value), or a description when its __str__ itself fails."""
    try:
        return str(value)
    except Exception as exc:  # a broken __str__ must not lose the failure
        return f"<unprintable {type(value).__name__}: str() raised {type(exc).__name__}>"


def error_fields(exc: BaseException) -> ErrorFields:
    try:
        trace = "".join(traceback.format_exception(exc))
    except Exception:  # a broken __str__ can break traceback formatting too
        trace = f"{type(exc).__name__} (traceback unavailable)"
    return ErrorFields(type(exc).__name__, safe_text(exc), trace)


class Executor:
    """Runs tasks for one child; owns its event loop for `async def` tasks."""

    def __init__(self, loop_factory: LoopFactory) -> None:
        self._loop_factory = loop_factory
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, seq: int, task: Task, envelope: Envelope, runtime: TaskRuntime) -> Outcome:
        """Run one attempt (dispatch `seq`) and say how it ended."""
        ctx = TaskContext(
            id=envelope.id, name=envelope.name, attempt=envelope.attempt,
            args=envelope.args, meta=envelope.meta, headers=envelope.headers,
            queue=envelope.queue, root_id=envelope.root_id or envelope.id, runtime=runtime,
            parent_id=envelope.parent_id,
        )  # fmt: skip
        started, clock = time.time(), time.monotonic()
        token = current_task.set(ctx)
        countdown: float | None = None
        value: Any = None
        error: ErrorFields | None = None
        raised: BaseException | None = None
        if signals.task_prerun.receivers:
            signals.task_prerun.send(signals.TaskPrerun(
                task_id=ctx.id, name=ctx.name, queue=ctx.queue, attempt=ctx.attempt,
                pid=os.getpid(), args=ctx.args, meta=ctx.meta, headers=ctx.headers,
            ))  # fmt: skip
        with task.stem.telemetry.task_span(ctx) as span:
            try:
                value = self._call(task, ctx, _arguments(task, envelope))
                status, error = self._check_value(value, task.stem.settings.max_result_bytes)
            except Retry as exc:
                status, countdown, error = (
                    OutcomeStatus.RETRY,
                    exc.countdown,
                    error_fields(exc.exc or exc),
                )
            except Reject as exc:
                status, error, raised = OutcomeStatus.REJECTED, error_fields(exc), exc
            except _ArgumentMismatch as exc:
                cause = exc.__cause__ or exc
                status, error, raised = OutcomeStatus.REJECTED, error_fields(cause), cause
            except BaseException as exc:  # user code may raise anything, sys.exit() included
                status, error, raised = OutcomeStatus.FAILED, error_fields(exc), exc
            finally:
                current_task.reset(token)
                _cancel_soft_limit()
            ran_s = time.monotonic() - clock  # wall-clock jumps cannot bend it
            span.set_outcome(str(status), error.type if error else "",
                             error.message if error else "")  # fmt: skip
        _after_run(ctx, status, value, error, raised, ran_s)
        return Outcome(
            seq, status, value=value if status is OutcomeStatus.SUCCESS else None, error=error,
            countdown=countdown, started=started, finished=time.time(), runtime=ran_s,
            progress=ctx.last_progress, traceparent=span.traceparent,
        )  # fmt: skip

    def _call(self, task: Task, ctx: TaskContext, args: dict[str, Any]) -> Any:
        try:
            task.check_args(args)
        except TypeError as exc:
            raise _ArgumentMismatch() from exc
        soft = task.options.soft_time_limit
        if task.is_async:
            return self._run_async(task.invoke(ctx, args), soft)
        if soft:
            signal.signal(signal.SIGALRM, _raise_soft_limit)
            signal.setitimer(signal.ITIMER_REAL, soft)
        return task.invoke(ctx, args)

    def _run_async(self, coro: Coroutine[Any, Any, Any], soft: float | None) -> Any:
        if self._loop is None:
            self._loop = self._loop_factory()
        return self._loop.run_until_complete(_with_soft_limit(coro, soft))

    @staticmethod
    def _check_value(value: Any, max_bytes: int) -> tuple[OutcomeStatus, ErrorFields | None]:
        """SUCCESS for a value that can be stored as the result; else a failure of the
        attempt (retried like any other) saying why."""
        try:
            size = len(dumps_json(value))
        except (TypeError, ValueError) as exc:
            message = f"task returned a value that is not JSON-serialisable: {exc}"
            return OutcomeStatus.FAILED, ErrorFields("TypeError", message)
        if size > max_bytes:
            # Capped like arguments are: one huge result would sit in the result store
            # (Redis memory, the SQLite file) for its whole TTL and cross the child's pipe.
            message = (
                f"task returned a result of {size} bytes as JSON, above the {max_bytes}-byte "
                "limit (max_result_bytes); store it elsewhere (a file, an object store, a "
                "database row) and return a reference to it"
            )
            return OutcomeStatus.FAILED, ErrorFields(ResultTooLarge.__name__, message)
        return OutcomeStatus.SUCCESS, None


def _after_run(
    ctx: TaskContext, status: OutcomeStatus, value: Any, error: ErrorFields | None,
    raised: BaseException | None, runtime: float,
) -> None:  # fmt: skip
    """task_postrun, then task_success or task_failure (a requested retry is neither)."""
    pid = os.getpid()
    if signals.task_postrun.receivers:
        signals.task_postrun.send(signals.TaskPostrun(
            task_id=ctx.id, name=ctx.name, queue=ctx.queue, attempt=ctx.attempt, pid=pid,
            outcome=_POSTRUN.get(status, str(status)), runtime=runtime,
        ))  # fmt: skip
    if status is OutcomeStatus.SUCCESS:
        if signals.task_success.receivers:
            signals.task_success.send(signals.TaskSuccess(
                task_id=ctx.id, name=ctx.name, queue=ctx.queue, attempt=ctx.attempt, pid=pid,
                result=value, runtime=runtime,
            ))  # fmt: skip
    elif status is not OutcomeStatus.RETRY and error and signals.task_failure.receivers:
        signals.task_failure.send(signals.TaskFailure(
            task_id=ctx.id, name=ctx.name, queue=ctx.queue, attempt=ctx.attempt, pid=pid,
            error_type=error.type, message=error.message, traceback=error.traceback,
            runtime=runtime, permanent=status is OutcomeStatus.REJECTED, exception=raised,
        ))  # fmt: skip


_POSTRUN = {OutcomeStatus.SUCCESS: "success", OutcomeStatus.FAILED: "failure",
            OutcomeStatus.RETRY: "retry", OutcomeStatus.REJECTED: "rejected"}  # fmt: skip


def _arguments(task: Task, envelope: Envelope) -> dict[str, Any]:
    """The handler's keyword arguments: the args, and `previous` for a link, a chain's
    later step (the result before it) or a chord's callback (every member's value, in
    member order, read from the store now: no message grows with the chord)."""
    args = dict(envelope.args)
    flow = envelope.flow
    if flow is None or not flow.get("takes_previous"):
        return args
    chord = flow.get("chord_of")
    if chord is not None:
        args["previous"] = task.stem.broker.chord_values(str(chord["id"]), int(chord["size"]))
    else:
        args["previous"] = envelope.previous
    return args


class _ArgumentMismatch(Exception):
    """The args do not bind to the handler's parameters: permanent, never retried."""


async def _with_soft_limit(coro: Coroutine[Any, Any, Any], soft: float | None) -> Any:
    if not soft:
        return await coro
    try:
        async with asyncio.timeout(soft):
            return await coro
    except TimeoutError as exc:
        raise SoftTimeLimitExceeded(f"soft time limit of {soft}s exceeded") from exc


def _raise_soft_limit(signum: int, frame: object) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


def _cancel_soft_limit() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
