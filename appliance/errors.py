"""One error hierarchy for the whole appliance.

Every error a user can catch derives from `StemError`. Messages say what to do next.
This module imports nothing from the package.
"""

from __future__ import annotations

from typing import Any


class StemError(Exception):
    """Base class of every error raised by the appliance."""


# --- configuration and input ---------------------------------------------------------


class ConfigError(StemError, ValueError):
    """A configuration value is missing or invalid; names the source, key and reason."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}")


class PayloadTooLarge(StemError, ValueError):
    """An enqueue's encoded envelope is above `max_payload_bytes`."""


class ResultTooLarge(StemError, ValueError):
    """A task returned a value whose JSON is above `max_result_bytes`; the attempt fails
    (and is retried like any failure). The name is the error type its result records."""


class NotRegistered(StemError, KeyError):
    """No task of that name is registered with this `Stem`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "task not registered"


class DecodeError(StemError, ValueError):
    """Bytes that are not a valid envelope; keeps the raw data for the DLQ."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data


class SignatureInvalid(DecodeError):
    """A message a worker that requires signatures must not run: unsigned, signed with a
    key id it does not have, or changed after it was signed. Dead-lettered with reason
    `signature-invalid`, never `undecodable`. A DecodeError, so that every place that
    refuses undecodable bytes refuses these too (the safe default).

    `reason` is one of "unsigned", "unknown-key", "malformed", "bad-signature"."""

    def __init__(self, reason: str, message: str = "", data: bytes = b"") -> None:
        super().__init__(message or f"signature invalid: {reason}", data)
        self.reason = reason


# --- brokers and backends --------------------------------------------------------------


class BrokerError(StemError):
    """The broker failed an operation."""


class BrokerUnavailable(BrokerError, ConnectionError):
    """The broker cannot be reached (Redis down, database file unreachable)."""


class BrokerFull(BrokerError):
    """The broker has no space left (disk full, page limit reached); nothing was written."""


class BrokerBusy(BrokerError):
    """The broker stayed locked by other writers longer than the configured deadline."""


class StoreReplaced(BrokerUnavailable):
    """The store this process opened is gone from under it (its SQLite file deleted or
    replaced): what it claims and settles no longer reaches the producers' store."""


class UnsupportedBroker(ConfigError):
    """A broker URL whose scheme no adapter handles."""


class ResultTimeout(StemError, TimeoutError):
    """`TaskHandle.result(timeout=...)` ran out of time before the task finished."""


# --- task outcomes -----------------------------------------------------------------------


class TaskError(StemError):
    """A task failed; `result()` raises this (or a subclass) in the caller's process.

    The original exception lives in another process, so the caller gets its type name,
    message and traceback as data rather than the object itself.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str = "",
        traceback: str = "",
        task_id: str = "",
        state: str = "",
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.traceback = traceback
        self.task_id = task_id
        self.state = state

    def __str__(self) -> str:
        base = super().__str__()
        return f"{self.error_type}: {base}" if self.error_type else base


class TimeLimitExceeded(TaskError):
    """The task ran past its hard time limit; the supervisor killed its child."""


class SoftTimeLimitExceeded(StemError):
    """Raised inside a running task when its soft time limit passes."""


class MemoryLimitExceeded(TaskError):
    """The task's child grew past `max_memory`; the supervisor killed it."""


class WorkerLostError(TaskError):
    """The child process died under the task (signal, segfault, os._exit)."""


class TaskRevokedError(TaskError):
    """The task was revoked (or expired) before or while it ran."""


class ChainError(TaskError):
    """A step of the chain failed for good (or was revoked); the later steps never ran.
    The message names the failed step: its position, task name and task id."""


class ChordError(TaskError):
    """A member of the chord failed for good (or was revoked); the callback never ran.
    The message names the failed member: its index, task name and task id."""


class Reject(StemError):
    """Raise inside a task to fail it permanently: straight to the DLQ, no retries."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(StemError):
    """Raised by `TaskContext.retry()`: schedule the next attempt, optionally after `countdown`."""

    def __init__(self, countdown: float | None = None, exc: BaseException | None = None) -> None:
        # Checked here, inside the task: a bad value must fail this attempt, not the
        # supervisor that later schedules the retry.
        if countdown is not None and (
            isinstance(countdown, bool) or not isinstance(countdown, int | float)
        ):
            raise TypeError(f"retry countdown must be a number of seconds, got {countdown!r}")
        if countdown is not None and not 0 <= countdown < float("inf"):
            raise ValueError(f"retry countdown must be >= 0 and finite, got {countdown!r}")
        super().__init__(f"retry requested (countdown={countdown})")
        self.countdown = countdown
        self.exc = exc


ERROR_TYPES: dict[str, type[TaskError]] = {
    "TimeLimitExceeded": TimeLimitExceeded,
    "MemoryLimitExceeded": MemoryLimitExceeded,
    "WorkerLostError": WorkerLostError,
    "TaskRevokedError": TaskRevokedError,
    "ChainError": ChainError,
    "ChordError": ChordError,
}


def task_error(error_type: str, message: str, **details: Any) -> TaskError:
    """The `TaskError` subclass a caller sees for a stored failure of `error_type`."""
    cls = ERROR_TYPES.get(error_type, TaskError)
    return cls(message, error_type=error_type, **details)
