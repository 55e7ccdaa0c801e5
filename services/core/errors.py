"""Domain errors and their mapping to gRPC status with google.rpc details.

Services raise these; one server interceptor (`services.core.interceptors`)
turns them into a status with details. Anything else becomes INTERNAL with a
generic message, and its traceback is logged server-side only.

Exception tree::

    TokenmeshError                 INTERNAL
    ├── InvalidArgument            INVALID_ARGUMENT   + BadRequest
    ├── NotFound                   NOT_FOUND
    ├── AlreadyExists              ALREADY_EXISTS
    ├── FailedPrecondition         FAILED_PRECONDITION
    ├── Unauthenticated            UNAUTHENTICATED
    ├── PermissionDenied           PERMISSION_DENIED
    ├── ResourceExhausted          RESOURCE_EXHAUSTED + QuotaFailure, RetryInfo
    ├── Unavailable                UNAVAILABLE        + RetryInfo
    ├── DeadlineExceeded           DEADLINE_EXCEEDED
    ├── Cancelled                  CANCELLED
    └── Unimplemented              UNIMPLEMENTED
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "tokenmesh.dev"
# The longest message or field description sent to a client. Messages often
# quote a request's value; an unbounded one (a 70 KB version name) made the
# status trailers too large for Envoy, which answered 502 instead.
MAX_TEXT_CHARS = 1024


def bounded(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Returns `text`, cut to `limit` characters (ending in "...") when longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class FieldViolation:
    """FieldViolation names a request field and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """QuotaViolation names an exhausted quota."""

    subject: str
    description: str


class TokenmeshError(Exception):
    """TokenmeshError is the base of all errors a client may see.

    Args:
        message: client-safe text; it is sent to the caller as-is.
        reason: UPPER_SNAKE ErrorInfo reason; defaults to the class's.
        metadata: ErrorInfo metadata (client-safe strings only).
    """

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[Message]:
        """Returns the google.rpc detail messages (ErrorInfo, BadRequest, ...) for this error."""
        return [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
            )
        ]

    def to_status(self) -> status_pb2.Status:
        """Builds the google.rpc.Status sent to the client."""
        details = []
        for detail in self.details():
            packed = any_pb2.Any()
            packed.Pack(detail)
            details.append(packed)
        # Every grpc.StatusCode carries its number (google.rpc.Code's), whatever the code.
        code = int(self.code.value[0])
        return status_pb2.Status(code=code, message=self.message, details=details)

    def status_details_bin(self) -> str:
        """Returns the `grpc-status-details-bin` value of this error as an HTTP header
        (base64): what a proxy that answers for a gRPC service (Envoy's local replies,
        ext_authz and rate-limit refusals) sends so that its callers read the same
        google.rpc details a service's own error carries."""
        return base64.b64encode(self.to_status().SerializeToString()).decode("ascii")


# Field violations reported per error (the rest are counted): a body with thousands
# of bad fields made an error status too large for trailers.
MAX_VIOLATIONS = 20


class InvalidArgument(TokenmeshError):
    """InvalidArgument reports bad request fields, each as a field violation."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one violation")
        # 20,000 of them made a 750 KB status: Envoy answered 502. (Up to one more
        # passes as it is: an error re-raised from a capped one's violations keeps
        # its count entry.)
        more = len(violations) - MAX_VIOLATIONS if len(violations) > MAX_VIOLATIONS + 1 else 0
        violations = [
            FieldViolation(bounded(v.field, 256), bounded(v.description))
            for v in (violations[:MAX_VIOLATIONS] if more else violations)
        ]
        if more:
            violations.append(FieldViolation("request", f"and {more} more problems"))
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = violations

    def details(self) -> list[Message]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        return [*super().details(), bad_request]


class NotFound(TokenmeshError):
    """NotFound reports a missing resource (with a ResourceInfo detail when `resource_type`
    names what kind of resource is missing)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        resource_type: str = "",
        resource_name: str = "",
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.resource_type = resource_type
        self.resource_name = bounded(resource_name, 256)

    def details(self) -> list[Message]:
        if not self.resource_type:
            return super().details()
        resource = error_details_pb2.ResourceInfo(
            resource_type=self.resource_type,
            resource_name=self.resource_name,
            description=self.message,
        )
        return [*super().details(), resource]


class AlreadyExists(TokenmeshError):
    """AlreadyExists reports a resource that exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(TokenmeshError):
    """FailedPrecondition reports a request the current state cannot serve."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unauthenticated(TokenmeshError):
    """Unauthenticated reports missing or bad credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(TokenmeshError):
    """PermissionDenied reports a caller without the needed scope."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


def missing_scope(scope: str) -> PermissionDenied:
    """Returns the refusal of a caller whose credential lacks `scope`: the same from the
    edge (its RBAC filter, gateway/refusal_details.py) and from a service."""
    return PermissionDenied(
        f"this operation needs the {scope!r} scope",
        reason="MISSING_SCOPE",
        metadata={"scope": scope},
    )


class _Retryable(TokenmeshError):
    """_Retryable adds RetryInfo when a retry delay is known."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_s = retry_after_s

    def details(self) -> list[Message]:
        details = super().details()
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(0, round(self.retry_after_s * 1000)))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        return details


class ResourceExhausted(_Retryable):
    """ResourceExhausted reports a full queue, a rate limit or a spent budget."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        quota_violations: Sequence[QuotaViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s, reason=reason, metadata=metadata)
        self.quota_violations = list(quota_violations)

    def details(self) -> list[Message]:
        details = super().details()
        if self.quota_violations:
            details.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=v.subject, description=v.description
                        )
                        for v in self.quota_violations
                    ]
                )
            )
        return details


class Unavailable(_Retryable):
    """Unavailable reports a temporarily unreachable dependency or a draining server."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(TokenmeshError):
    """DeadlineExceeded reports a request that ran out of time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(TokenmeshError):
    """Cancelled reports a request the client cancelled."""

    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class Unimplemented(TokenmeshError):
    """Unimplemented reports an RPC this server does not serve (yet)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_IMPLEMENTED"


def internal_error() -> TokenmeshError:
    """Returns the generic error sent for unexpected exceptions (no internals)."""
    return TokenmeshError("internal error; see server logs", reason="INTERNAL")
