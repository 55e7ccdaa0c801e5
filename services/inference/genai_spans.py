"""OpenTelemetry GenAI semantic-convention attributes on the worker's RPC span.

The gRPC server span (services.core.telemetry) is the current span while a
request runs; these helpers add what OpenTelemetry's GenAI conventions
define (gen_ai.*): the system, the operation, the requested and the serving
model, the sampling settings, token usage and finish reasons. The edge's span
carries gen_ai.system and gen_ai.request.model (gateway.envoy_config.tracing).
Without tracing the current span is a no-op and nothing is recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import trace

from services.inference.admission import Request

if TYPE_CHECKING:
    from services.inference.v2.choices import Generation

SYSTEM = "tokenmesh"
VERSION_ATTRIBUTE = "tokenmesh.model.version"
API_VERSION_ATTRIBUTE = "tokenmesh.api.version"


def response_model(request: Request) -> str:
    """Returns the serving model as gen_ai.response.model: name@version."""
    return f"{request.model.name}@{request.model.version}"


def _common(span: trace.Span, request: Request, operation: str, requested: str) -> None:
    span.set_attributes(
        {
            "gen_ai.system": SYSTEM,
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": requested or request.model.name,
            "gen_ai.response.model": response_model(request),
            "gen_ai.response.id": request.request_id,
            VERSION_ATTRIBUTE: request.model.version,
            API_VERSION_ATTRIBUTE: request.api_version,
        }
    )


def annotate_generation(generation: Generation) -> None:
    """Records a finished generation on the current span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    spec = generation.spec
    operation = "chat" if spec.messages else "text_completion"
    _common(span, generation, operation, spec.model)
    params = generation.params[0]
    span.set_attributes(
        {
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.top_k": params.top_k,
            "gen_ai.request.choice.count": spec.n,
            "gen_ai.usage.input_tokens": generation.prompt_tokens,
            "gen_ai.usage.output_tokens": generation.sent_tokens,
            "gen_ai.response.finish_reasons": [
                c.finish_reason or "cancelled" for c in generation.choices
            ],
        }
    )
    if spec.stop:
        span.set_attribute("gen_ai.request.stop_sequences", list(spec.stop))
    if params.seed is not None:
        span.set_attribute("gen_ai.request.seed", params.seed)


def annotate_embedding(call: Request, requested: str, input_tokens: int) -> None:
    """Records an embedding request on the current span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    _common(span, call, "embeddings", requested)
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
