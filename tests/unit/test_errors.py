"""Domain errors map to gRPC statuses with the right google.rpc details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from redis import exceptions as redis_errors

from services.core import errors
from services.core.interceptors import to_domain_error


def _unpack(status, detail_type):
    found = []
    for detail in status.details:
        if detail.Is(detail_type.DESCRIPTOR):
            message = detail_type()
            detail.Unpack(message)
            found.append(message)
    return found


def test_invalid_argument_carries_every_field_violation():
    error = errors.InvalidArgument(
        [
            errors.FieldViolation("max_tokens", "must be between 1 and 8192"),
            errors.FieldViolation("temperature", "must be between 0 and 2"),
        ]
    )
    status = error.to_status()
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert "max_tokens" in status.message and "temperature" in status.message
    (bad_request,) = _unpack(status, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == ["max_tokens", "temperature"]
    (info,) = _unpack(status, error_details_pb2.ErrorInfo)
    assert info.reason == "INVALID_ARGUMENT" and info.domain == errors.ERROR_DOMAIN


def test_invalid_argument_needs_a_violation():
    with pytest.raises(ValueError):
        errors.InvalidArgument([])


def test_resource_exhausted_has_quota_failure_and_retry_info():
    error = errors.ResourceExhausted(
        "queue full",
        retry_after_s=1.5,
        quota_violations=[errors.QuotaViolation("worker:queue", "64 requests queued")],
        reason="QUEUE_FULL",
    )
    status = error.to_status()
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    (retry,) = _unpack(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == 1500
    (quota,) = _unpack(status, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "worker:queue"
    (info,) = _unpack(status, error_details_pb2.ErrorInfo)
    assert info.reason == "QUEUE_FULL"


def test_unavailable_without_delay_has_no_retry_info():
    status = errors.Unavailable("draining").to_status()
    assert status.code == code_pb2.UNAVAILABLE
    assert _unpack(status, error_details_pb2.RetryInfo) == []


def test_unknown_exceptions_become_generic_internal_errors(caplog):
    error = to_domain_error(KeyError("secret-internal-detail"), "/x.Y/Z")
    assert error.code == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in error.message
    assert "secret-internal-detail" in caplog.text  # logged server-side only


def test_not_implemented_becomes_unimplemented():
    error = to_domain_error(NotImplementedError(), "/x.Y/Z")
    assert error.code == grpc.StatusCode.UNIMPLEMENTED
    assert error.reason == "NOT_IMPLEMENTED"


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.TimeoutError("Timeout reading from 127.0.0.1:6379"),
        redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:6379"),
    ],
)
def test_redis_out_of_reach_is_unavailable_not_internal(exc):
    # Regression: the router's ListWorkers answered INTERNAL while its Redis stalled.
    error = to_domain_error(exc, "/tokenmesh.router.v1.WorkerRegistryService/ListWorkers")
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1" not in error.message
