"""Validates inference v2 requests once, at the service's edge, into domain specs.

Limits match the comments in proto/tokenmesh/inference/v2/inference_service.proto.
Every problem becomes a BadRequest field violation named by its JSON path
(`sampling.temperature`, `messages[2].role`, `metadata.team`); all are
reported at once. Rules shared with v1 (model names, stop sequences, request
ids, the sampling ranges) come from services.inference.validation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument
from services.inference import validation as v1
from services.inference.models import ModelDefaults
from services.inference.sampling import SamplingParams
from services.inference.scheduler import PRIORITY_BATCH, PRIORITY_INTERACTIVE
from services.inference.templates import (
    MAX_VARIABLE_LENGTH,
    MAX_VARIABLES,
    ROLES,
    VARIABLE_NAME_RULE,
    Message,
    is_variable_name,
)
from services.router.prompts import parse_reference
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb

MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 256
MAX_CONVERSATION_CHARS = 100_000
SEED_MODULUS = 2**64  # seeds are uint64; choice i uses (seed + i) mod 2^64

T = TypeVar("T")
GenerationRequest = pb.GenerateRequest | pb.CompleteRequest
_PRIORITIES = {inference_pb2.PRIORITY_BATCH: PRIORITY_BATCH}


@dataclass(frozen=True)
class GenerationSpec:
    """GenerationSpec is a validated Generate/Complete request.

    At most one of `prompt` and `messages` is the input (exactly one without
    a `template`, "name@version" or "name@alias", which `variables` fill in).
    `sampling` holds the request's own sampling fields (None where unset);
    `params` fills the rest from the model version's defaults.
    """

    model: str
    version: str
    prompt: str | None
    messages: tuple[Message, ...]
    n: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    max_output_tokens: int | None
    stop: tuple[str, ...]
    logprobs: bool
    top_logprobs: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    priority: int = PRIORITY_INTERACTIVE
    template: str = ""
    variables: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, request: GenerationRequest) -> GenerationSpec:
        """Returns the spec of a request; raises InvalidArgument naming every bad field."""
        validate_generation(request)
        sampling = request.sampling
        return cls(
            model=request.model,
            version=request.version,
            prompt=None if request.messages or not request.prompt else request.prompt,
            messages=tuple(Message(m.role, m.content) for m in request.messages),
            n=request.n or 1,
            temperature=sampling.temperature if sampling.HasField("temperature") else None,
            top_p=sampling.top_p if sampling.HasField("top_p") else None,
            top_k=sampling.top_k if sampling.HasField("top_k") else None,
            seed=sampling.seed if sampling.HasField("seed") else None,
            max_output_tokens=request.max_output_tokens
            if request.HasField("max_output_tokens")
            else None,
            stop=tuple(request.stop_sequences),
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            metadata=dict(request.metadata),
            request_id=request.request_id,
            priority=_PRIORITIES.get(request.priority, PRIORITY_INTERACTIVE),
            template=request.template,
            variables=dict(request.variables),
        )

    def params(self, defaults: ModelDefaults) -> SamplingParams:
        """Returns choice 0's sampling parameters, the model's defaults filled in."""
        return SamplingParams(
            max_tokens=_or(self.max_output_tokens, defaults.max_tokens),
            temperature=_or(self.temperature, defaults.temperature),
            top_p=_or(self.top_p, defaults.top_p),
            top_k=_or(self.top_k, defaults.top_k),
            seed=self.seed,
            stop=self.stop,
        )

    def choice_params(self, defaults: ModelDefaults) -> list[SamplingParams]:
        """Returns each choice's parameters: choice i draws from seed + i when seeded.

        Choice 0 draws exactly what a v1 request with the same seed draws.
        """
        params = self.params(defaults)
        if self.seed is None:
            return [params] * self.n
        return [replace(params, seed=(self.seed + i) % SEED_MODULUS) for i in range(self.n)]


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _check_input(request: GenerationRequest, out: list[FieldViolation]) -> None:
    _check_template(request, out)
    if request.prompt and request.messages:
        out.append(FieldViolation("messages", "set either prompt or messages, not both"))
    elif not (request.prompt or request.messages or request.template):
        out.append(FieldViolation("prompt", "prompt, messages or template is required"))
    if len(request.prompt) > v1.MAX_PROMPT_CHARS:
        out.append(FieldViolation("prompt", f"must be at most {v1.MAX_PROMPT_CHARS} characters"))
    _check_messages(request, out)


def _check_template(request: GenerationRequest, out: list[FieldViolation]) -> None:
    """Checks the reference's form and the variables' names and sizes; the template's own
    declarations (required, known, each one's max_length) are checked when it renders."""
    if request.template:
        try:
            parse_reference(request.template)
        except InvalidArgument as error:
            out.extend(error.violations)
    elif request.variables:
        out.append(FieldViolation("variables", "only with template"))
    if len(request.variables) > MAX_VARIABLES:
        out.append(FieldViolation("variables", f"must have at most {MAX_VARIABLES} entries"))
        return
    for name in sorted(request.variables):
        if not is_variable_name(name):
            shown = name if len(name) <= 64 else name[:64] + "..."
            out.append(FieldViolation("variables", f"{shown!r} must be {VARIABLE_NAME_RULE}"))
        elif len(request.variables[name]) > MAX_VARIABLE_LENGTH:
            out.append(
                FieldViolation(
                    f"variables.{name}", f"must be at most {MAX_VARIABLE_LENGTH} characters"
                )
            )


def _check_messages(request: GenerationRequest, out: list[FieldViolation]) -> None:
    if len(request.messages) > MAX_MESSAGES:
        out.append(FieldViolation("messages", f"must have at most {MAX_MESSAGES} entries"))
        return
    total = 0
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            out.append(FieldViolation(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}"))
        if len(message.content) > MAX_CONVERSATION_CHARS:
            out.append(
                FieldViolation(
                    f"messages[{i}].content",
                    f"must be at most {MAX_CONVERSATION_CHARS} characters",
                )
            )
        total += len(message.content)
    if total > MAX_CONVERSATION_CHARS:
        out.append(
            FieldViolation(
                "messages", f"must have at most {MAX_CONVERSATION_CHARS} characters in all"
            )
        )


def _check_sampling(request: GenerationRequest, out: list[FieldViolation]) -> None:
    sampling = request.sampling
    if sampling.HasField("temperature") and not (
        math.isfinite(sampling.temperature) and 0 <= sampling.temperature <= 2
    ):
        out.append(FieldViolation("sampling.temperature", "must be between 0 and 2"))
    if sampling.HasField("top_p") and not (
        math.isfinite(sampling.top_p) and 0 < sampling.top_p <= 1
    ):
        out.append(FieldViolation("sampling.top_p", "must be greater than 0 and at most 1"))
    if sampling.HasField("top_k") and not 0 <= sampling.top_k <= v1.MAX_TOP_K:
        out.append(FieldViolation("sampling.top_k", f"must be between 0 and {v1.MAX_TOP_K}"))
    if request.HasField("max_output_tokens") and not (
        1 <= request.max_output_tokens <= v1.MAX_TOKENS_LIMIT
    ):
        out.append(
            FieldViolation("max_output_tokens", f"must be between 1 and {v1.MAX_TOKENS_LIMIT}")
        )
    if not 0 <= request.n <= MAX_CHOICES:
        out.append(FieldViolation("n", f"must be between 1 and {MAX_CHOICES} (0 means 1)"))
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        out.append(FieldViolation("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}"))
    elif request.top_logprobs and not request.logprobs:
        out.append(FieldViolation("top_logprobs", "needs logprobs: true"))
    v1.check_stop(request.stop_sequences, out, "stop_sequences")


def check_metadata(metadata: Mapping[str, str], out: list[FieldViolation]) -> None:
    """Adds a violation per problem with a request's usage tags."""
    if len(metadata) - (contract.USER_TAG in metadata) > contract.MAX_METADATA_ENTRIES:
        out.append(
            FieldViolation(
                "metadata",
                f"must have at most {contract.MAX_METADATA_ENTRIES} entries"
                f" besides {contract.USER_TAG!r}",
            )
        )
    for key in sorted(metadata):
        if not contract.is_metadata_key(key):
            shown = key if len(key) <= 64 else key[:64] + "..."
            out.append(
                FieldViolation("metadata", f"key {shown!r} must be {contract.METADATA_KEY_RULE}")
            )
        elif len(metadata[key]) > contract.MAX_METADATA_VALUE_CHARS:
            out.append(
                FieldViolation(
                    f"metadata.{key}",
                    f"must be at most {contract.MAX_METADATA_VALUE_CHARS} characters",
                )
            )


def validate_generation(request: GenerationRequest) -> None:
    """Raises InvalidArgument unless a v2 Generate/Complete request is well-formed."""
    out: list[FieldViolation] = []
    v1.check_model(request.model, request.version, out)
    _check_input(request, out)
    _check_sampling(request, out)
    check_metadata(request.metadata, out)
    v1.check_request_id(request.request_id, out)
    if out:
        raise InvalidArgument(out)


def validate_embed(request: pb.EmbedRequest) -> None:
    """Raises InvalidArgument unless a v2 Embed request is well-formed."""
    out: list[FieldViolation] = []
    v1.check_model(request.model, request.version, out)
    if not request.inputs:
        out.append(FieldViolation("inputs", "must have at least one entry"))
    elif len(request.inputs) > v1.MAX_EMBED_INPUTS:
        out.append(FieldViolation("inputs", f"must have at most {v1.MAX_EMBED_INPUTS} entries"))
    for i, text in enumerate(request.inputs[: v1.MAX_EMBED_INPUTS]):
        if not 1 <= len(text) <= v1.MAX_EMBED_INPUT_CHARS:
            out.append(
                FieldViolation(f"inputs[{i}]", f"must be 1-{v1.MAX_EMBED_INPUT_CHARS} characters")
            )
    if request.HasField("dimensions") and request.dimensions < 1:
        out.append(FieldViolation("dimensions", "must be at least 1"))
    check_metadata(request.metadata, out)
    v1.check_request_id(request.request_id, out)
    if out:
        raise InvalidArgument(out)
