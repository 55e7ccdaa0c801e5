"""What the jobs service reads from a failed item call's google.rpc.Status details."""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from services.jobs import execution


def _packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def test_each_reader_takes_its_own_detail_and_nothing_without_one():
    status = status_pb2.Status(
        details=[
            _packed(error_details_pb2.BadRequest()),  # no violation: not the field's
            _packed(error_details_pb2.ErrorInfo(reason="RATE_LIMITED")),
            _packed(
                error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)
                )
            ),
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field="dimensions"),
                        error_details_pb2.BadRequest.FieldViolation(field="inputs[0]"),
                    ]
                )
            ),
        ]
    )
    assert execution.error_field(status) == "dimensions"
    assert execution.error_reason(status) == "RATE_LIMITED"
    assert execution.retry_delay_s(status) == 2.5
    for empty in (None, status_pb2.Status()):
        assert execution.error_field(empty) == ""
        assert execution.error_reason(empty) == ""
        assert execution.retry_delay_s(empty) is None
