"""Enums shared by every layer: task states, dead-letter reasons, settle kinds, exit codes.

This module imports nothing from the package, so anything may import it.
"""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    """Where a task is in its life. Edges:

    PENDING -> STARTED            a child began running it
    STARTED -> SUCCESS            it returned
    STARTED -> RETRY -> STARTED   it failed and the retry policy scheduled another attempt
    STARTED -> DEAD               it failed for good and was moved to the dead-letter queue
    PENDING -> DEAD               undecodable, unknown task, poison pill (decided before running)
    PENDING -> REVOKED            revoked or expired before it ran
    DEAD    -> PENDING            replayed from the DLQ
    FAILURE is a final failure that was not dead-lettered (kept for peers' vocabulary).
    """

    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"
    DEAD = "DEAD"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED, TaskState.DEAD})


def derive_state(message_state: str | None, result_state: TaskState | None) -> TaskState:
    """The one rule for a task's state, from what the stores hold: the state of its
    message in the broker ("ready", "delayed", "leased"; None when there is none) and
    the state of its stored result (None when there is none). Every reader calls this.

    A final result wins. A leased message means STARTED: the lease is the STARTED mark,
    written by the same transaction (SQLite) or script (Redis) that hands the delivery
    out, so it costs nothing extra and no reader can see a running task as RETRY (the
    result of its previous attempt) or PENDING. A message that waits (ready or delayed)
    keeps the stored state (RETRY between attempts), or PENDING when there is none.
    Readers must read the message before the result: results commit before (or with)
    the settle that removes the message, so a message gone means its result is there.
    """
    if result_state is not None and (result_state in _FINAL or message_state is None):
        return result_state
    if message_state == "leased":
        return TaskState.STARTED
    return result_state if result_state is not None else TaskState.PENDING


class DeadLetterReason(enum.StrEnum):
    """Why a message was moved to the DLQ (the reason codes of SPEC section 2)."""

    EXHAUSTED = "exhausted"
    PERMANENT = "permanent"
    UNDECODABLE = "undecodable"
    UNKNOWN_TASK = "unknown-task"
    SIGNATURE_INVALID = "signature-invalid"
    POISON_PILL = "poison-pill"


class SettleKind(enum.StrEnum):
    """What the broker does with a delivery when its owner is done with it."""

    ACK = "ack"  # remove it: the task finished (or was cancelled) for good
    RETRY = "retry"  # store the next attempt's envelope, claimable at not_before
    DEAD = "dead"  # move it to the dead-letter queue
    RELEASE = "release"  # give it back unchanged, claimable now


class TaskEvent(enum.StrEnum):
    """What the supervisor did with a delivery (counted, logged, and what signals and
    telemetry hang off)."""

    SUCCESS = "success"  # ran and returned: acked with its result
    RETRY = "retry"  # failed; the next attempt is scheduled
    DEAD = "dead"  # moved to the dead-letter queue
    REVOKED = "revoked"  # cancelled without running (revoked, expired)
    RELEASED = "released"  # given back to its queue (unstarted, or its child was lost)


class OutcomeStatus(enum.StrEnum):
    """How one dispatch ended inside the child (the executor's verdict on user code)."""

    SUCCESS = "success"  # returned a JSON value
    FAILED = "failed"  # raised: retried under the task's policy
    REJECTED = "rejected"  # `Reject` or arguments that do not bind: permanent, no retry
    RETRY = "retry"  # `ctx.retry()`: retried, after its countdown if it gave one
    SKIPPED = "skipped"  # never started (warm shutdown): back to the queue uncounted


class SlotState(enum.IntEnum):
    """State of one child's heartbeat slot in shared memory."""

    EMPTY = 0  # no child in this slot
    STARTING = 1  # forked, not yet ready
    IDLE = 2  # waiting for a task
    RUNNING = 3  # running a task
    EXITING = 4  # leaving on purpose (recycle or shutdown)


class ExitCode(enum.IntEnum):
    """Process exit codes of `stem` commands (sysexits where one fits)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    UNAVAILABLE = 69  # EX_UNAVAILABLE: broker or backend cannot be reached
    SOFTWARE = 70  # EX_SOFTWARE: internal error
    CONFIG = 78  # EX_CONFIG: bad configuration
