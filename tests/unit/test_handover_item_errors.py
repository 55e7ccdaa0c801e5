"""A failed item answered inline (`Prefer: respond-async, wait=N`) as the direct call's error."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.core.errors import FieldViolation, InvalidArgument, TokenmeshError
from services.inference import v1_translation
from services.jobs.execution import error_result
from services.jobs.handover import item_error


def _kept(error: TokenmeshError) -> status_pb2.Status:
    """Returns the status an item's JobError makes of `error` after a worker raised it."""
    status = error.to_status()
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    bad = error_details_pb2.BadRequest()
    field = ""
    if len(status.details) > 1 and status.details[1].Unpack(bad):
        field = bad.field_violations[0].field
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    kept = error_result(0, code, status.message, info.reason, field).error
    found = item_error(kept)
    assert found is not None
    return found.to_status()


def test_a_context_error_is_rebuilt_with_its_reason_and_field_and_v1_names() -> None:
    description = "prompt (600 tokens) + max_output_tokens (2) = 602 exceeds the context"
    raised = InvalidArgument(
        [FieldViolation("max_output_tokens", description)], reason="CONTEXT_LENGTH_EXCEEDED"
    )
    assert _kept(raised) == raised.to_status()
    kept = error_result(
        0, grpc.StatusCode.INVALID_ARGUMENT, raised.message, raised.reason, "max_output_tokens"
    ).error
    found = item_error(kept)
    assert found is not None
    v1 = v1_translation.v1_error(found)
    expected = "max_tokens: prompt (600 tokens) + max_tokens (2) = 602 exceeds the context"
    assert v1.message == expected
    assert v1.to_status() == v1_translation.v1_error(raised).to_status()


def test_the_first_violation_keeps_the_message_whole_and_other_codes_keep_theirs() -> None:
    several = InvalidArgument(
        [FieldViolation("n", "must be at most 8"), FieldViolation("prompt", "is empty")]
    )
    status = _kept(several)
    assert (status.code, status.message) == (code_pb2.INVALID_ARGUMENT, several.message)
    # A code no error class here raises keeps its number, reason and message.
    kept = error_result(0, grpc.StatusCode.OUT_OF_RANGE, "past the end", "PAST_END").error
    found = item_error(kept)
    assert found is not None
    status = found.to_status()
    info = error_details_pb2.ErrorInfo()
    assert status.code == code_pb2.OUT_OF_RANGE and status.message == "past the end"
    assert status.details[0].Unpack(info) and info.reason == "PAST_END"


def test_an_error_without_a_reason_is_its_code_and_message_only() -> None:
    # gRPC's own status, or the edge's sunset text: the direct call has no details either.
    kept = error_result(0, grpc.StatusCode.NOT_FOUND, "version '1' of 'm' was sunset").error
    assert item_error(kept) is None
