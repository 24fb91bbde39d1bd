"""The `ResultBackend` port: task states, results and errors, keyed by task id.

Semantics every adapter keeps (checked by `tests/contract/`):
- `store` upserts a batch atomically; a later write for the same task id replaces the
  earlier one (states only move forward in practice because one owner writes them).
- A result whose `expires_at` has passed is gone: `get` returns None for it, and
  `purge_expired` deletes it for good.
- Any process that opened its own backend sees a stored result (waiting works across
  processes: callers poll `get`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.states import TaskState


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure as data: it crossed a process boundary, so no exception objects."""

    type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class TaskResult:
    """The stored state of one task."""

    task_id: str
    state: TaskState
    name: str = ""
    queue: str = ""
    value: Any = None  # JSON value returned by the task (SUCCESS)
    error: ErrorInfo | None = None
    attempt: int = 0
    worker: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    progress: float | None = None
    progress_data: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    expires_at: float | None = None  # epoch seconds; None keeps it until purged


class ResultBackend(Protocol):
    """Stores and serves `TaskResult`s."""

    url: str

    def store(self, results: Sequence[TaskResult]) -> None:
        """Upsert results, all or none, durably."""
        ...

    def get(self, task_id: str) -> TaskResult | None:
        """The stored result, or None if unknown or expired."""
        ...

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        """Stored, unexpired results of the ids that have one."""
        ...

    def forget(self, task_ids: Sequence[str]) -> None:
        """Delete results (DLQ replay resets a task to PENDING this way)."""
        ...

    def purge_expired(self) -> int:
        """Delete expired results. Returns how many."""
        ...

    def close(self) -> None: ...
