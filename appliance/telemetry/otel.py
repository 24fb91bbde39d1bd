"""The OpenTelemetry SDK behind `Telemetry`; imported by `telemetry.load()` only.

Prefork safety. A forked child inherits its parent's providers, but not their export
threads; the SDK's own at-fork hooks restart those threads in the child, where a
periodic metric reader would then export the *supervisor's* metrics (and run its
callbacks) from every child. So:
- providers are never installed as OpenTelemetry's process globals (which can be set
  once per process, and would follow the fork); this object holds its own;
- `setup_child()` drops the inherited providers and the child makes fresh ones on first
  use (a pid check does the same if a fork forgot to call it);
- the supervisor's metrics use `_HandOffReader`: no periodic thread. The supervisor
  collects in its own loop (`tick`), so the depth and pool callbacks run on the thread
  that owns the broker connection (sqlite3 refuses calls from other threads), and a
  thread of the reader's own does the HTTP export, so a slow or unreachable collector
  never stalls the loop that enforces time limits. That thread is not restarted in
  children: they never see the supervisor's metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, MetricsData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from appliance.telemetry import (
    FOLLOWS_HEADER,
    PREVIOUS_ATTEMPT_HEADER,
    DepthSource,
    PoolSource,
    TaskSpan,
    Telemetry,
    TelemetryConfig,
)

if TYPE_CHECKING:
    from appliance.context import TaskContext

log = logging.getLogger("stem.telemetry")

_PROPAGATOR = TraceContextTextMapPropagator()
SCOPE = "stem"

# Task durations run from a millisecond to minutes; the SDK's default buckets are for
# milliseconds (0..10000) and would put every task in the first few.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # fmt: skip

# Attribute names, on spans and metrics alike.
TASK_ID, TASK_NAME, QUEUE, ATTEMPT = "stem.task.id", "stem.task.name", "stem.queue", "stem.attempt"
OUTCOME, POOL, STATE, REASON = "stem.outcome", "stem.pool", "stem.state", "stem.reason"


# Held during every export of this process; `os.fork` takes it first (see the docstring).
_EXPORTING = threading.Lock()


def _after_fork_in_child() -> None:
    global _EXPORTING
    _EXPORTING = threading.Lock()  # the parent's copy is held by the forking thread


os.register_at_fork(
    before=lambda: _EXPORTING.acquire(),
    after_in_parent=lambda: _EXPORTING.release(),
    after_in_child=_after_fork_in_child,
)


class _ForkSafeSpanExporter(SpanExporter):
    """The OTLP span exporter, holding `_EXPORTING` while it exports."""

    def __init__(self, inner: OTLPSpanExporter) -> None:
        self._inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with _EXPORTING:
            return self._inner.export(spans)

    def shutdown(self) -> None:
        self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


def _resource(role: str, worker: str | None = None) -> Resource:
    attributes: dict[str, str | int] = {
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or "stem",
        "process.pid": os.getpid(),
        "stem.process": role,  # producer | supervisor | child
    }
    if worker:
        attributes["stem.worker"] = worker
    return Resource.create(attributes)  # OTEL_RESOURCE_ATTRIBUTES are merged in


class _Span:
    """A `TaskSpan` over an SDK span."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    @property
    def traceparent(self) -> str | None:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier.get("traceparent")

    def set_outcome(self, outcome: str, error_type: str = "", message: str = "") -> None:
        self._span.set_attribute(OUTCOME, outcome)
        if error_type:
            self._span.set_attribute("error.type", error_type)
        if outcome in ("failure", "rejected"):
            self._span.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))


def _task_attributes(
    task_id: str, name: str, queue: str, attempt: int, operation: str
) -> dict[str, str | int]:
    # Ours, plus the messaging semantic conventions so generic dashboards understand.
    return {
        TASK_ID: task_id, TASK_NAME: name, QUEUE: queue, ATTEMPT: attempt,
        "messaging.system": "stem", "messaging.operation.type": operation,
        "messaging.destination.name": queue, "messaging.message.id": task_id,
    }  # fmt: skip


def _previous_attempt(headers: Mapping[str, str]) -> list[Link]:
    value = headers.get(PREVIOUS_ATTEMPT_HEADER)
    if not value:
        return []
    context = _PROPAGATOR.extract({"traceparent": value})
    span_context = trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return []
    return [Link(span_context, {"stem.link": "previous_attempt"})]


class OtelTelemetry(Telemetry):
    """Telemetry exported over OTLP/HTTP to `config.endpoint`."""

    enabled = True

    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        self._role = "producer"
        self._pid = os.getpid()
        self._tracer_provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        self._metrics: _Metrics | None = None
        self._next_collect = 0.0
        log.info("telemetry: exporting to %s", config.describe())

    # --- traces ---------------------------------------------------------------------------

    def _get_tracer(self) -> trace.Tracer:
        if self._pid != os.getpid():
            self.setup_child()  # forked without setup_child(): the same, made safe
        if self._tracer is None:
            provider = TracerProvider(resource=_resource(self._role))
            exporter = OTLPSpanExporter(
                endpoint=self.config.url("traces"), headers=dict(self.config.headers),
                timeout=self.config.export_timeout,
            )  # fmt: skip
            provider.add_span_processor(BatchSpanProcessor(_ForkSafeSpanExporter(exporter)))
            self._tracer_provider = provider
            self._tracer = provider.get_tracer(SCOPE)
        return self._tracer

    @contextlib.contextmanager
    def enqueue_span(self, task_id: str, name: str, queue: str, attempt: int = 0) -> Iterator[None]:
        attributes = _task_attributes(task_id, name, queue, attempt, "send")
        with self._get_tracer().start_as_current_span(
            f"enqueue {name}", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            yield

    def inject(self, headers: Mapping[str, str]) -> dict[str, str]:
        carrier = dict(headers)
        _PROPAGATOR.inject(carrier)
        return carrier

    @contextlib.contextmanager
    def task_span(self, ctx: TaskContext) -> Iterator[TaskSpan]:
        # The parent comes from the envelope only: the task that set this one off
        # (FOLLOWS_HEADER), else the enqueue's; an empty context when it carries none,
        # so the span never nests under whatever was current in this process.
        follows = ctx.headers.get(FOLLOWS_HEADER)
        parent = _PROPAGATOR.extract({"traceparent": follows} if follows else ctx.headers)
        attributes = _task_attributes(ctx.id, ctx.name, ctx.queue, ctx.attempt, "process")
        with self._get_tracer().start_as_current_span(
            f"run {ctx.name}", context=parent, kind=SpanKind.CONSUMER,
            links=_previous_attempt(ctx.headers), attributes=attributes,
        ) as span:  # fmt: skip
            yield _Span(span)

    def link_retry(self, headers: Mapping[str, str], traceparent: str | None) -> dict[str, str]:
        carrier = dict(headers)
        if traceparent:
            carrier[PREVIOUS_ATTEMPT_HEADER] = traceparent
        return carrier

    # --- metrics (supervisor) ---------------------------------------------------------------

    def start_metrics(
        self,
        *,
        worker: str,
        depth: DepthSource | None = None,
        pools: PoolSource | None = None,
    ) -> None:
        if self._metrics is not None:
            return
        self._role = "supervisor"
        self._metrics = _Metrics(self.config, _resource("supervisor", worker), depth, pools)
        self._next_collect = time.monotonic() + self.config.metrics_interval

    def tick(self, now: float) -> None:
        if self._metrics is None or now < self._next_collect:
            return
        self._next_collect = now + self.config.metrics_interval
        self._metrics.collect()

    def record_outcome(self, event: str, name: str, queue: str, duration: float | None) -> None:
        if self._metrics is not None:
            self._metrics.outcome(str(event), name, queue, duration)

    def record_lease_renewals(self, count: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.renewals += count

    def record_child_restart(self, pool: str, reason: str) -> None:
        if self._metrics is not None:
            key = (pool, reason)
            self._metrics.restarts[key] = self._metrics.restarts.get(key, 0) + 1

    # --- life cycle -------------------------------------------------------------------------

    def setup_child(self) -> None:
        # Not shut down: that would flush and export the parent's buffered data again.
        self._pid = os.getpid()
        self._role = "child"
        self._tracer_provider = None
        self._tracer = None
        self._metrics = None

    def flush(self, timeout: float = 2.0) -> None:
        if self._tracer_provider is not None and self._pid == os.getpid():
            self._tracer_provider.force_flush(int(timeout * 1000))

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._pid != os.getpid():
            return
        if self._metrics is not None:
            self._metrics.shutdown(timeout)
            self._metrics = None
        if self._tracer_provider is not None:
            self._tracer_provider.force_flush(int(timeout * 1000))
            self._tracer_provider.shutdown()
            self._tracer_provider = self._tracer = None


class _Metrics:
    """The supervisor's instruments. Counts are plain dict increments on the hot path
    (about 0.1 us), reported through observable counters when collected; only the
    duration histogram goes through the SDK on every outcome."""

    def __init__(
        self,
        config: TelemetryConfig,
        resource: Resource,
        depth: DepthSource | None,
        pools: PoolSource | None,
    ) -> None:
        self._depth, self._pools = depth, pools
        self.outcomes: dict[tuple[str, str, str], int] = {}
        self.restarts: dict[tuple[str, str], int] = {}
        self.renewals = 0
        exporter = OTLPMetricExporter(
            endpoint=config.url("metrics"), headers=dict(config.headers),
            timeout=config.export_timeout,
        )  # fmt: skip
        self.reader = _HandOffReader(exporter, config.export_timeout)
        self.provider = MeterProvider(
            metric_readers=[self.reader], resource=resource, shutdown_on_exit=False
        )
        meter = self.provider.get_meter(SCOPE)
        meter.create_observable_gauge(
            "stem.queue.depth", [self._observe_depth], unit="{message}",
            description="Messages per queue and state (ready, delayed, in_flight, dead)",
        )  # fmt: skip
        meter.create_observable_gauge(
            "stem.pool.in_flight", [self._observe_in_flight], unit="{task}",
            description="Tasks running or prefetched per pool",
        )  # fmt: skip
        meter.create_observable_gauge(
            "stem.pool.concurrency", [self._observe_concurrency], unit="{child}",
            description="Children per pool",
        )  # fmt: skip
        meter.create_observable_counter(
            "stem.task.outcomes", [self._observe_outcomes], unit="{attempt}",
            description="Settled attempts by task, queue and outcome",
        )  # fmt: skip
        meter.create_observable_counter(
            "stem.lease.renewals", [self._observe_renewals], unit="{lease}",
            description="Leases renewed",
        )  # fmt: skip
        meter.create_observable_counter(
            "stem.child.restarts", [self._observe_restarts], unit="{child}",
            description="Children replaced, by pool and reason",
        )  # fmt: skip
        self.duration = meter.create_histogram(
            "stem.task.duration", unit="s", description="Runtime of an attempt in its child",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip

    def outcome(self, event: str, name: str, queue: str, duration: float | None) -> None:
        key = (name, queue, event)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if duration is not None:
            self.duration.record(duration, {TASK_NAME: name, QUEUE: queue, OUTCOME: event})

    def collect(self) -> None:
        try:
            self.reader.collect(timeout_millis=self.reader.timeout * 1000)
        except Exception:  # a timeout or a failing callback: try again next interval
            log.warning("telemetry: collecting metrics failed", exc_info=True)

    def shutdown(self, timeout: float) -> None:
        self.collect()  # the last figures, on this thread like every other collection
        self.provider.shutdown(timeout_millis=timeout * 1000)

    # Callbacks: run on the thread that calls collect() (the supervisor's loop).

    def _observe_depth(self, options: CallbackOptions) -> list[Observation]:
        if self._depth is None:
            return []
        observed = []
        for row in self._depth():
            for state in ("ready", "delayed", "in_flight", "dead"):
                value = getattr(row, state)
                observed.append(Observation(value, {QUEUE: row.queue, STATE: state}))
        return observed

    def _observe_in_flight(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(p.in_flight, {POOL: p.pool}) for p in (self._pools or list)()]

    def _observe_concurrency(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(p.concurrency, {POOL: p.pool}) for p in (self._pools or list)()]

    def _observe_outcomes(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(count, {TASK_NAME: name, QUEUE: queue, OUTCOME: event})
            for (name, queue, event), count in self.outcomes.items()
        ]

    def _observe_renewals(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(self.renewals)]

    def _observe_restarts(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(count, {POOL: pool, REASON: reason})
            for (pool, reason), count in self.restarts.items()
        ]


class _HandOffReader(MetricReader):
    """Collects on the caller's thread (`collect()`); exports on a thread of its own,
    started at the first export. A collector that falls behind loses whole exports,
    never the totals: every counter here is cumulative."""

    def __init__(self, exporter: OTLPMetricExporter, timeout: float) -> None:
        super().__init__(
            preferred_temporality=exporter._preferred_temporality,
            preferred_aggregation=exporter._preferred_aggregation,
        )
        self.timeout = timeout
        self._exporter = exporter
        self._pending: queue.Queue[MetricsData | None] = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._export_forever, name="stem-metrics-export", daemon=True
            )
            self._thread.start()
        try:
            self._pending.put_nowait(metrics_data)
        except queue.Full:
            log.warning("telemetry: the collector is behind; one metrics export dropped")

    def _export_forever(self) -> None:
        while (data := self._pending.get()) is not None:
            try:
                with _EXPORTING:
                    self._exporter.export(data, timeout_millis=self.timeout * 1000)
            except Exception:  # the exporter logs its own failures; this is a bug guard
                log.exception("telemetry: exporting metrics failed")

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if self._thread is not None:
            deadline = time.monotonic() + timeout_millis / 1000
            with contextlib.suppress(queue.Full):
                self._pending.put(None, timeout=max(0.0, deadline - time.monotonic()))
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self._exporter.shutdown()
