"""A real OTLP/HTTP receiver for tests: an http.server on a free port that decodes the
protobuf bodies of /v1/traces and /v1/metrics with opentelemetry-proto and keeps what
arrived, flattened into plain dicts."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class Received:
    spans: list[dict[str, Any]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)  # one per metric data point
    metric_requests: list[dict[str, Any]] = field(default_factory=list)  # resource per request
    headers: list[dict[str, str]] = field(default_factory=list)


class OtlpReceiver:
    def __init__(self) -> None:
        self.received = Received()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    receiver._traces(request, dict(self.headers))
                    reply = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    metrics = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    receiver._metrics(metrics, dict(self.headers))
                    reply = metrics_service_pb2.ExportMetricsServiceResponse()  # type: ignore[assignment]
                else:
                    self.send_error(404)
                    return
                data = reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # quiet: the tests assert on what arrived

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self) -> Received:
        with self.lock:
            r = self.received
            return Received(list(r.spans), list(r.points), list(r.metric_requests), list(r.headers))

    def _traces(
        self, request: trace_service_pb2.ExportTraceServiceRequest, headers: dict[str, str]
    ) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append({
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(), "name": span.name,
                        "kind": span.kind, "attributes": _attributes(span.attributes),
                        "links": [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        "status": span.status.code, "resource": resource,
                    })  # fmt: skip
        with self.lock:
            self.received.spans.extend(spans)
            self.received.headers.append(headers)

    def _metrics(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, headers: dict[str, str]
    ) -> None:
        points, requests = [], []
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            requests.append(resource)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    points.extend(_points(metric, resource))
        with self.lock:
            self.received.points.extend(points)
            self.received.metric_requests.extend(requests)
            self.received.headers.append(headers)


def _points(metric: Any, resource: dict[str, Any]) -> list[dict[str, Any]]:
    kind = metric.WhichOneof("data")
    out = []
    for point in getattr(metric, kind).data_points:
        row: dict[str, Any] = {"name": metric.name, "kind": kind, "resource": resource,
                               "attributes": _attributes(point.attributes)}  # fmt: skip
        if kind == "histogram":
            row["count"], row["sum"] = point.count, point.sum
        else:
            row["value"] = (
                point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
            )
        out.append(row)
    return out
