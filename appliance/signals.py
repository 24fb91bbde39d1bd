"""Lifecycle signals: `from appliance import signals; signals.task_success.connect(fn)`.

Every signal SPEC section 5 names is a `Signal` here, and each sends one typed, frozen
payload. docs/signals.md says in which process each fires and when (a test keeps that
table in step with this module).

Why a module-level registry, against the house rule of no globals: handlers are
connected where the app is defined (`import`-time code in the app module) and must fire
in every process that app runs in: the producer, the supervisor and every forked child.
A registry hanging off a `Stem` instance would need every hook point to be handed that
instance, and a handler connected before the `Stem` exists would have nowhere to go.
Celery and blinker keep signals global for the same reason. The registry is per process:
a fork copies it (so handlers connected in the app module fire in the children too), and
connecting in one process changes nothing in another.

Zero cost when nobody listens. `Signal.receivers` is an empty tuple while no handler is
connected (or the signal is disabled), so a hot path reads

    if signals.task_success.receivers:
        signals.task_success.send(TaskSuccess(...))

and never builds the payload. `send_lazy(lambda: TaskSuccess(...))` is the same guard in
one call, for paths that are not hot.

A raising handler is logged with its traceback on the logger `stem.signals` and never
propagates: a handler must not fail a task, kill a child or stop the supervisor.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar, overload

from appliance.errors import ConfigError

log = logging.getLogger("stem.signals")

Process = Literal["producer", "supervisor", "child", "beat"]


# --- payloads -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Payload:
    """Base of every payload. `SENDER` names the field `connect(sender=...)` filters on."""

    SENDER: ClassVar[str] = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskPayload(Payload):
    """What every task signal carries; `sender=` filters on the task name."""

    SENDER: ClassVar[str] = "name"
    task_id: str
    name: str  # the task name ("" when a message could not be decoded)
    queue: str
    attempt: int  # 0-based: 0 is the first run


@dataclass(frozen=True, slots=True, kw_only=True)
class BeforeTaskPublish(TaskPayload):
    args: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    not_before: float | None = None  # epoch seconds; None = now
    expires: float | None = None
    parent_id: str | None = None
    root_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AfterTaskPublish(TaskPayload):
    not_before: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskReceived(TaskPayload):
    worker: str
    pool: str
    deliveries: int = 1  # how many times the broker has handed this message out
    enqueued_at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskPrerun(TaskPayload):
    pid: int
    args: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskPostrun(TaskPayload):
    pid: int
    outcome: str  # "success" | "failure" | "retry" (requested by the task) | "rejected"
    runtime: float  # seconds, monotonic


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSuccess(TaskPayload):
    pid: int
    result: Any
    runtime: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFailure(TaskPayload):
    pid: int
    error_type: str
    message: str
    traceback: str
    runtime: float
    permanent: bool = False  # `Reject` or bad arguments: no retry will follow
    exception: BaseException | None = None  # the live exception (same process)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRetry(TaskPayload):
    worker: str
    error_type: str
    message: str
    countdown: float  # seconds from now until the next attempt may run
    not_before: float  # epoch seconds of the next attempt


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRevoked(TaskPayload):
    worker: str
    reason: str  # "revoked" | "expired" | "terminated"
    terminated: bool = False  # a running task was killed (`revoke --terminate`)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskTimeout(TaskPayload):
    worker: str
    kind: Literal["soft", "hard"]
    limit: float  # the limit that passed, seconds
    child_pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDeadLettered(TaskPayload):
    worker: str
    reason: str  # a `DeadLetterReason` value: exhausted, permanent, undecodable, ...
    error_type: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerPayload(Payload):
    worker: str  # the worker id (`--name`, default HOST:PID)
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInit(WorkerPayload):
    host: str
    pools: tuple[str, ...]
    queues: tuple[str, ...]
    concurrency: int  # children across all pools


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReady(WorkerInit):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerHeartbeat(WorkerPayload):
    in_flight: int
    processed: int
    failed: int
    children: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerShutdown(WorkerPayload):
    mode: Literal["warm", "cold"]
    processed: int
    failed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildPayload(Payload):
    worker: str
    pool: str
    slot: int
    child_pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildSpawned(ChildPayload):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildDied(ChildPayload):
    exit_code: int  # negative: killed by that signal number
    reason: str  # "recycled", "shutdown", or what killed it ("hard time limit", "crashed")
    expected: bool  # recycled or stopped on purpose
    task_id: str | None = None  # the task it was running, if any


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulePayload(Payload):
    """Schedule signals; `sender=` filters on the task the entry dispatches."""

    SENDER: ClassVar[str] = "task"
    entry: str  # the schedule entry's name
    task: str
    queue: str
    scheduled_for: float  # the slot's time, epoch seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleEntryDue(SchedulePayload):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleEntryDispatched(SchedulePayload):
    task_id: str
    drift: float  # seconds between the slot's time and the dispatch


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleEntryFailed(SchedulePayload):
    error_type: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPayload(Payload):
    worker: str
    command: str  # "ping", "stats", "revoke", "pause", ...
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlCommandReceived(ControlPayload):
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlCommandCompleted(ControlPayload):
    ok: bool
    duration: float  # seconds spent handling it
    error: str | None = None


# --- the signal -------------------------------------------------------------------------

P = TypeVar("P", bound=Payload)
H = TypeVar("H", bound=Callable[..., object])
Receiver = tuple[Callable[[Any], object], str | None]

# Connect, disconnect and configure replace `receivers` whole under this lock; `send`
# iterates whatever tuple it read, so it needs no lock.
_lock = threading.Lock()


class Signal(Generic[P]):
    """One named signal. Handlers get one `P` payload; what they return is ignored."""

    __slots__ = ("_connected", "enabled", "name", "payload", "process", "receivers", "when")

    def __init__(self, name: str, payload: type[P], process: Process, when: str) -> None:
        self.name = name
        self.payload = payload
        self.process: Process = process
        self.when = when
        self.enabled = True
        self._connected: list[Receiver] = []
        # The hot path's guard: empty while nothing is connected or the signal is off.
        # Strong references on purpose: a weakly held lambda or closure would vanish.
        self.receivers: tuple[Receiver, ...] = ()

    def __repr__(self) -> str:
        return f"<Signal {self.name}: {len(self._connected)} handler(s)>"

    @overload
    def connect(self, handler: H, *, sender: str | None = None) -> H: ...

    @overload
    def connect(self, handler: None = None, *, sender: str | None = None) -> Callable[[H], H]: ...

    def connect(
        self, handler: H | None = None, *, sender: str | None = None
    ) -> H | Callable[[H], H]:
        """Call `handler(payload)` each time this signal fires; returns the handler, so it
        also works as `@signal.connect` or `@signal.connect(sender="task.name")`.

        `sender` keeps only payloads about that task name (task and schedule signals).
        Connecting the same handler and sender twice connects it once.
        """
        if sender is not None and not self.payload.SENDER:
            raise TypeError(f"signal {self.name} carries no task name: connect it without sender")
        if handler is None:
            return lambda fn: self.connect(fn, sender=sender)
        with _lock:
            if (handler, sender) not in self._connected:
                self._connected.append((handler, sender))
            self._refresh()
        return handler

    def disconnect(self, handler: Callable[..., object]) -> bool:
        """Stop calling `handler` (for every sender it was connected with); True if it was."""
        with _lock:
            before = len(self._connected)
            self._connected = [r for r in self._connected if r[0] != handler]
            self._refresh()
            return len(self._connected) != before

    @contextmanager
    def connected(
        self, handler: Callable[[P], object], *, sender: str | None = None
    ) -> Iterator[None]:
        """Connect `handler` for the duration of a `with` block (tests, scoped hooks)."""
        self.connect(handler, sender=sender)
        try:
            yield
        finally:
            self.disconnect(handler)

    def send(self, payload: P) -> None:
        """Call every connected handler; a raising one is logged and skipped."""
        for handler, sender in self.receivers:
            if sender is not None and getattr(payload, payload.SENDER) != sender:
                continue
            try:
                handler(payload)
            except (Exception, SystemExit):  # sys.exit() in a handler must not end a child
                log.exception("handler %s of signal %s raised", _describe(handler), self.name)

    def send_lazy(self, build: Callable[[], P]) -> None:
        """`send(build())`, calling `build` only when a handler listens."""
        if self.receivers:
            self.send(build())

    def _refresh(self) -> None:
        self.receivers = tuple(self._connected) if self.enabled else ()


def _describe(handler: Callable[..., object]) -> str:
    module = getattr(handler, "__module__", None) or "?"
    return f"{module}.{getattr(handler, '__qualname__', repr(handler))}"


# --- the signals SPEC names ----------------------------------------------------------------

before_task_publish = Signal(
    "before_task_publish", BeforeTaskPublish, "producer",
    "in `enqueue`, after the envelope is built and before it is written to the broker",
)  # fmt: skip
after_task_publish = Signal(
    "after_task_publish", AfterTaskPublish, "producer",
    "in `enqueue`, once the broker has the message on disk",
)  # fmt: skip
task_received = Signal(
    "task_received", TaskReceived, "supervisor",
    "a claimed message was decoded and is handed to a child",
)  # fmt: skip
task_prerun = Signal(
    "task_prerun", TaskPrerun, "child",
    "just before the task function is called (the task context is set)",
)  # fmt: skip
task_postrun = Signal(
    "task_postrun", TaskPostrun, "child",
    "just after the task function returned or raised, whatever the outcome",
)  # fmt: skip
task_success = Signal(
    "task_success", TaskSuccess, "child",
    "the task function returned a JSON value",
)  # fmt: skip
task_failure = Signal(
    "task_failure", TaskFailure, "child",
    "the task function raised (not for `ctx.retry()`, which is task_retry)",
)  # fmt: skip
task_retry = Signal(
    "task_retry", TaskRetry, "supervisor",
    "a failed attempt was settled as a retry (the next attempt is stored)",
)  # fmt: skip
task_revoked = Signal(
    "task_revoked", TaskRevoked, "supervisor",
    "a revoked or expired task was settled without running, or a running one was killed",
)  # fmt: skip
task_timeout = Signal(
    "task_timeout", TaskTimeout, "supervisor",
    "soft: an outcome reports SoftTimeLimitExceeded; hard: the child is killed for it",
)  # fmt: skip
task_dead_lettered = Signal(
    "task_dead_lettered", TaskDeadLettered, "supervisor",
    "a message was moved to the dead-letter queue (any reason)",
)  # fmt: skip
worker_init = Signal(
    "worker_init", WorkerInit, "supervisor",
    "the supervisor starts, before it opens the stores or forks children",
)  # fmt: skip
worker_ready = Signal(
    "worker_ready", WorkerReady, "supervisor",
    "the children are forked and the supervisor serves (systemd READY=1)",
)  # fmt: skip
worker_heartbeat = Signal(
    "worker_heartbeat", WorkerHeartbeat, "supervisor",
    "each time the worker's heartbeat record is published to the backend",
)  # fmt: skip
worker_shutdown = Signal(
    "worker_shutdown", WorkerShutdown, "supervisor",
    "the supervisor stops, after its children are gone and before the stores close",
)  # fmt: skip
child_spawned = Signal(
    "child_spawned", ChildSpawned, "supervisor",
    "a child was forked into a pool slot",
)  # fmt: skip
child_died = Signal(
    "child_died", ChildDied, "supervisor",
    "a child was reaped, whether recycled, stopped, killed or crashed",
)  # fmt: skip
schedule_entry_due = Signal(
    "schedule_entry_due", ScheduleEntryDue, "beat",
    "an entry's slot came due and this Beat instance claimed it",
)  # fmt: skip
schedule_entry_dispatched = Signal(
    "schedule_entry_dispatched", ScheduleEntryDispatched, "beat",
    "the slot's task was enqueued",
)  # fmt: skip
schedule_entry_failed = Signal(
    "schedule_entry_failed", ScheduleEntryFailed, "beat",
    "the slot's task could not be enqueued",
)  # fmt: skip
control_command_received = Signal(
    "control_command_received", ControlCommandReceived, "supervisor",
    "a control command addressed to this worker was read from the store",
)  # fmt: skip
control_command_completed = Signal(
    "control_command_completed", ControlCommandCompleted, "supervisor",
    "the worker has handled a control command and written its reply",
)  # fmt: skip

ALL: tuple[Signal[Any], ...] = (
    before_task_publish, after_task_publish, task_received, task_prerun, task_postrun,
    task_success, task_failure, task_retry, task_revoked, task_timeout, task_dead_lettered,
    worker_init, worker_ready, worker_heartbeat, worker_shutdown, child_spawned, child_died,
    schedule_entry_due, schedule_entry_dispatched, schedule_entry_failed,
    control_command_received, control_command_completed,
)  # fmt: skip
BY_NAME: Mapping[str, Signal[Any]] = types.MappingProxyType({s.name: s for s in ALL})


# --- enable / disable -------------------------------------------------------------------------


def parse_names(value: str | Collection[str]) -> tuple[str, ...]:
    """Signal names from a comma list (or a list); ValueError names an unknown one.

    `config.py` uses this for `STEM_SIGNALS_ENABLED` / `STEM_SIGNALS_DISABLED` and their
    `[signals]` keys, so a bad name fails at start with the variable or file it came from.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown signal {unknown[0]!r}; known: {', '.join(BY_NAME)}")
    return names


def configure(enabled: Collection[str] | None = None, disabled: Collection[str] = ()) -> None:
    """Turn signals on and off: only `enabled` (None or empty: all), never `disabled`.

    Handlers stay connected to a disabled signal; it just sends nothing. The state is
    per process and inherited by forked children, like the handlers.
    """
    try:
        on = set(parse_names(enabled) if enabled else BY_NAME)
        on -= set(parse_names(disabled))
    except ValueError as exc:
        raise ConfigError("signals.configure", "signal", str(exc)) from None
    with _lock:
        for signal in ALL:
            signal.enabled = signal.name in on
            signal._refresh()
