"""Telemetry against a real OTLP/HTTP receiver: the producer's enqueue span and the
children's execution spans (separate processes) are one trace with the right parents,
a retry links to the attempt before it, the supervisor's metrics arrive from the
supervisor alone; and without an endpoint nothing imports OpenTelemetry."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance import telemetry
from appliance.config import Settings
from appliance.context import TaskContext
from appliance.errors import ConfigError
from tests.conftest import wait_until
from tests.otlp_receiver import OtlpReceiver, Received

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-value"
PRODUCER, CONSUMER = 4, 5  # Span.SpanKind in the OTLP protobuf


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def actor(receiver: OtlpReceiver, *argv: str) -> tuple[dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEM_", "OTEL_"))}
    env |= {
        "STEM_OTLP_ENDPOINT": receiver.url,
        "STEM_OTLP_HEADERS": f"x-api-key={SECRET},x-tenant=edge",
        "STEM_OTLP_METRICS_INTERVAL": "1",
        "OTEL_SERVICE_NAME": "stem-test",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.telemetry_actors", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout), result.stderr


def spans_named(received: Received, prefix: str) -> list[dict[str, Any]]:
    return [s for s in received.spans if s["name"].startswith(prefix)]


def test_enqueue_and_execution_spans_from_three_processes_are_one_trace(
    receiver: OtlpReceiver,
) -> None:
    produced, producer_log = actor(receiver, "producer")
    headers = produced["headers"]
    assert headers["stem-origin"] == "test" and headers["traceparent"].startswith("00-")
    worked, worker_log = actor(receiver, "worker", orjson.dumps(headers).decode())
    wait_until(lambda: len(receiver.snapshot().spans) >= 3, 10)
    received = receiver.snapshot()

    [enqueue] = spans_named(received, "enqueue ")
    first, retry = sorted(
        spans_named(received, "run "), key=lambda s: s["attributes"]["stem.attempt"]
    )
    assert enqueue["name"] == "enqueue email.send" and enqueue["kind"] == PRODUCER
    assert first["name"] == "run email.send" and first["kind"] == CONSUMER
    # One trace; both attempts are children of the enqueue span.
    assert enqueue["trace_id"] == first["trace_id"] == retry["trace_id"]
    assert first["parent_span_id"] == retry["parent_span_id"] == enqueue["span_id"]
    assert headers["traceparent"][:52] == f"00-{enqueue['trace_id']}-{enqueue['span_id']}"
    # The retry links to the attempt before it.
    assert retry["links"] == [(first["trace_id"], first["span_id"])]
    assert first["links"] == []
    assert worked["traceparents"][0][:52] == f"00-{first['trace_id']}-{first['span_id']}"

    assert first["attributes"] | {"stem.outcome": "failure"} == first["attributes"]
    assert {
        k: first["attributes"][k] for k in ("stem.task.id", "stem.task.name", "stem.queue")
    } == {
        "stem.task.id": "0190c0de0000700080000000000000aa",
        "stem.task.name": "email.send",
        "stem.queue": "email",
    }
    assert first["attributes"]["error.type"] == "KeyError" and first["status"] == 2  # ERROR
    assert retry["attributes"]["stem.outcome"] == "success" and retry["status"] == 0
    # Each span comes from its own process: the producer and two forked children.
    pids = [s["resource"]["process.pid"] for s in (enqueue, first, retry)]
    assert pids == [produced["pid"], *worked["children"]]
    assert [s["resource"]["stem.process"] for s in (enqueue, first, retry)] == [
        "producer", "child", "child",
    ]  # fmt: skip
    assert enqueue["resource"]["service.name"] == "stem-test"

    # Headers reach the collector and never the logs.
    assert all(h.get("x-api-key") == SECRET for h in received.headers)
    assert "x-api-key=***" in worker_log
    assert SECRET not in producer_log + worker_log


def test_metrics_arrive_from_the_supervisor_only(receiver: OtlpReceiver) -> None:
    worked, _ = actor(receiver, "worker", "{}")
    wait_until(
        lambda: any(p["name"] == "stem.child.restarts" for p in receiver.snapshot().points), 10
    )
    received = receiver.snapshot()
    # The children inherited a running export thread's reader: none of them exported.
    assert len(received.metric_requests) >= 2  # the tick before the forks, and shutdown
    assert {r["process.pid"] for r in received.metric_requests} == {worked["pid"]}
    assert {r["stem.worker"] for r in received.metric_requests} == {"edge-1:42"}

    last: dict[tuple[str, tuple[tuple[str, Any], ...]], dict[str, Any]] = {}
    for point in received.points:  # cumulative: the last export holds the totals
        last[(point["name"], tuple(sorted(point["attributes"].items())))] = point

    def value(name: str, **attributes: Any) -> Any:
        return last[(name, tuple(sorted(attributes.items())))]

    depth = {s: value("stem.queue.depth", **{"stem.queue": "email", "stem.state": s})["value"]
             for s in ("ready", "delayed", "in_flight", "dead")}  # fmt: skip
    assert depth == {"ready": 3, "delayed": 1, "in_flight": 2, "dead": 1}
    assert value("stem.pool.in_flight", **{"stem.pool": "default"})["value"] == 1
    assert value("stem.pool.concurrency", **{"stem.pool": "default"})["value"] == 2
    task = {"stem.task.name": "email.send", "stem.queue": "email"}
    assert value("stem.task.outcomes", **task, **{"stem.outcome": "retry"})["value"] == 1
    assert value("stem.task.outcomes", **task, **{"stem.outcome": "success"})["value"] == 1
    duration = value("stem.task.duration", **task, **{"stem.outcome": "success"})
    assert duration["count"] == 1 and duration["sum"] == pytest.approx(0.01)
    assert value("stem.lease.renewals")["value"] == 3
    restarts = value("stem.child.restarts", **{"stem.pool": "default", "stem.reason": "recycled"})
    assert restarts["value"] == 1


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("STEM_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=clean | env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


NO_OTEL_CODE = """
import sys
from appliance import Stem, signals, telemetry, logs
from appliance.config import load_settings
from appliance.context import TaskContext
import appliance.cli.main, appliance.worker.supervisor
Stem(broker="sqlite:///:memory:")
tel = telemetry.load(load_settings())
with tel.enqueue_span("t", "a.b", "q"):
    headers = tel.inject({})
with tel.task_span(TaskContext(id="t", name="a.b")) as span:
    span.set_outcome("success")
tel.start_metrics(worker="w")
tel.record_outcome("success", "a.b", "q", 0.1)
tel.tick(1e9); tel.setup_child(); tel.flush(); tel.shutdown()
assert headers == {} and tel.enabled is False
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""


def test_without_an_endpoint_nothing_imports_opentelemetry() -> None:
    result = run_python(NO_OTEL_CODE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


REDIS_NO_OTEL_CODE = """
import sys
from appliance import Stem
Stem(broker="redis://127.0.0.1:1/0")  # imports redis-py (no connection)
import redis.observability.metrics as metrics, redis.observability.providers as providers
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
import opentelemetry.sdk.metrics  # still importable for whoever wants it
print(metrics.OTEL_AVAILABLE, providers.OTEL_AVAILABLE)
"""


def test_on_redis_without_an_endpoint_redis_py_imports_no_opentelemetry() -> None:
    """redis-py 8 loads the OTel SDK's metrics (62 modules, ~3 MB) at `import redis`
    when the SDK is installed; we never turn its metrics on (`stores.redis.client`)."""
    result = run_python(REDIS_NO_OTEL_CODE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "False False"]


def test_an_endpoint_without_the_extra_is_a_config_error_that_says_what_to_install() -> None:
    code = """
import sys
class NoOtel:  # as if the [otel] extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoOtel())
from appliance import telemetry
from appliance.config import load_settings
from appliance.errors import ConfigError
try:
    telemetry.load(load_settings())
except ConfigError as exc:
    print(exc)
"""
    result = run_python(code, STEM_OTLP_ENDPOINT="http://127.0.0.1:4318")
    assert result.returncode == 0, result.stderr
    assert "pip install 'stem-appliance[otel]'" in result.stdout
    assert "STEM_OTLP_ENDPOINT" in result.stdout


def test_the_noop_is_what_load_gives_without_an_endpoint() -> None:
    tel = telemetry.load(Settings())
    assert tel is telemetry.NOOP and not tel.enabled
    headers = {"a": "1"}
    assert tel.inject(headers) == headers and tel.inject(headers) is not headers
    assert tel.link_retry(headers, "00-x") == headers
    with tel.task_span(TaskContext(id="t", name="n")) as span:
        assert span.traceparent is None


def test_config_describe_hides_header_values_and_url_credentials() -> None:
    config = telemetry.TelemetryConfig(
        "https://user:pw@collector.example:4318", (("authorization", "Bearer abc"),), 15.0
    )
    text = config.describe() + repr(config)
    assert "abc" not in text and "pw" not in text and "user" not in text
    assert "https://***@collector.example:4318" in text and "authorization=***" in text
    assert config.url("traces") == "https://user:pw@collector.example:4318/v1/traces"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [("s3cr3t", "entry 1 must be key=value"), ("a=1,=s3cr3t", "entry 2 must be key=value")],
)
def test_bad_headers_fail_at_start_without_showing_values(raw: str, reason: str) -> None:
    from appliance.config import load_settings

    with pytest.raises(ConfigError, match=reason) as raised:
        load_settings(env={"STEM_OTLP_HEADERS": raw})
    assert "s3cr3t" not in str(raised.value)
