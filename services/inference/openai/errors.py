"""Our errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The HTTP status is the transcoder's mapping of the gRPC code (400, 401, 403,
404, 429, 500, 503, ...); `type` follows OpenAI's names for those statuses,
`code` is the error's ErrorInfo reason in lower case ("model_not_found"),
and `param` names the first bad parameter as the client sent it.

Before any output the worker aborts with the status and puts the JSON in
trailing metadata (`contract.OPENAI_ERROR_HEADER`); the edge's response-side
Lua filter (gateway/openai_edge.py) makes it the body. The header is gRPC
metadata, so it is printable ASCII: JSON with every other character escaped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.core.errors import FieldViolation, InvalidArgument, TokenmeshError
from services.inference.budget import MONTHLY_LIMIT
from services.inference.openai import shapes
from services.inference.openai.params import Renames, v2_param

# gRPC code -> OpenAI error type (what OpenAI sends with the same HTTP status).
ERROR_TYPES: Mapping[int, str] = {
    code_pb2.INVALID_ARGUMENT: "invalid_request_error",
    code_pb2.FAILED_PRECONDITION: "invalid_request_error",
    code_pb2.OUT_OF_RANGE: "invalid_request_error",
    code_pb2.NOT_FOUND: "invalid_request_error",
    code_pb2.ALREADY_EXISTS: "invalid_request_error",
    code_pb2.UNAUTHENTICATED: "invalid_request_error",  # as OpenAI types a bad key
    code_pb2.PERMISSION_DENIED: "permission_error",
    code_pb2.RESOURCE_EXHAUSTED: "rate_limit_error",
    code_pb2.UNIMPLEMENTED: "invalid_request_error",
}
SERVER_ERROR = "server_error"


# Reasons OpenAI has a code of its own for (SDK users, LangChain and LiteLLM match on
# it): a prompt its policy refused is `content_policy_violation` at OpenAI, a request
# rate refusal `rate_limit_exceeded` (what the edge's own 429 says too).
OPENAI_CODES: Mapping[str, str] = {
    "content_policy": "content_policy_violation",
    "rate_limited": "rate_limit_exceeded",
}
# A spent monthly token budget is OpenAI's `insufficient_quota` (type and code): what
# clients test to stop instead of backing off; a per-minute one stays a rate limit.
INSUFFICIENT_QUOTA = "insufficient_quota"
_MONTHLY_BUDGET = f":{MONTHLY_LIMIT}"  # the end of a monthly budget's quota subject


def code_of(reason: str) -> str | None:
    """Returns the OpenAI error `code` of an ErrorInfo reason (None: none)."""
    lowered = reason.lower()
    return OPENAI_CODES.get(lowered, lowered) or None


def _reason(status: status_pb2.Status) -> str | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return code_of(info.reason)
    return None


def _monthly_budget_spent(status: status_pb2.Status) -> bool:
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            return any(v.subject.endswith(_MONTHLY_BUDGET) for v in failure.violations)
    return False


def from_status(status: status_pb2.Status, param: str | None = None) -> shapes.Json:
    """Returns the OpenAI error object of a google.rpc.Status."""
    if status.code == code_pb2.RESOURCE_EXHAUSTED and _monthly_budget_spent(status):
        return shapes.error(status.message, INSUFFICIENT_QUOTA, param, INSUFFICIENT_QUOTA)
    kind = ERROR_TYPES.get(status.code, SERVER_ERROR)
    return shapes.error(status.message, kind, param, _reason(status))


def renamed(error: TokenmeshError, renames: Renames) -> TokenmeshError:
    """Returns `error` with v2 field names replaced by the OpenAI parameters they came from."""
    if not isinstance(error, InvalidArgument):
        return error
    violations = [
        FieldViolation(*renamed_text(v.field, v.description, renames)) for v in error.violations
    ]
    # Its ErrorInfo metadata too (a content policy's block names the policy and rule).
    return InvalidArgument(violations, reason=error.reason, metadata=error.metadata)


def renamed_text(field: str, text: str, renames: Renames) -> tuple[str, str]:
    """Returns the OpenAI parameter a v2 `field` came from, and `text` naming it instead
    of `field` (a description may name its own field: "prompt (9 tokens) +
    max_output_tokens (4000) = ..."; the client reads the parameter it sent)."""
    param = v2_param(field, renames)
    # Escaped: a client's parameter name may hold backslashes, which re.sub reads as
    # group references in a replacement (re.error: a 500).
    replacement = param.replace("\\", "\\\\")
    return param, re.sub(rf"\b{re.escape(field)}\b", replacement, text)


def from_error(error: TokenmeshError) -> shapes.Json:
    """Returns the OpenAI error object of a domain error (param: its first bad field)."""
    param = error.violations[0].field if isinstance(error, InvalidArgument) else None
    return from_status(error.to_status(), param)


def header_value(body: shapes.Json) -> str:
    """Returns the error JSON as a gRPC metadata value (printable ASCII only)."""
    return json.dumps(body, separators=(",", ":")).replace("\x7f", "\\u007f")
