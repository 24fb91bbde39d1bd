"""The one import of redis-py, without the OpenTelemetry SDK it would load for nothing.

redis-py 8 imports its own metrics support at `import redis` and, where the
`opentelemetry-sdk` is installed (our `[otel]` extra), the SDK's metrics packages with
it: 62 modules, ~30 ms and ~3 MB in every process that uses Redis, the supervisor
included, though we never turn redis-py's metrics on (our traces and metrics are
`appliance.telemetry`'s, which imports OpenTelemetry only when an endpoint is set).
So the SDK is hidden while redis-py is imported: its own check then finds no OTel and
leaves it out. Once redis-py is in, nothing is hidden any more: `appliance.telemetry`
(or the application) imports OpenTelemetry normally. A process that imported the SDK
before us keeps its redis-py as it is.
"""

from __future__ import annotations

import sys

# The two modules redis-py's observability package tries (`observability/metrics.py`,
# `observability/providers.py`); each falls back on ImportError.
_HIDDEN = ("opentelemetry.metrics", "opentelemetry.sdk.metrics")


def _import_redis_without_otel() -> None:
    if "redis" in sys.modules:
        return
    hidden = [name for name in _HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # "import" raises ImportError
    try:
        import redis  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


_import_redis_without_otel()
