"""Client-visible error text is bounded, however long the request value it quotes."""

from __future__ import annotations

from google.rpc import error_details_pb2

from services.core.errors import MAX_TEXT_CHARS, FieldViolation, InvalidArgument, NotFound


def test_a_long_message_is_cut() -> None:
    error = NotFound(f"model {'a' * 70_000!r} is not in the catalogue")
    assert len(error.message) == MAX_TEXT_CHARS and error.message.endswith("...")
    assert len(error.to_status().message) == MAX_TEXT_CHARS


def test_long_field_violations_are_cut_in_the_message_and_the_bad_request() -> None:
    error = InvalidArgument([FieldViolation("version", f"{'A' * 70_000!r} is unknown")])
    assert len(error.to_status().SerializeToString()) < 4 * MAX_TEXT_CHARS
    bad_request = error_details_pb2.BadRequest()
    assert error.to_status().details[1].Unpack(bad_request)
    (violation,) = bad_request.field_violations
    assert violation.field == "version" and len(violation.description) == MAX_TEXT_CHARS


def test_short_text_is_unchanged() -> None:
    error = InvalidArgument([FieldViolation("max_tokens", "must be between 1 and 512")])
    assert error.message == "max_tokens: must be between 1 and 512"
