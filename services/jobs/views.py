"""Jobs as protobuf (the API's shape) and as the webhook's JSON event."""

from __future__ import annotations

import json
from collections.abc import Sequence

from google.protobuf import json_format, timestamp_pb2

from services.jobs.store import (
    CANCELLED,
    EXPIRED,
    FINAL,
    KEY_EXPIRED,
    KEY_REVOKED,
    STORAGE_QUOTA,
    JobRecord,
)
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.jobs.v1 import jobs_pb2

EVENT_TYPES = {
    "SUCCEEDED": "job.succeeded",
    "FAILED": "job.failed",
    "CANCELLED": "job.cancelled",
    "EXPIRED": "job.expired",
}


# What a result says for an item a stopped or expired job never ran, by the job's
# (status, stop_reason): (code, grpc code, message); the reason goes with it.
NEVER_RAN = {
    (CANCELLED, ""): ("CANCELLED", 1, "the job was cancelled before this item finished"),
    (CANCELLED, KEY_REVOKED): (
        "CANCELLED",
        1,
        "the job was stopped before this item finished: the API key that created it was revoked",
    ),
    (CANCELLED, KEY_EXPIRED): (
        "CANCELLED",
        1,
        "the job was stopped before this item finished: the API key that created it expired",
    ),
    (CANCELLED, STORAGE_QUOTA): (
        "RESOURCE_EXHAUSTED",
        8,
        "the job was stopped before this item finished: its owner's stored files and "
        "results passed its storage quota (delete some, or wait until they expire)",
    ),
    (EXPIRED, ""): (
        "DEADLINE_EXCEEDED",
        4,
        "the job's completion window ended before this item ran",
    ),
}


def never_ran(record: JobRecord) -> jobs_pb2.JobError | None:
    """Returns the error of an item the job will never run (None while it may still run,
    or when it ended having run every item)."""
    reason = record.get("stop_reason") if record.status == CANCELLED else ""
    # A reason this replica does not know (a newer one's) reads as a plain stop.
    found = NEVER_RAN.get((record.status, reason)) or NEVER_RAN.get((record.status, ""))
    if found is None:
        return None
    code, number, message = found
    return jobs_pb2.JobError(code=code, message=message, grpc_code=number, reason=reason)


def _time(millis: int) -> timestamp_pb2.Timestamp | None:
    if not millis:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(millis)
    return stamp


def job_pb(record: JobRecord, attempts: Sequence[jobs_pb2.WebhookAttempt] = ()) -> jobs_pb2.Job:
    """Returns a job record as the API's Job."""
    total = record.number("total")
    succeeded, failed = record.number("succeeded"), record.number("failed")
    prompt, completion = record.number("prompt_tokens"), record.number("completion_tokens")
    job = jobs_pb2.Job(
        id=record.job_id,
        status=record.status,
        counts=jobs_pb2.JobCounts(total=total, succeeded=succeeded, failed=failed),
        progress=(succeeded + failed) / total if total else 0.0,
        usage=inference_pb2.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cached_prompt_tokens=record.number("cached_tokens"),
        ),
        metadata=json.loads(record.get("metadata", "{}")),
        idempotency_key=record.get("idempotency_key"),
        create_time=_time(record.number("created_ms")),
        start_time=_time(record.number("started_ms")),
        end_time=_time(record.number("ended_ms")),
        expire_time=_time(record.number("deadline_ms")),
    )
    url = record.get("webhook_url")
    if url:
        state = record.get("webhook_state")
        job.webhook.CopyFrom(
            jobs_pb2.Webhook(
                url=url,
                state=state,
                attempts=record.number("webhook_attempts"),
                recent_attempts=attempts,
                next_attempt_time=_time(record.number("webhook_next_ms"))
                if state == "RETRYING"
                else None,
                event_id=event_id(record.job_id),
            )
        )
    return job


def event_id(job_id: str) -> str:
    """Returns the webhook-id of a job's completion event (the same on every attempt)."""
    return f"msg-{job_id}"


def event_type(job: jobs_pb2.Job) -> str:
    """Returns the event type of a job's state ("job.progress" until it ends)."""
    return EVENT_TYPES.get(job.status, "job.progress") if job.status in FINAL else "job.progress"


def to_json(message: jobs_pb2.Job | jobs_pb2.JobResult) -> dict[str, object]:
    """Returns a message as the JSON the REST API prints (proto field names)."""
    printed: dict[str, object] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return printed


def event_body(job: jobs_pb2.Job, timestamp: str) -> bytes:
    """Returns the webhook's JSON body: {"type", "timestamp", "data": <the job>}."""
    event = {"type": event_type(job), "timestamp": timestamp, "data": to_json(job)}
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
