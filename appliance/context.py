"""`TaskContext`: what a running task knows about itself and can ask of its worker."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from appliance.errors import Retry


class TaskRuntime(Protocol):
    """The channel from a running task to its supervisor (shared memory + pipe)."""

    def beat(self) -> None: ...

    def request_lease(self, seconds: float) -> None: ...

    def report_progress(self, percent: float, data: Any) -> None: ...


class _Detached:
    """Runtime for a context used outside a worker (tests, direct calls): no-ops."""

    def beat(self) -> None:
        return None

    def request_lease(self, seconds: float) -> None:
        return None

    def report_progress(self, percent: float, data: Any) -> None:
        return None


@dataclass
class TaskContext:
    """Handed to every task as its first argument."""

    id: str
    name: str
    attempt: int = 0
    args: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    queue: str = "default"
    root_id: str | None = None
    parent_id: str | None = None  # the task that enqueued this one (inside a task, links)
    runtime: TaskRuntime = field(default_factory=_Detached, repr=False)
    last_progress: float | None = None

    def heartbeat(self) -> None:
        """Say the task is alive: renews its lease and resets the silence timer."""
        self.runtime.beat()

    def extend_lease(self, seconds: float) -> None:
        """Ask for the lease to run at least `seconds` from now."""
        if seconds <= 0:
            raise ValueError("extend_lease needs a positive number of seconds")
        self.runtime.request_lease(seconds)

    def progress(self, percent: float, data: Any = None) -> None:
        """Report progress (0-100) and optional JSON data; also counts as a heartbeat."""
        if not 0 <= percent <= 100:
            raise ValueError(f"progress percent must be within 0..100, got {percent}")
        self.last_progress = float(percent)
        self.runtime.report_progress(float(percent), data)

    def retry(self, countdown: float | None = None, exc: BaseException | None = None) -> NoReturn:
        """End this attempt and schedule the next, after `countdown` seconds if given."""
        raise Retry(countdown=countdown, exc=exc)


# The task running in this process (a child runs one at a time), so that a task
# enqueued from inside a task records its parent and root.
current_task: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "stem_current_task", default=None
)
