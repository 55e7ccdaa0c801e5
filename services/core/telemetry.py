"""OpenTelemetry tracing, on only when an OTLP endpoint is configured."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import grpc.aio

logger = logging.getLogger(__name__)


def server_interceptors(
    service: str, otlp_endpoint: str | None
) -> list[grpc.aio.ServerInterceptor]:
    """Returns the OTel server interceptor when tracing is on, else nothing."""
    if not otlp_endpoint:
        return []
    _install_tracer_provider(service, otlp_endpoint)
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(filter_=_traced_calls())
    return [interceptor]


#: Calls that are not requests (probes, keep-alives), untraced: they were 92% of all
#: spans, each health check and lease renewal a root trace of its own.
UNTRACED_SERVICE = "grpc.health.v1.Health"
UNTRACED_METHOD = "/tokenmesh.router.v1.WorkerRegistryService/RenewLease"


def _traced_calls() -> Any:
    """Returns the instrumentation's filter: every call but health checks and renewals."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(
        filters.any_of(
            filters.service_name(UNTRACED_SERVICE), filters.full_method_name(UNTRACED_METHOD)
        )
    )


_tracing = False  # set once this process exports spans (_install_tracer_provider)


def client_interceptors() -> list[Any]:
    """Returns the interceptors of grpc.aio channels: trace context out, when this
    process traces.

    Every channel of ours takes them (services.core.identity): a call from one
    service to another carries its trace (`traceparent`), so the callee's span
    joins the caller's trace. Without them each call started a trace of its own
    (a job item's worker spans were roots, unrelated to their job).
    """
    return [TraceContextOut()] if _tracing else []


class TraceContextOut(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
):
    """TraceContextOut adds the current trace context to a call's metadata, and hands
    the call back at once.

    Not OpenTelemetry's own client interceptors: they await the whole call inside
    the interceptor, so `call.cancel()` cancelled only that wait and the callee
    ran on (a cancelled job item's worker generated to the end and metered it:
    the tenant paid for a cut call, or twice when the item ran again).
    """

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_trace_context(client_call_details), request)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_trace_context(client_call_details), request)


def _with_trace_context(details: Any) -> Any:
    """Returns the call's details with the current trace context (`traceparent`,
    `baggage`) in its metadata (the same details when there is none to send)."""
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    if not carrier:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in carrier.items():
        metadata[key] = value
    return details._replace(metadata=metadata)


def _install_tracer_provider(service: str, otlp_endpoint: str) -> None:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"tokenmesh-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    global _tracing
    _tracing = True
    logger.info("tracing to %s", otlp_endpoint)
