"""How a stopped job reads: its status while it stops, and what the items it never ran
say (the API's results and an OpenAI batch's error lines)."""

from __future__ import annotations

from services.jobs import openai_batches as batches
from services.jobs import views
from services.jobs.store import JobRecord

BATCH = batches.BatchRecord(
    batch_id="batch_0123456789abcdef",
    owner="tenant-a",
    endpoint=batches.CHAT,
    input_file_id="file-0123456789abcdef01234567",
    metadata={},
    created_ms=1_735_689_600_000,
    lines=[("a", {}), ("b", {})],
)


def _job(status: str, **fields: str) -> JobRecord:
    base = {"status": status, "total": "2", "succeeded": "1", "failed": "0"}
    return JobRecord("job-0123456789abcdef", {**base, **fields})


def test_a_stopping_batch_is_cancelling_without_files_until_it_is_cancelled():
    stopping = batches.batch_object(BATCH, _job("CANCELLING", stopping_ms="1735689700000"))
    assert stopping["status"] == "cancelling" and stopping["cancelling_at"] == 1735689700
    assert stopping["cancelled_at"] is None
    assert stopping["output_file_id"] is None and stopping["error_file_id"] is None
    ended = _job("CANCELLED", stopping_ms="1735689700000", ended_ms="1735689701000")
    cancelled = batches.batch_object(BATCH, ended)
    assert cancelled["status"] == "cancelled" and cancelled["cancelling_at"] == 1735689700
    assert cancelled["cancelled_at"] == 1735689701
    assert cancelled["output_file_id"] and cancelled["error_file_id"]


def test_items_a_stopped_job_never_ran_say_why():
    assert views.never_ran(_job("CANCELLING")) is None  # may still finish
    assert batches.unrun_error(_job("CANCELLING")) is None
    cancelled = views.never_ran(_job("CANCELLED"))
    assert cancelled is not None and (cancelled.code, cancelled.reason) == ("CANCELLED", "")
    revoked = views.never_ran(_job("CANCELLED", stop_reason="KEY_REVOKED"))
    assert revoked is not None and (revoked.code, revoked.reason) == ("CANCELLED", "KEY_REVOKED")
    assert "revoked" in revoked.message
    error = batches.unrun_error(_job("CANCELLED", stop_reason="KEY_REVOKED"))
    assert error is not None and error["code"] == "key_revoked"
    expired = views.never_ran(_job("EXPIRED", stop_reason="KEY_REVOKED"))
    assert expired is not None and expired.code == "DEADLINE_EXCEEDED" and not expired.reason
    unknown = views.never_ran(_job("CANCELLED", stop_reason="A_LATER_REASON"))
    assert unknown is not None and unknown.reason == "A_LATER_REASON"
