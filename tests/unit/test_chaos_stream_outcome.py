"""How the chaos suite classifies a stream by what its client saw of it."""

from __future__ import annotations

from bench.chaos.load import _Partial, _stream_outcome


def _outcome(seen: _Partial, error: str | None) -> tuple[str, bool]:
    outcome = _stream_outcome("grpc-stream", "r1", 0.0, seen, error)
    return outcome.status, outcome.cut


def test_a_stream_with_its_final_message_is_whole() -> None:
    seen = _Partial(messages=3, final={"prompt_tokens": 2, "completion_tokens": 3})
    assert _outcome(seen, None) == ("OK", False)


def test_a_stream_whose_final_message_carried_an_error_failed_in_band() -> None:
    assert _outcome(_Partial(messages=1, final={}, started=True), "UNAVAILABLE") == (
        "in-band error",
        False,
    )


def test_a_stream_no_worker_took_failed_and_is_not_cut() -> None:
    # Refused before a worker's headers: the edge could still have retried it.
    assert _outcome(_Partial(), "UNAVAILABLE") == ("UNAVAILABLE", False)


def test_a_stream_cut_after_its_workers_headers_is_cut() -> None:
    # A worker took it (its headers out) and died before its first message: the edge
    # cannot retry it; it counted as failed, not cut.
    assert _outcome(_Partial(started=True), "INTERNAL") == ("INTERNAL", True)


def test_a_stream_cut_after_a_message_is_cut() -> None:
    assert _outcome(_Partial(messages=2, started=True), None) == ("truncated", True)
