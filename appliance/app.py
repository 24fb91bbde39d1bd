"""`Stem`: configuration, the task registry, store wiring and enqueue. No module globals:
everything hangs off a `Stem` instance, and a decorator only registers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from appliance import signals
from appliance.batch import BatchBuilder, TemplateKey
from appliance.config import Settings, load_settings
from appliance.context import current_task
from appliance.envelope import Envelope, EnvelopeCodec, new_task_id, to_raw
from appliance.errors import NotRegistered
from appliance.observe import read_task
from appliance.ratelimit import limiter_key
from appliance.request_checks import (
    check_headers,
    expires_at,
    not_before_of,
    seconds,
    unique_guard,
    unique_key,
)  # fmt: skip
from appliance.signals import configure as configure_signals
from appliance.states import TaskState
from appliance.stores import Stores, open_stores, preload
from appliance.tasks import Task, TaskHandle, TaskHandler, TaskOptions
from appliance.telemetry import NOOP, Telemetry
from appliance.telemetry import load as load_telemetry
from appliance.units import check_name, check_priority

if TYPE_CHECKING:
    from appliance.backend.protocol import ResultBackend
    from appliance.broker.protocol import Broker
    from appliance.canvas import Signature

F = TypeVar("F", bound=Callable[..., Any])

# The most tasks one broker call stores, all or none (see `Stem.enqueue_many`).
ENQUEUE_BATCH = 5000

_ENQUEUE_OPTIONS = frozenset(
    {"args", "meta", "headers", "queue", "priority", "countdown", "eta", "expires",
     "task_id", "connection", "link", "link_error"}
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
    link: Any = None  # a Signature (or a list of them) enqueued after success
    link_error: Any = None  # a Signature (or a list of them) enqueued after final failure


@dataclass(frozen=True, slots=True)
class Lineage:
    """Who enqueues a pre-built envelope (a link, a chain step): its parent and root."""

    parent_id: str | None
    root_id: str | None


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

    def before_fork(self) -> None:
        if self._pid == os.getpid() and self._value is not None:
            self._value.before_fork()


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
        self.codec = EnvelopeCodec(self.settings.max_payload_bytes, self.settings.signing)
        # False for reads (the CLI's observe commands, the TUI): stores are opened only
        # if they exist, never created or migrated (`open_stores(create=False)`).
        self.create_stores = True
        self._stores = _PerProcess(
            lambda: open_stores(self.settings, self.codec, create=self.create_stores)
        )
        self._telemetry: Telemetry = NOOP
        self._telemetry_pid = -1
        configure_signals(self.settings.signals_enabled or None, self.settings.signals_disabled)
        preload(self.settings.broker_url, self.settings.backend_url)  # not in the first enqueue

    def configure(self, settings: Settings) -> None:
        """Replace the settings (the CLI applies flags and env this way); reopens stores."""
        self.close()
        self.settings = settings
        self.codec = EnvelopeCodec(settings.max_payload_bytes, settings.signing)
        self._telemetry_pid = -1
        configure_signals(settings.signals_enabled or None, settings.signals_disabled)
        preload(settings.broker_url, settings.backend_url)

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

    def before_fork(self) -> None:
        """Ready this process's stores for a fork() (see `Stores.before_fork`)."""
        self._stores.before_fork()

    @property
    def telemetry(self) -> Telemetry:
        """This process's telemetry (`appliance.telemetry.load`): the no-op unless
        `STEM_OTLP_ENDPOINT` is set. Made once per process (a forked child makes its own
        after `setup_child`)."""
        if self._telemetry_pid != os.getpid():
            self._telemetry = load_telemetry(self.settings)
            self._telemetry_pid = os.getpid()
        return self._telemetry

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

    def signature(
        self, name: str, args: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature:
        """A signature of the task `name` (registered here or not) with args and enqueue
        options: for `link=`, `chain`, `group` and `chord`."""
        from appliance.canvas import Signature

        return Signature(name, dict(args or {}), options, self)

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

        Options: meta, headers, queue, priority, countdown (seconds) or eta (an aware
        datetime or epoch seconds), expires (datetime, epoch, or seconds from now if below
        10**9), task_id, link / link_error (signatures enqueued after success / after final
        failure), connection (SQLite: enqueue inside the caller's open transaction).
        A unique task (`unique=True`) already enqueued returns the first task's handle.
        """
        unknown = sorted(set(options) - _ENQUEUE_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown enqueue option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(_ENQUEUE_OPTIONS - {'args'}))}"
            )
        connection = options.pop("connection", None)
        envelope = self.build_envelope(EnqueueRequest(name, args, **options))
        return self.publish([envelope], connection=connection)[0]

    def enqueue_many(
        self, requests: Iterable[EnqueueRequest | tuple[str, Mapping[str, Any]]]
    ) -> list[TaskHandle]:
        """Store many tasks, far faster than a loop of `enqueue`.

        Every request is checked before anything is stored. Up to `ENQUEUE_BATCH` (5,000)
        tasks are stored all or none; a bigger batch goes in chunks of that size, each
        all or none, in order, so no producer holds the store for long (workers keep
        settling meanwhile). If a chunk fails, the error's notes say how many tasks were
        stored before it (their handles are the first ones the call would have returned).
        Unique tasks are stored one at a time, each with its lock.

        Requests that give only a name, args, queue and priority are encoded from one
        template per distinct (name, queue, priority) and chunk (`appliance.batch`): the
        same stored bytes as one `build_envelope` each, at a fraction of the cost.
        """
        requests = list(requests)
        builder = self._batch(requests)
        if builder is None or builder.guarded:
            return self.publish([self.build_envelope(_request(r)) for r in requests])
        self._store_chunks([
            (sum(len(copies.ids) for copies in chunk), partial(self.broker.enqueue_copies, chunk))
            for chunk in builder.chunks
        ])  # fmt: skip
        return [TaskHandle(task_id, self) for task_id in builder.ids()]

    def _batch(self, requests: Sequence[EnqueueRequest | tuple[str, Any]]) -> BatchBuilder | None:
        """The requests encoded by the batch path (`appliance.batch`), or None where every
        envelope must be built, announced and encoded on its own: signing (each one is
        signed), telemetry (each gets its span) or publish signals connected."""
        if (
            self.codec.signing is not None
            or self.telemetry.enabled
            or signals.before_task_publish.receivers
            or signals.after_task_publish.receivers
        ):
            return None
        builder = BatchBuilder(
            self.codec, self.registry, self._template_envelope,
            lambda key, args: self.build_envelope(
                EnqueueRequest(key[0], args, queue=key[1], priority=key[2])
            ),
            ENQUEUE_BATCH,
        )  # fmt: skip
        for r in requests:
            key = _template_key(r)
            if key is None:
                builder.add_envelope(self.build_envelope(_request(r)))
            else:
                builder.add(key, r[1] if type(r) is tuple else r.args)  # type: ignore[union-attr]
        return builder

    def _template_envelope(self, key: TemplateKey) -> Envelope | None:
        """The envelope that the batch path copies for tasks of `key` (name, queue,
        priority): built by `build_envelope`'s own rules with empty args and a fresh id;
        None for a task that needs the full path (unique tasks: one lock each)."""
        name, queue, priority = key
        task = self._task(name)
        if task is not None and task.options.unique:
            return None
        return self._envelope(EnqueueRequest(name, queue=queue, priority=priority), task, {})

    def publish(self, envelopes: Sequence[Envelope], *, connection: Any = None) -> list[TaskHandle]:
        """Store built envelopes (`build_envelope`): the one path every enqueue takes
        (tasks, canvas members, Beat's runs go through the broker the same way). Returns
        one handle per envelope, in order: a unique task's duplicate gets the first id."""
        telemetry = self.telemetry
        if telemetry.enabled and len(envelopes) == 1 and connection is None:
            only = envelopes[0]  # the span covers the write, as a reader expects
            with telemetry.enqueue_span(only.id, only.name, only.queue, only.attempt):
                traced = replace(only, headers=telemetry.inject(only.headers))
                _before_publish(traced)
                return self._publish([traced])
        return self._publish(self.announce(envelopes), connection=connection)

    def announce(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """Envelopes about to be stored: each gets its enqueue span's trace context in
        its headers (telemetry on), and `before_task_publish` fires for each."""
        telemetry = self.telemetry
        if telemetry.enabled:
            traced = []
            for e in envelopes:
                with telemetry.enqueue_span(e.id, e.name, e.queue, e.attempt):
                    traced.append(replace(e, headers=telemetry.inject(e.headers)))
            envelopes = traced
        if signals.before_task_publish.receivers:
            for e in envelopes:
                _before_publish(e)
        return list(envelopes)

    def announced(self, envelopes: Sequence[Envelope]) -> None:
        """`after_task_publish` for envelopes the broker now holds."""
        if signals.after_task_publish.receivers:
            for e in envelopes:
                signals.after_task_publish.send(signals.AfterTaskPublish(
                    task_id=e.id, name=e.name, queue=e.queue, attempt=e.attempt,
                    not_before=e.not_before, headers=e.headers,
                ))  # fmt: skip

    def _publish(
        self, envelopes: Sequence[Envelope], *, connection: Any = None
    ) -> list[TaskHandle]:
        ids = [envelope.id for envelope in envelopes]
        stored: list[Envelope] = []
        plain: list[Envelope] = []
        for position, envelope in enumerate(envelopes):
            guard = unique_guard(envelope)
            if guard is None:
                plain.append(envelope)
                continue
            if connection is not None:
                raise TypeError(
                    "connection= cannot be used with a unique task (its lock "
                    "lives in the store and is taken with the message)"
                )
            holder = self.broker.enqueue_guarded(envelope, *guard, note_duplicate=True)
            ids[position] = holder or envelope.id
            if holder is None:
                stored.append(envelope)
        if connection is not None:
            self.broker.enqueue(plain, connection=connection)
        else:
            self._store_in_chunks(plain)
        self.announced([*stored, *plain])
        return [TaskHandle(task_id, self) for task_id in ids]

    def _store_in_chunks(self, envelopes: Sequence[Envelope]) -> None:
        if len(envelopes) <= ENQUEUE_BATCH:  # one call (every single enqueue): no notes
            self.broker.enqueue(envelopes)
            return
        self._store_chunks([
            (len(chunk), partial(self.broker.enqueue, chunk))
            for chunk in (envelopes[i : i + ENQUEUE_BATCH]
                          for i in range(0, len(envelopes), ENQUEUE_BATCH))
        ])  # fmt: skip

    @staticmethod
    def _store_chunks(chunks: Sequence[tuple[int, Callable[[], None]]]) -> None:
        """Run each chunk's store call (each all or none), in order; a failure's notes say
        how many tasks the chunks before it stored."""
        total, stored = sum(size for size, _ in chunks), 0
        for size, store in chunks:
            try:
                store()
            except Exception as exc:
                if stored:
                    exc.add_note(
                        f"{stored} of {total} tasks were stored before this failure "
                        f"(in chunks of {ENQUEUE_BATCH}); the rest were not"
                    )
                raise
            stored += size

    def build_envelope(
        self,
        request: EnqueueRequest,
        *,
        lineage: Lineage | None = None,
        flow: Mapping[str, Any] | None = None,
        expects_previous: bool = False,
    ) -> Envelope:
        """Validate a request into an envelope (options, argument names, links); the
        broker refuses non-JSON arguments and oversized payloads before storing anything.

        For a pre-built envelope that a worker enqueues later (a link, a chain's next
        step, a chord's callback): `lineage` gives its parent and root, `flow` its canvas
        bookkeeping, `expects_previous` says the handler will get `previous`, and a
        countdown counts from when the worker enqueues it."""
        task = self._task(request.name)
        args = dict(request.args or {})
        if task is not None:
            task.check_args({**args, "previous": None} if expects_previous else args)
        return self._envelope(request, task, args, lineage, flow, expects_previous)

    def _task(self, name: str) -> Task | None:
        """The registered task `name`, or None after checking the name is one."""
        task = self.registry.get(name)
        if task is None:  # a registered name was checked when it was registered
            check_name(name, "task name")
        return task

    def _envelope(
        self,
        request: EnqueueRequest,
        task: Task | None,
        args: dict[str, Any],
        lineage: Lineage | None = None,
        flow: Mapping[str, Any] | None = None,
        expects_previous: bool = False,
    ) -> Envelope:
        """`build_envelope` after the argument check: the options of the request."""
        options = task.options if task else _DEFAULT_OPTIONS
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
        if lineage is None:
            parent = current_task.get()
            lineage = Lineage(
                parent.id if parent else None, (parent.root_id or parent.id) if parent else None
            )
        headers = check_headers(request.headers)
        flow_fields = dict(flow or {})
        if expects_previous:
            flow_fields["takes_previous"] = True
        not_before = not_before_of(now, request.countdown, request.eta)
        if flow is not None and request.countdown is not None:
            flow_fields["delay"] = seconds(request.countdown, "countdown")
            not_before = None  # counted from when the worker enqueues it
        if options.unique:
            flow_fields["unique"] = [unique_key(request.name, queue, args, options),
                                     options.unique_ttl]  # fmt: skip
        envelope = Envelope(
            id=task_id,
            name=request.name,
            args=args,
            queue=queue,
            priority=priority,
            max_retries=options.max_retries,
            enqueued_at=now,
            not_before=not_before,
            expires=expires_at(now, request.expires),
            meta=dict(request.meta or {}),
            headers=headers,
            parent_id=lineage.parent_id,
            root_id=lineage.root_id,
            rate=None if options.rate_interval is None else [
                limiter_key(request.name, options.rate_limit_key, headers), options.rate_interval
            ],
        )  # fmt: skip
        links = self._links(envelope, request.link, "link")
        errbacks = self._links(envelope, request.link_error, "link_error")
        if links:
            flow_fields["link"] = links
        if errbacks:
            flow_fields["link_error"] = errbacks
        # Encoding (JSON check, size limit, signing: `EnvelopeCodec.encode`) happens
        # once, in the broker, before anything of the batch is stored.
        return replace(envelope, flow=flow_fields) if flow_fields else envelope

    def _links(self, envelope: Envelope, given: Any, what: str) -> list[dict[str, Any]]:
        """The pre-built, sealed envelopes of `link=`/`link_error=`, children of `envelope`."""
        if given is None:
            return []
        from appliance.canvas import Signature  # canvas imports this module

        signatures = list(given) if isinstance(given, list | tuple) else [given]
        built = []
        for signature in signatures:
            if not isinstance(signature, Signature):
                raise TypeError(
                    f"{what} must be a signature (task.s(...) or stem.signature(...)), "
                    f"got {type(signature).__name__}"
                )
            child = signature.build(
                self, lineage=Lineage(envelope.id, envelope.root_id or envelope.id),
                flow={}, expects_previous=True,
            )  # fmt: skip
            built.append(to_raw(self.codec.seal(child)))
        return built

    # --- lookup ----------------------------------------------------------------------

    def handle(self, task_id: str) -> TaskHandle:
        return TaskHandle(task_id, self)

    def task_state(self, task_id: str) -> TaskState:
        """The task's state by the one rule every reader uses (`states.derive_state`)."""
        return read_task(self.stores, task_id).state


_DEFAULT_OPTIONS = TaskOptions()  # for names not registered here (frozen, checked once)


def _request(given: EnqueueRequest | tuple[Any, ...]) -> EnqueueRequest:
    return given if isinstance(given, EnqueueRequest) else EnqueueRequest(*given)


def _template_key(given: EnqueueRequest | tuple[Any, ...]) -> TemplateKey | None:
    """(name, queue, priority) of a request the batch path can copy from a template:
    one that gives nothing else but args; None for any other. Values of other types
    than these take the full path too, which refuses them with its own words."""
    if type(given) is tuple:
        return (given[0], None, None) if len(given) == 2 and type(given[0]) is str else None
    if type(given) is not EnqueueRequest or not (
        given.meta is None and given.headers is None and given.countdown is None
        and given.eta is None and given.expires is None and given.task_id is None
        and given.link is None and given.link_error is None and type(given.name) is str
        and (given.queue is None or type(given.queue) is str)
        and (given.priority is None or type(given.priority) is int)
    ):  # fmt: skip
        return None
    return given.name, given.queue, given.priority


def _before_publish(e: Envelope) -> None:
    if signals.before_task_publish.receivers:
        signals.before_task_publish.send(signals.BeforeTaskPublish(
            task_id=e.id, name=e.name, queue=e.queue, attempt=e.attempt, args=e.args,
            meta=e.meta, headers=e.headers, priority=e.priority, not_before=e.not_before,
            expires=e.expires, parent_id=e.parent_id, root_id=e.root_id,
        ))  # fmt: skip
