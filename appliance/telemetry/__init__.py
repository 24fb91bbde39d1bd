"""OpenTelemetry traces and metrics: the API every hook point calls, and its no-op.

Activated only by `STEM_OTLP_ENDPOINT` (`[telemetry] otlp_endpoint`) with the `[otel]`
extra installed. Without either, `load()` returns the no-op `Telemetry` and nothing
imports OpenTelemetry: this module imports only the standard library and the package,
and `appliance.telemetry.otel` (the SDK-backed implementation) is imported by `load()`
alone.

Who calls what (one `Telemetry` per process, built by `load(settings)`):
- producer: `with t.enqueue_span(id, name, queue): headers = t.inject(headers)`; the
  W3C `traceparent`/`tracestate` go into the envelope's headers.
- child: `t.setup_child()` right after fork; `with t.task_span(ctx) as span: ...;
  span.set_outcome(...)` around the task function; `t.flush()` before the child exits
  or is recycled (children leave with `os._exit`, which runs no atexit hook).
- supervisor: `t.start_metrics(depth=..., pools=...)` once, `t.tick(now)` each loop
  turn, `t.record_*` as things happen, `t.shutdown()` on the way out; when it settles a
  retry, `t.link_retry(headers, outcome_traceparent)` so the next attempt's span links
  to the one before; a chain's next step or a link it enqueues gets the finished task's
  span in `FOLLOWS_HEADER`, the parent of the follow-up's execution span.

Every metric is recorded by the supervisor, which sees every outcome: children export
only spans (fewer connections, no per-child duplicate series).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit, urlunsplit

from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.config import Settings
    from appliance.context import TaskContext

# The header that carries the previous attempt's execution span to the next attempt.
PREVIOUS_ATTEMPT_HEADER = "stem-previous-attempt"
# The header that carries, to a task a finished one set off (a chain's next step, a
# link), the finished task's execution span: the parent of the follow-up's own, so a
# whole chain is one trace. The supervisor writes both, so neither is signed.
FOLLOWS_HEADER = "stem-follows"


@dataclass(frozen=True, slots=True, repr=False)
class TelemetryConfig:
    """Where to export and how often. Header values and URL credentials hold secrets:
    they never appear in `repr()` or `describe()`."""

    endpoint: str  # the collector's OTLP/HTTP base URL; /v1/traces and /v1/metrics added
    headers: tuple[tuple[str, str], ...] = ()
    metrics_interval: float = 60.0  # seconds between the supervisor's metric exports
    export_timeout: float = 5.0  # seconds per export request (retries included)

    @classmethod
    def from_settings(cls, settings: Settings) -> TelemetryConfig | None:
        if not settings.otlp_endpoint:
            return None
        return cls(settings.otlp_endpoint.rstrip("/"), settings.otlp_headers,
                   settings.otlp_metrics_interval)  # fmt: skip

    def __repr__(self) -> str:
        return f"TelemetryConfig({self.describe()})"

    def url(self, signal: str) -> str:
        return f"{self.endpoint}/v1/{signal}"

    def describe(self) -> str:
        """For logs: the endpoint without credentials, the header names only."""
        parts = urlsplit(self.endpoint)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        if parts.username or parts.password:
            netloc = f"***@{netloc}"
        safe = urlunsplit(parts._replace(netloc=netloc))
        names = ", ".join(f"{name}=***" for name, _ in self.headers) or "none"
        return f"{safe} (headers: {names}; metrics every {self.metrics_interval:g}s)"


class QueueCounts(Protocol):
    """One queue's messages by state: what the depth callback returns. The broker's
    `QueueStats` has this shape, so `depth=broker.queue_stats` needs no adapter."""

    @property
    def queue(self) -> str: ...
    @property
    def ready(self) -> int: ...
    @property
    def delayed(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def dead(self) -> int: ...


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """A `QueueCounts` of one's own (tests, a depth source that is not the broker)."""

    queue: str
    ready: int
    delayed: int
    in_flight: int
    dead: int


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """One pool's size and its children busy right now."""

    pool: str
    concurrency: int
    in_flight: int


DepthSource = Callable[[], Iterable[QueueCounts]]
PoolSource = Callable[[], Iterable[PoolLoad]]


class TaskSpan(Protocol):
    """The execution span of one attempt, as `task_span` yields it."""

    @property
    def traceparent(self) -> str | None:
        """This span as a W3C traceparent (for `link_retry`); None when disabled."""

    def set_outcome(self, outcome: str, error_type: str = "", message: str = "") -> None:
        """Record how the attempt ended: "success", "failure", "retry", "rejected"."""


class _NoSpan:
    traceparent: str | None = None

    def set_outcome(self, outcome: str, error_type: str = "", message: str = "") -> None:
        return None


_NO_SPAN = _NoSpan()


class Telemetry:
    """Telemetry switched off: every method is a cheap no-op (and imports nothing).

    `appliance.telemetry.otel.OtelTelemetry` overrides each method; hook points call
    them unconditionally, or test `enabled` to skip building their arguments.
    """

    enabled = False

    def enqueue_span(
        self, task_id: str, name: str, queue: str, attempt: int = 0
    ) -> contextlib.AbstractContextManager[None]:
        """The producer's span around building and writing one message."""
        return contextlib.nullcontext()

    def inject(self, headers: Mapping[str, str]) -> dict[str, str]:
        """`headers` plus `traceparent`/`tracestate` of the current span, if any."""
        return dict(headers)

    def task_span(self, ctx: TaskContext) -> contextlib.AbstractContextManager[TaskSpan]:
        """The child's execution span, a child of the enqueue span in `ctx.headers`."""
        return contextlib.nullcontext(_NO_SPAN)

    def link_retry(self, headers: Mapping[str, str], traceparent: str | None) -> dict[str, str]:
        """The next attempt's headers, carrying this attempt's span to link to."""
        return dict(headers)

    def start_metrics(
        self,
        *,
        worker: str,
        depth: DepthSource | None = None,
        pools: PoolSource | None = None,
    ) -> None:
        """Supervisor only: create the meters; `depth` and `pools` are called on the
        caller's thread, from `tick`, once per export interval."""

    def tick(self, now: float) -> None:
        """Supervisor loop: collect and hand off metrics when the interval has passed
        (`now` from time.monotonic())."""

    def record_outcome(self, event: str, name: str, queue: str, duration: float | None) -> None:
        """One settled attempt: `event` is success, failure, retry, dead, revoked or
        released; `duration` the attempt's runtime in seconds, when it ran."""

    def record_lease_renewals(self, count: int = 1) -> None:
        """Leases renewed (the supervisor renews in batches)."""

    def record_child_restart(self, pool: str, reason: str) -> None:
        """A child was replaced; `reason` such as recycled, crashed, killed."""

    def setup_child(self) -> None:
        """In a child right after fork: forget the parent's providers (their export
        threads did not survive the fork); new ones are made on first use."""

    def flush(self, timeout: float = 2.0) -> None:
        """Export what is buffered, waiting at most `timeout` seconds (a child calls it
        before it exits or is recycled)."""

    def shutdown(self, timeout: float = 5.0) -> None:
        """Final metric export and flush, then stop the exporters."""


NOOP = Telemetry()


def load(settings: Settings) -> Telemetry:
    """The telemetry `settings` ask for: the no-op unless `otlp_endpoint` is set.

    An endpoint without the `[otel]` extra installed is a `ConfigError` at start.
    """
    config = TelemetryConfig.from_settings(settings)
    if config is None:
        return NOOP
    try:
        from appliance.telemetry.otel import OtelTelemetry
    except ImportError as exc:
        raise ConfigError(
            "STEM_OTLP_ENDPOINT or [telemetry]", "otlp_endpoint",
            f"OpenTelemetry is not installed ({exc.name}): pip install 'stem-appliance[otel]'"
            " or unset STEM_OTLP_ENDPOINT",
        ) from exc  # fmt: skip
    return OtelTelemetry(config)
