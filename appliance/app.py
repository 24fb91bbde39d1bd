"""`Stem`: configuration, the task registry, store wiring and enqueue. No module globals:
everything hangs off a `Stem` instance, and a decorator only registers."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.config import Settings, load_settings
from appliance.context import current_task
from appliance.envelope import Envelope, EnvelopeCodec, new_task_id
from appliance.errors import NotRegistered
from appliance.observe import read_task
from appliance.states import TaskState
from appliance.stores import Stores, open_stores
from appliance.tasks import Task, TaskHandle, TaskHandler, TaskOptions
from appliance.units import MAX_SECONDS, check_name, check_priority, check_seconds

if TYPE_CHECKING:
    from appliance.backend.protocol import ResultBackend
    from appliance.broker.protocol import Broker

F = TypeVar("F", bound=Callable[..., Any])

# The most tasks one broker call stores, all or none (see `Stem.enqueue_many`).
ENQUEUE_BATCH = 5000

_ENQUEUE_OPTIONS = frozenset(
    {"args", "meta", "headers", "queue", "priority", "countdown", "eta", "expires",
     "task_id", "connection"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EnqueueRequest:
    """One item of `Stem.enqueue_many`."""

    name: str
    args: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    queue: str | None = None
    priority: int | None = None
    countdown: float | None = None
    eta: datetime | float | None = None
    expires: datetime | float | None = None
    task_id: str | None = None


class _PerProcess:
    """Stores opened lazily, and again in a forked child: connections never cross fork().

    The inherited object is dropped without being closed; closing an SQLite connection
    opened by the parent can corrupt the database ("How To Corrupt", section 2.6).
    """

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener
        self._value: Any = None
        self._pid = -1
        # Kept referenced, never closed: letting the garbage collector finalise an
        # inherited connection in the child would close it there.
        self._inherited: list[Any] = []

    def get(self) -> Any:
        if self._pid != os.getpid():
            if self._value is not None:
                self._inherited.append(self._value)
            self._value = self._opener()
            self._pid = os.getpid()
        return self._value

    def close(self) -> None:
        if self._pid == os.getpid() and self._value is not None:
            self._value.close()
        self._value, self._pid = None, -1


class Stem:
    """An application: its tasks, its broker and backend, and enqueue."""

    def __init__(
        self,
        broker: str | None = None,
        result_backend: str | None = None,
        *,
        settings: Settings | None = None,
        config_file: str | None = None,
    ) -> None:
        base = settings or load_settings(config_file)
        overrides: dict[str, Any] = {}
        if broker is not None:
            overrides["broker_url"] = broker
        if result_backend is not None:
            overrides["result_backend_url"] = result_backend
        self.settings = replace(base, **overrides)
        self.registry: dict[str, Task] = {}
        self.schedules: dict[str, Any] = {}  # name -> beat.spec.ScheduleEntry (`schedule`)
        self.codec = EnvelopeCodec(self.settings.max_payload_bytes)
        # False for reads (the CLI's observe commands, the TUI): stores are opened only
        # if they exist, never created or migrated (`open_stores(create=False)`).
        self.create_stores = True
        self._stores = _PerProcess(
            lambda: open_stores(self.settings, self.codec, create=self.create_stores)
        )

    def configure(self, settings: Settings) -> None:
        """Replace the settings (the CLI applies flags and env this way); reopens stores."""
        self.close()
        self.settings = settings
        self.codec = EnvelopeCodec(settings.max_payload_bytes)

    # --- stores ----------------------------------------------------------------------

    @property
    def stores(self) -> Stores:
        """This process's broker, backend and unit of work, opened on first use."""
        stores: Stores = self._stores.get()
        return stores

    @property
    def broker(self) -> Broker:
        return self.stores.broker

    @property
    def backend(self) -> ResultBackend:
        return self.stores.backend

    def open_stores(self, *, busy_wait: float | None = None) -> Stores:
        """A separate set of stores for a long-running owner (the supervisor), which
        closes it itself; `busy_wait` caps each SQLite wait for other writers."""
        return open_stores(self.settings, self.codec, busy_wait=busy_wait)

    def close(self) -> None:
        self._stores.close()

    # --- registration ----------------------------------------------------------------

    def task(self, name: str | None = None, **options: Any) -> Callable[[F], Task]:
        """Decorator: register `fn(ctx, **args)` as a task called `name`."""
        built = TaskOptions.build(**options)

        def register(fn: F) -> Task:
            task_name = f"{fn.__module__}.{fn.__qualname__}" if name is None else name
            return self._add(Task(self, task_name, fn, built))

        return register

    def register(self, handler: TaskHandler) -> Task:
        """Register a class-based `TaskHandler` instance."""
        if not handler.name:
            raise ValueError(f"{type(handler).__name__} needs a non-empty `name`")
        return self._add(Task(self, handler.name, handler, handler.options, takes_args_dict=True))

    def _add(self, task: Task) -> Task:
        existing = self.registry.get(task.name)
        if existing is not None and existing.fn is not task.fn:
            raise ValueError(f"a different task is already registered as {task.name!r}")
        self.registry[task.name] = task
        return task

    def schedule(self, name: str, task: str, **options: Any) -> Any:
        """Declare a Beat schedule: `every=SECONDS`, `cron="m h dom mon dow"`, `at=datetime`
        or `solar="sunset"` with `latitude`/`longitude` (exactly one), and `args`,
        `queue`, `priority`, `jitter`, `timezone`, `enabled`, `catch_up` (SPEC section 2).
        Checked now (a `ConfigError` naming the entry); Beat applies it to the store when
        it starts. Returns the `ScheduleEntry`."""
        from appliance.beat.spec import ScheduleEntry

        entry = ScheduleEntry.from_options(name, task, **options)
        known = self.schedules.get(name)
        if known is not None and known != entry:
            raise ValueError(f"a different schedule is already declared as {name!r}")
        self.schedules[name] = entry
        return entry

    def get_task(self, name: str) -> Task:
        try:
            return self.registry[name]
        except KeyError:
            raise NotRegistered(f"no task named {name!r} is registered") from None

    # --- enqueue ---------------------------------------------------------------------

    def enqueue(
        self, name: str, args: Mapping[str, Any] | None = None, **options: Any
    ) -> TaskHandle:
        """Store one task durably and return its handle.

        Options: meta, headers, queue, priority, countdown (seconds) or eta (datetime or
        epoch), expires (datetime, epoch, or seconds from now if below 10**9), task_id,
        connection (SQLite: enqueue inside the caller's open transaction).
        """
        unknown = sorted(set(options) - _ENQUEUE_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown enqueue option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(_ENQUEUE_OPTIONS - {'args'}))}"
            )
        connection = options.pop("connection", None)
        envelope = self.build_envelope(EnqueueRequest(name, args, **options))
        self.broker.enqueue([envelope], connection=connection)
        return TaskHandle(envelope.id, self)

    def enqueue_many(
        self, requests: Iterable[EnqueueRequest | tuple[str, Mapping[str, Any]]]
    ) -> list[TaskHandle]:
        """Store many tasks, far faster than a loop of `enqueue`.

        Every request is checked before anything is stored. Up to `ENQUEUE_BATCH` (5,000)
        tasks are stored all or none; a bigger batch goes in chunks of that size, each
        all or none, in order, so no producer holds the store for long (workers keep
        settling meanwhile). If a chunk fails, the error's notes say how many tasks were
        stored before it (their handles are the first ones the call would have returned).
        """
        envelopes = [
            self.build_envelope(r if isinstance(r, EnqueueRequest) else EnqueueRequest(*r))
            for r in requests
        ]
        for start in range(0, len(envelopes), ENQUEUE_BATCH):
            try:
                self.broker.enqueue(envelopes[start : start + ENQUEUE_BATCH])
            except Exception as exc:
                if start:
                    exc.add_note(
                        f"{start} of {len(envelopes)} tasks were stored before this failure "
                        f"(in chunks of {ENQUEUE_BATCH}); the rest were not"
                    )
                raise
        return [TaskHandle(e.id, self) for e in envelopes]

    def build_envelope(self, request: EnqueueRequest) -> Envelope:
        """Validate a request into an envelope (options, argument names); the broker
        refuses non-JSON arguments and oversized payloads before storing anything."""
        task = self.registry.get(request.name)
        if task is None:  # a registered name was checked when it was registered
            check_name(request.name, "task name")
        options = task.options if task else _DEFAULT_OPTIONS
        args = dict(request.args or {})
        if task is not None:
            task.check_args(args)
        # Given means used: an empty queue or task id is refused, never replaced by the
        # default (a typo must not send work to a queue nobody named).
        queue = options.queue if request.queue is None else check_name(request.queue, "queue")
        priority = (
            options.priority if request.priority is None else check_priority(request.priority)
        )
        task_id = (
            new_task_id() if request.task_id is None else check_name(request.task_id, "task id")
        )
        now = time.time()
        parent = current_task.get()
        envelope = Envelope(
            id=task_id,
            name=request.name,
            args=args,
            queue=queue,
            priority=priority,
            max_retries=options.max_retries,
            enqueued_at=now,
            not_before=_not_before(now, request.countdown, request.eta),
            expires=_expires(now, request.expires),
            meta=dict(request.meta or {}),
            headers=dict(request.headers or {}),
            parent_id=parent.id if parent else None,
            root_id=(parent.root_id or parent.id) if parent else None,
        )
        # Encoding (JSON check, size limit: `EnvelopeCodec.encode`) happens once, in the
        # broker, before anything of the batch is stored.
        return envelope

    # --- lookup ----------------------------------------------------------------------

    def handle(self, task_id: str) -> TaskHandle:
        return TaskHandle(task_id, self)

    def task_state(self, task_id: str) -> TaskState:
        """The task's state by the one rule every reader uses (`states.derive_state`)."""
        return read_task(self.stores, task_id).state


_DEFAULT_OPTIONS = TaskOptions()  # for names not registered here (frozen, checked once)


def _seconds(value: Any, what: str) -> float:
    """A countdown or relative expiry: a number of seconds in [0, ten years]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return float(check_seconds(value, what))


def _timestamp(value: datetime | float, now: float, what: str) -> float:
    """An eta or absolute expiry as epoch seconds, at most ten years from `now`."""
    if isinstance(value, datetime):
        epoch = value.timestamp()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a datetime or epoch seconds, got {value!r}")
    else:
        try:
            epoch = float(value)
        except OverflowError:  # an int past the doubles
            epoch = math.inf
    if not math.isfinite(epoch):
        raise ValueError(f"{what} must be a finite time, got {value!r}")
    if epoch - now > MAX_SECONDS:
        raise ValueError(f"{what} must be at most 10 years from now, got {value!r}")
    return epoch


def _not_before(now: float, countdown: float | None, eta: datetime | float | None) -> float | None:
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    if countdown is not None:
        return now + _seconds(countdown, "countdown")
    return _timestamp(eta, now, "eta") if eta is not None else None


def _expires(now: float, expires: datetime | float | None) -> float | None:
    if expires is None:
        return None
    if not isinstance(expires, datetime) and isinstance(expires, int | float) and expires < 1e9:
        return now + _seconds(expires, "expires")  # small numbers mean "seconds from now"
    return _timestamp(expires, now, "expires")
