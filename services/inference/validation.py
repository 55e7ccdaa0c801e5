"""Validates InferenceService requests once, at the service's edge.

Limits match the comments in proto/tokenmesh/inference/v1/inference_service.proto.
Every problem becomes a BadRequest field violation; all are reported at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument
from services.inference.models import ModelDefaults
from services.inference.sampling import SamplingParams
from tokenmesh.inference.v1 import inference_service_pb2 as pb

MAX_PROMPT_CHARS = 100_000
MAX_TOKENS_LIMIT = 8192
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_TOP_K = 1000
MAX_EMBED_INPUTS = 256
MAX_EMBED_INPUT_CHARS = 20_000
MAX_PAGE_SIZE = 1000

GenerationRequest = pb.GenerateRequest | pb.CompleteRequest


def check_model(model: str, version: str, out: list[FieldViolation]) -> None:
    """Adds a violation per problem with a request's model and version."""
    if not model:
        out.append(FieldViolation("model", "is required"))
    elif not contract.is_model_name(model):
        out.append(FieldViolation("model", f"must be {contract.MODEL_NAME_RULE}"))
    if version and not contract.is_model_version(version):
        out.append(FieldViolation("version", f"must be {contract.MODEL_VERSION_RULE}"))


def check_request_id(request_id: str, out: list[FieldViolation]) -> None:
    """Adds a violation when a request id breaks the contract's rule."""
    if request_id and not contract.is_request_id(request_id):
        out.append(FieldViolation("request_id", f"must be {contract.REQUEST_ID_RULE}"))


def _check_sampling(request: GenerationRequest, out: list[FieldViolation]) -> None:
    if request.HasField("max_tokens") and not 1 <= request.max_tokens <= MAX_TOKENS_LIMIT:
        out.append(FieldViolation("max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}"))
    if request.HasField("temperature") and not (
        math.isfinite(request.temperature) and 0 <= request.temperature <= 2
    ):
        out.append(FieldViolation("temperature", "must be between 0 and 2"))
    if request.HasField("top_p") and not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
        out.append(FieldViolation("top_p", "must be greater than 0 and at most 1"))
    if request.HasField("top_k") and not 0 <= request.top_k <= MAX_TOP_K:
        out.append(FieldViolation("top_k", f"must be between 0 and {MAX_TOP_K}"))
    check_stop(request.stop, out)


def check_stop(stop: Sequence[str], out: list[FieldViolation], field: str = "stop") -> None:
    """Adds a violation per problem with the stop sequences in `field`."""
    if len(stop) > MAX_STOP_SEQUENCES:
        out.append(FieldViolation(field, f"must have at most {MAX_STOP_SEQUENCES} entries"))
    for i, sequence in enumerate(stop):
        if not 1 <= len(sequence) <= MAX_STOP_CHARS:
            out.append(FieldViolation(f"{field}[{i}]", f"must be 1-{MAX_STOP_CHARS} characters"))


def validate_generation(request: GenerationRequest) -> None:
    """Raises InvalidArgument unless a Generate/Complete request is well-formed."""
    out: list[FieldViolation] = []
    check_model(request.model, request.version, out)
    if not request.prompt:
        out.append(FieldViolation("prompt", "is required"))
    elif len(request.prompt) > MAX_PROMPT_CHARS:
        out.append(FieldViolation("prompt", f"must be at most {MAX_PROMPT_CHARS} characters"))
    _check_sampling(request, out)
    check_request_id(request.request_id, out)
    if out:
        raise InvalidArgument(out)


def validate_embed(request: pb.EmbedRequest) -> None:
    """Raises InvalidArgument unless an Embed request is well-formed."""
    out: list[FieldViolation] = []
    check_model(request.model, request.version, out)
    if not request.inputs:
        out.append(FieldViolation("inputs", "must have at least one entry"))
    elif len(request.inputs) > MAX_EMBED_INPUTS:
        out.append(FieldViolation("inputs", f"must have at most {MAX_EMBED_INPUTS} entries"))
    for i, text in enumerate(request.inputs[:MAX_EMBED_INPUTS]):
        if not 1 <= len(text) <= MAX_EMBED_INPUT_CHARS:
            out.append(
                FieldViolation(f"inputs[{i}]", f"must be 1-{MAX_EMBED_INPUT_CHARS} characters")
            )
    check_request_id(request.request_id, out)
    if out:
        raise InvalidArgument(out)


def validate_model_name(model: str) -> None:
    """Raises InvalidArgument unless `model` is a well-formed model name."""
    out: list[FieldViolation] = []
    check_model(model, "", out)
    if out:
        raise InvalidArgument(out)


def validate_model_version(model: str, version: str) -> None:
    """Raises InvalidArgument unless `model` and `version` are both set and well-formed.

    Both become path segments of the model repository (LoadModel, UnloadModel),
    so "..", "/", NUL and a trailing newline are refused here, at the edge.
    """
    out: list[FieldViolation] = []
    check_model(model, version, out)
    if not version:
        out.append(FieldViolation("version", "is required"))
    if out:
        raise InvalidArgument(out)


def validate_page_size(page_size: int) -> int:
    """Returns the effective page size; raises InvalidArgument when out of range."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            [FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")]
        )
    return page_size or 100


def sampling_params(request: GenerationRequest, defaults: ModelDefaults) -> SamplingParams:
    """Returns the request's sampling parameters with the model's defaults filled in."""
    return SamplingParams(
        max_tokens=request.max_tokens if request.HasField("max_tokens") else defaults.max_tokens,
        temperature=request.temperature
        if request.HasField("temperature")
        else defaults.temperature,
        top_p=request.top_p if request.HasField("top_p") else defaults.top_p,
        top_k=request.top_k if request.HasField("top_k") else defaults.top_k,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    )


def check_context(
    prompt_tokens: int, max_tokens: int, context_length: int, field: str = "max_tokens"
) -> None:
    """Raises InvalidArgument when prompt + max_tokens exceed the model's context.

    `field` names the request's max-tokens field (v2 calls it max_output_tokens).
    """
    if prompt_tokens + max_tokens > context_length:
        raise InvalidArgument(
            [
                FieldViolation(
                    field,
                    f"prompt ({prompt_tokens} tokens) + {field} ({max_tokens}) = "
                    f"{prompt_tokens + max_tokens} exceeds the model's context of "
                    f"{context_length} tokens",
                )
            ],
            reason="CONTEXT_LENGTH_EXCEEDED",
        )
