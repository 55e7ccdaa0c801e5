"""OpenTelemetry: Envoy and the services export spans of one trace to an OTLP collector."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV, private_db_url

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace endpoint that keeps (service.name, trace id, span name).

    `attributes` maps (service.name, trace id) to the attributes of its spans, merged.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        self.attributes: dict[tuple[str, str], dict[str, Any]] = {}

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, s.trace_id.hex(), s.name) for s in scope.spans)
                for span in scope.spans:
                    merged = self.attributes.setdefault((service, span.trace_id.hex()), {})
                    merged.update({a.key: _value(a.value) for a in span.attributes})
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, port
    finally:
        server.stop(None)


def _audit_trace_id(mesh: Mesh, request_id: str) -> str:
    """Returns the trace id the audit log records for `request_id` (once metered)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        entries = httpx.get(
            f"{mesh.edge_url}/v1/usage/audit",
            params={"tenant": "admin", "page_size": 100},
            headers={"x-api-key": mesh.dev_api_key()},
            timeout=10,
        ).json()["entries"]
        for entry in entries:
            if entry["request_id"] == request_id:
                return str(entry.get("trace_id", ""))
        time.sleep(0.2)
    raise AssertionError(f"request {request_id} is not in the audit log")


def _trace_of(sink: Collector, request_id: str) -> str:
    """Returns the trace id of the edge's span of the request `request_id` (Envoy tags
    each span with its request id)."""
    return _trace_with(sink, "tokenmesh-edge", "guid:x-request-id", request_id)


def _trace_with(sink: Collector, service: str, key: str, value: str) -> str:
    """Returns the trace id of `service`'s span whose attribute `key` is `value`."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for (named, trace_id), attributes in list(sink.attributes.items()):
            if named == service and attributes.get(key) == value:
                return trace_id
        time.sleep(0.2)
    spans = [span for span in sink.spans if span[0] == service]
    raise AssertionError(f"no {service} span with {key}={value}: {spans[-20:]}")


def _wait_for_attribute(sink: Collector, service: str, key: str, trace_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        attributes = sink.attributes.get((service, trace_id), {})
        if key in attributes:
            return attributes
        time.sleep(0.2)
    return sink.attributes.get((service, trace_id), {})


def test_one_trace_spans_envoy_and_the_worker(tmp_path: Path, collector, redis_url):
    sink, port = collector
    config = MeshConfig(
        state_dir=tmp_path / "mesh",
        # A Redis database of its own: its router and workers must not meet the
        # session mesh's (they share worker ids).
        redis_url=private_db_url(redis_url, 3),
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        otlp_endpoint=f"http://127.0.0.1:{port}",
        service_env={**TEST_SERVICE_ENV, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    with Mesh(config) as mesh:
        # A client's trace context is not the edge's to trust: it picked the trace id
        # (the audit log's), joined other traces, and a `-00` one switched tracing off.
        headers = {
            "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-00",
            "tracestate": "evil=1",
            "x-api-key": mesh.dev_api_key(),
        }
        reply = httpx.post(
            f"{mesh.edge_url}/v1/models/deterministic-test:complete",
            json={"prompt": "trace me", "max_tokens": 2},
            headers=headers,
            timeout=10,
        )
        assert reply.status_code == 200
        trace_id = _trace_of(sink, reply.headers["x-request-id"])
        assert trace_id != TRACE_ID
        deadline = time.monotonic() + 15
        services: set[str] = set()
        while time.monotonic() < deadline:
            services = {service for service, trace, _ in sink.spans if trace == trace_id}
            if {"tokenmesh-edge", "tokenmesh-inference"} <= services:
                break
            time.sleep(0.2)
        assert {"tokenmesh-edge", "tokenmesh-inference"} <= services, sink.spans
        assert not [span for span in sink.spans if span[1] == TRACE_ID], sink.spans
        # The audit log names the trace the request really has.
        audited = _audit_trace_id(mesh, reply.headers["x-request-id"])
        assert audited == trace_id
        # A job item's call to a worker carries its trace: the worker's span joins
        # the item's (it was a root, unrelated to the job).
        job = httpx.post(
            f"{mesh.edge_url}/v1/jobs",
            json={"items": [{"complete": {"model": "deterministic-test", "prompt": "job"}}]},
            headers={"x-api-key": mesh.dev_api_key()},
            timeout=10,
        )
        assert job.status_code == 200, job.text
        item_trace = _trace_with(sink, "tokenmesh-jobs", "tokenmesh.job.id", job.json()["id"])
        worker_spans = _wait_for_attribute(
            sink, "tokenmesh-inference", "gen_ai.response.model", item_trace
        )
        assert worker_spans["gen_ai.request.model"] == "deterministic-test"
        # Probes and keep-alives are not requests: they were 92% of all spans.
        probes = [
            span
            for span in sink.spans
            if span[2].startswith("/grpc.health.v1.Health/") or span[2].endswith("/RenewLease")
        ]
        assert not probes, probes[:5]
        # OpenTelemetry's GenAI conventions, on the edge's span and the worker's.
        edge = _wait_for_attribute(sink, "tokenmesh-edge", "gen_ai.request.model", trace_id)
        assert edge["gen_ai.system"] == "tokenmesh"
        assert edge["gen_ai.request.model"] == "deterministic-test"
        assert edge["tokenmesh.route.model"] == "deterministic-test"
        worker = _wait_for_attribute(sink, "tokenmesh-inference", "gen_ai.response.model", trace_id)
        version = reply.headers["x-model-version"]
        assert worker["gen_ai.system"] == "tokenmesh"
        assert worker["gen_ai.operation.name"] == "text_completion"
        assert worker["gen_ai.request.model"] == "deterministic-test"
        assert worker["gen_ai.response.model"] == f"deterministic-test@{version}"
        assert worker["tokenmesh.model.version"] == version
        assert worker["gen_ai.request.max_tokens"] == 2
        assert worker["gen_ai.usage.output_tokens"] == 2
        assert worker["gen_ai.usage.input_tokens"] > 0
        assert worker["gen_ai.response.finish_reasons"] == ["length"]
        assert worker["tokenmesh.api.version"] == "v1"
        # An API key in a URL: the edge's span exported it as `http.url` (the original
        # path, query and all) for every such request. Refused, its query taken off.
        secret = mesh.dev_api_key()
        reply = httpx.post(
            f"{mesh.edge_url}/v1/auth/token?api_key={secret}",
            json={},
            timeout=10,
        )
        assert reply.status_code == 400
        url_trace = _trace_of(sink, reply.headers["x-request-id"])
        refused = _wait_for_attribute(sink, "tokenmesh-edge", "http.url", url_trace)
        assert refused["http.url"].endswith("/v1/auth/token"), refused
        # The key where its id goes: the span holds the route, the key taken out.
        reply = httpx.post(f"{mesh.edge_url}/v1/auth/keys/{secret}:revoke", timeout=10)
        assert reply.status_code == 400
        url_trace = _trace_of(sink, reply.headers["x-request-id"])
        refused = _wait_for_attribute(sink, "tokenmesh-edge", "http.url", url_trace)
        assert refused["http.url"].endswith("/v1/auth/keys/tm_REDACTED:revoke"), refused
        held = [k for k, v in sink.attributes.items() if secret in str(v)]
        assert not held, held
