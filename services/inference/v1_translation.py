"""tokenmesh.inference.v1 as a translation onto v2: requests up, responses and errors down.

v2 is the one implementation of inference (services.inference.v2.servicer);
the v1 servicer validates a v1 request with v1's own rules, translates it
into the v2 request that means the same, and translates each v2 answer back
into the v1 message a v1 client has always received. These functions are
pure: protobuf in, protobuf out.

What v1 has that v2 does not, mapped explicitly here:

- Flat sampling fields (`max_tokens`, `temperature`, `top_p`, `top_k`,
  `seed`, `stop`) become v2's `sampling`, `max_output_tokens` and
  `stop_sequences`; v2 errors naming those are renamed back (`v1_error`), so
  that a v1 client reads the field it sent (e.g. the context-length error).
- `GenerateResponse.index` (the message's position in the stream) is not in
  v2 (which numbers choices): the v1 servicer counts messages.
- `finish_reason` is a lower-case string in v1 ("stop", "length", ...), an enum
  in v2.
- An error inside a stream is v1's `StreamError` (code name, message,
  reason) in the final message, where v2 carries a google.rpc.Status.
- Usage is `TokenUsage` (no cached prompt tokens), timing has three fields,
  embeddings are float values only (v1 cannot ask for base64 or truncation).

A v1 request is one choice, no logprobs, no template, no metadata: choice 0 of
a v2 request draws exactly what v1 drew for the same seed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2

from services.core.errors import FieldViolation, InvalidArgument, TokenmeshError
from services.inference.surface import ApiSurface
from services.inference.v2.servicer import FINISH_REASONS
from tokenmesh.inference.v1 import inference_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2 as v1_pb
from tokenmesh.inference.v2 import inference_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.type.v1 import types_pb2

V1_SURFACE = ApiSurface(
    api_version="v1",
    service=v1_pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    # v1 responses have no confidence or logprobs: computing every token's
    # log-probability for them would only cost a softmax per token.
    token_logprobs=False,
)
# v1 spells finish reasons as the lower-case names v2's enum was made from.
FINISH_REASON_NAMES: Mapping[int, str] = {
    **{number: name for name, number in FINISH_REASONS.items()},
    v2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}
# v2 request fields (as errors name them) and the v1 fields they came from.
V1_FIELD_NAMES: Mapping[str, str] = {
    "max_output_tokens": "max_tokens",
    "stop_sequences": "stop",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.seed": "seed",
}
_V2_FIELD = re.compile(
    r"(?<![\w.])(" + "|".join(re.escape(name) for name in V1_FIELD_NAMES) + r")(?![\w.])"
)
# The same numbers in both versions; spelled out so that a new v2 value cannot leak.
_PRIORITIES: Mapping[int, int] = {
    v1.PRIORITY_UNSPECIFIED: v2.PRIORITY_UNSPECIFIED,
    v1.PRIORITY_INTERACTIVE: v2.PRIORITY_INTERACTIVE,
    v1.PRIORITY_BATCH: v2.PRIORITY_BATCH,
}
_MODEL_KINDS: Mapping[int, int] = {
    v2.MODEL_KIND_UNSPECIFIED: v1.MODEL_KIND_UNSPECIFIED,
    v2.MODEL_KIND_GENERATIVE: v1.MODEL_KIND_GENERATIVE,
    v2.MODEL_KIND_EMBEDDING: v1.MODEL_KIND_EMBEDDING,
}
_VERSION_STATES: Mapping[int, int] = {
    v2.MODEL_VERSION_STATE_UNSPECIFIED: v1.MODEL_VERSION_STATE_UNSPECIFIED,
    v2.MODEL_VERSION_STATE_LOADING: v1.MODEL_VERSION_STATE_LOADING,
    v2.MODEL_VERSION_STATE_READY: v1.MODEL_VERSION_STATE_READY,
    v2.MODEL_VERSION_STATE_UNLOADING: v1.MODEL_VERSION_STATE_UNLOADING,
    v2.MODEL_VERSION_STATE_FAILED: v1.MODEL_VERSION_STATE_FAILED,
}
_CODE_NAMES: Mapping[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}

V1GenerationRequest = v1_pb.GenerateRequest | v1_pb.CompleteRequest


# --- requests: v1 -> v2 ------------------------------------------------------


def sampling(request: V1GenerationRequest) -> v2.SamplingParams:
    """Returns v1's flat sampling fields as v2's SamplingParams (unset stays unset)."""
    params = v2.SamplingParams()
    for name in ("temperature", "top_p", "top_k", "seed"):
        if request.HasField(name):
            setattr(params, name, getattr(request, name))
    return params


def _generation_fields(request: V1GenerationRequest) -> dict[str, object]:
    fields: dict[str, object] = dict(
        model=request.model,
        version=request.version,
        prompt=request.prompt,
        n=1,
        sampling=sampling(request),
        stop_sequences=list(request.stop),
        request_id=request.request_id,
        priority=_PRIORITIES.get(request.priority, v2.PRIORITY_UNSPECIFIED),
    )
    if request.HasField("max_tokens"):
        fields["max_output_tokens"] = request.max_tokens
    return fields


def generate_request(request: v1_pb.GenerateRequest) -> v2_pb.GenerateRequest:
    """Returns the v2 Generate request that means the same as a v1 one."""
    return v2_pb.GenerateRequest(**_generation_fields(request))  # type: ignore[arg-type]


def complete_request(request: v1_pb.CompleteRequest) -> v2_pb.CompleteRequest:
    """Returns the v2 Complete request that means the same as a v1 one."""
    return v2_pb.CompleteRequest(**_generation_fields(request))  # type: ignore[arg-type]


def embed_request(request: v1_pb.EmbedRequest) -> v2_pb.EmbedRequest:
    """Returns the v2 Embed request of a v1 one: float values, over-long inputs refused."""
    return v2_pb.EmbedRequest(
        model=request.model,
        version=request.version,
        inputs=list(request.inputs),
        encoding=v2.EMBEDDING_ENCODING_FLOAT,
        truncate=v2.TRUNCATION_NONE,
        request_id=request.request_id,
    )


def list_models_request(request: v1_pb.ListModelsRequest) -> v2_pb.ListModelsRequest:
    """Returns the v2 ListModels request of a v1 one."""
    return v2_pb.ListModelsRequest(page_size=request.page_size, page_token=request.page_token)


def get_model_request(request: v1_pb.GetModelRequest) -> v2_pb.GetModelRequest:
    """Returns the v2 GetModel request of a v1 one."""
    return v2_pb.GetModelRequest(model=request.model)


# --- responses: v2 -> v1 -----------------------------------------------------


def finish_reason(reason: int) -> str:
    """Returns v1's finish reason string for v2's enum ("" when unspecified)."""
    return FINISH_REASON_NAMES.get(reason, "")


def usage(value: v2.Usage) -> types_pb2.TokenUsage:
    """Returns v2 usage as v1's TokenUsage (cached prompt tokens are part of the prompt)."""
    return types_pb2.TokenUsage(
        prompt_tokens=value.prompt_tokens,
        completion_tokens=value.completion_tokens,
        total_tokens=value.total_tokens,
    )


def timing(value: v2.Timing) -> v1.Timing:
    """Returns the three timings v1 reports."""
    return v1.Timing(
        queue_ms=value.queue_ms,
        time_to_first_token_ms=value.time_to_first_token_ms,
        total_ms=value.total_ms,
    )


def stream_error(status: status_pb2.Status) -> v1.StreamError:
    """Returns v1's in-band StreamError for v2's google.rpc.Status.

    v1 names the code (UNAVAILABLE) where the status has its number, and carries
    the ErrorInfo reason beside the message.
    """
    reason = ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            break
    return v1.StreamError(
        code=_CODE_NAMES.get(status.code, "UNKNOWN"), message=status.message, reason=reason
    )


def generate_response(message: v2_pb.GenerateResponse, index: int) -> v1_pb.GenerateResponse:
    """Returns a v2 stream message as the v1 message at position `index` of the stream.

    Only the final message (the one with a finish reason) carries usage, model,
    timing and any error, as in v1.
    """
    out = v1_pb.GenerateResponse(
        index=index,
        text=message.text,
        token_ids=message.token_ids,
        request_id=message.request_id,
    )
    if message.HasField("finish_reason"):
        out.finish_reason = finish_reason(message.finish_reason)
        out.usage.CopyFrom(usage(message.usage))
        out.model.CopyFrom(message.model)
        out.timing.CopyFrom(timing(message.timing))
        if message.HasField("error"):
            out.error.CopyFrom(stream_error(message.error))
    return out


def complete_response(response: v2_pb.CompleteResponse) -> v1_pb.CompleteResponse:
    """Returns a one-choice v2 Complete response as v1's."""
    (choice,) = response.choices
    return v1_pb.CompleteResponse(
        text=choice.text,
        token_ids=choice.token_ids,
        finish_reason=finish_reason(choice.finish_reason),
        usage=usage(response.usage),
        model=response.model,
        timing=timing(choice.timing),
        request_id=response.request_id,
    )


def embed_response(response: v2_pb.EmbedResponse) -> v1_pb.EmbedResponse:
    """Returns v2 embeddings (float values) as v1's."""
    return v1_pb.EmbedResponse(
        embeddings=[v1.Embedding(index=e.index, values=e.values) for e in response.embeddings],
        model=response.model,
        usage=usage(response.usage),
        request_id=response.request_id,
    )


def model(value: v2.Model) -> v1.Model:
    """Returns a v2 model as v1's (v2's prices and chat templates have no v1 field)."""
    return v1.Model(
        name=value.name,
        kind=_MODEL_KINDS.get(value.kind, v1.MODEL_KIND_UNSPECIFIED),  # type: ignore[arg-type]
        default_version=value.default_version,
        description=value.description,
        versions=[
            v1.ModelVersion(
                version=v.version,
                state=_VERSION_STATES.get(  # type: ignore[arg-type]
                    v.state, v1.MODEL_VERSION_STATE_UNSPECIFIED
                ),
                engine=v.engine,
                context_length=v.context_length,
                max_tokens_default=v.max_output_tokens_default,
                embedding_dimensions=v.embedding_dimensions,
                message=v.message,
            )
            for v in value.versions
        ],
    )


def list_models_response(response: v2_pb.ListModelsResponse) -> v1_pb.ListModelsResponse:
    """Returns a v2 page of models as v1's."""
    return v1_pb.ListModelsResponse(
        models=[model(m) for m in response.models], next_page_token=response.next_page_token
    )


def get_model_response(response: v2_pb.GetModelResponse) -> v1_pb.GetModelResponse:
    """Returns a v2 model answer as v1's."""
    return v1_pb.GetModelResponse(model=model(response.model))


# --- errors: v2 -> v1 --------------------------------------------------------


def v1_field(field: str) -> str:
    """Returns the v1 name of a v2 field path (`stop_sequences[1]` -> `stop[1]`)."""
    return _V2_FIELD.sub(lambda match: V1_FIELD_NAMES[match.group(1)], field)


def v1_error(error: TokenmeshError) -> TokenmeshError:
    """Returns `error` as a v1 client should read it: v2 field names become v1's.

    Only InvalidArgument names fields; its message is rebuilt from the renamed
    violations (exactly as v1 built it), with the same reason. Any other error
    is the same in both versions.
    """
    if not isinstance(error, InvalidArgument):
        return error
    violations = [
        FieldViolation(v1_field(v.field), v1_field(v.description)) for v in error.violations
    ]
    if violations == error.violations:
        return error
    return InvalidArgument(violations, reason=error.reason, metadata=error.metadata)
