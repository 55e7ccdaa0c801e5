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
URL_KEY_TRACE_ID = "5c0a3f3577b34da6a3ce929d0e0e4737"


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


def _wait_for_attribute(
    sink: Collector, service: str, key: str, trace_id: str = TRACE_ID
) -> dict[str, Any]:
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
        headers = {
            "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
            "x-api-key": mesh.dev_api_key(),
        }
        reply = httpx.post(
            f"{mesh.edge_url}/v1/models/deterministic-test:complete",
            json={"prompt": "trace me", "max_tokens": 2},
            headers=headers,
            timeout=10,
        )
        assert reply.status_code == 200
        deadline = time.monotonic() + 15
        services: set[str] = set()
        while time.monotonic() < deadline:
            services = {service for service, trace, _ in sink.spans if trace == TRACE_ID}
            if {"tokenmesh-edge", "tokenmesh-inference"} <= services:
                break
            time.sleep(0.2)
        assert {"tokenmesh-edge", "tokenmesh-inference"} <= services, sink.spans
        # OpenTelemetry's GenAI conventions, on the edge's span and the worker's.
        edge = _wait_for_attribute(sink, "tokenmesh-edge", "gen_ai.request.model")
        assert edge["gen_ai.system"] == "tokenmesh"
        assert edge["gen_ai.request.model"] == "deterministic-test"
        assert edge["tokenmesh.route.model"] == "deterministic-test"
        worker = _wait_for_attribute(sink, "tokenmesh-inference", "gen_ai.response.model")
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
            headers={"traceparent": f"00-{URL_KEY_TRACE_ID}-00f067aa0ba902b7-01"},
            timeout=10,
        )
        assert reply.status_code == 400
        refused = _wait_for_attribute(sink, "tokenmesh-edge", "http.url", URL_KEY_TRACE_ID)
        assert refused["http.url"].endswith("/v1/auth/token"), refused
        held = [k for k, v in sink.attributes.items() if secret in str(v)]
        assert not held, held
