"""OpenAI's files and batches (/openai/v1) through the real edge, with the official SDK.

A batch runs as a job of the uploading key; its output lines must be what the
same bodies answer at /openai/v1 synchronously (same seeds, same texts).
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis

from tests.e2e.test_auth import create_key
from tests.e2e.test_jobs import wait_until

MODEL = "deterministic-test"
SCOPES = "inference:generate,inference:embed,models:read,jobs"


def sdk(mesh, secret: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=secret, base_url=f"{mesh.edge_url}/openai/v1", max_retries=0, timeout=60
    )


@pytest.fixture(scope="module")
def client(mesh) -> Iterator[openai.OpenAI]:
    with sdk(mesh, create_key(mesh, scopes=SCOPES)["secret"]) as client:
        yield client


def jsonl(lines: list[dict[str, Any]]) -> io.BytesIO:
    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    data.name = "requests.jsonl"
    return data


def completion_line(i: int, max_tokens: int = 6) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": f"Line {i}: in the beginning", "max_tokens": max_tokens}
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {**body, "seed": 40 + i, "temperature": 0.8},
    }


def finished(client: openai.OpenAI, batch_id: str, timeout_s: float = 120) -> Any:
    def final() -> Any:
        batch = client.batches.retrieve(batch_id)
        running = ("validating", "in_progress", "finalizing", "cancelling")
        return batch if batch.status not in running else None

    return wait_until(final, timeout_s, f"batch {batch_id} to end")


def read_lines(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    content = client.files.content(file_id).content
    return [json.loads(line) for line in content.decode().splitlines() if line]


def test_a_batch_of_completions_round_trips_and_matches_sync_calls(client):
    lines = [completion_line(i) for i in range(5)]
    upload = client.files.create(file=jsonl(lines), purpose="batch")
    assert upload.id.startswith("file-") and upload.purpose == "batch"
    assert upload.bytes > 0 and client.files.retrieve(upload.id).filename == "requests.jsonl"

    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"purpose": "e2e round trip"},
    )
    assert batch.id.startswith("batch_") and batch.object == "batch"
    assert batch.status == "in_progress" and batch.request_counts.total == 5
    assert batch.metadata == {"purpose": "e2e round trip"}

    done = finished(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 0)
    assert done.completed_at is not None and done.output_file_id
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"

    output = read_lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == [f"req-{i}" for i in range(5)]
    for line, sent in zip(output, lines, strict=True):
        response = line["response"]
        assert line["error"] is None and response["status_code"] == 200
        assert response["request_id"].startswith(batch.id.replace("batch_", "job-"))
        body = response["body"]
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1
        sync = client.completions.create(**sent["body"])
        assert body["choices"][0]["text"] == sync.choices[0].text
    # The batch's usage is its lines' (it was None: cost code crashed on it).
    bodies = [line["response"]["body"]["usage"] for line in output]
    assert done.usage is not None
    assert done.usage.output_tokens == sum(u["completion_tokens"] for u in bodies)
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in bodies)
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert batch.id in {b.id for b in client.batches.list(limit=100)}


def test_a_list_limit_out_of_range_names_limit(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.list(limit=101)
    assert bad.value.param == "limit" and "1-100" in bad.value.message


def test_an_embeddings_batch_answers_openai_embeddings(client):
    line = {
        "custom_id": "e-1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "all-minilm-l6-v2", "input": ["In the beginning", "was the Word"]},
    }
    # Another size: the worker refuses the line before computing it (it was computed
    # and billed, then failed here).
    resized = {**line, "custom_id": "e-2", "body": {**line["body"], "dimensions": 256}}
    upload = client.files.create(file=jsonl([line, resized]), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = finished(client, batch.id)
    [output] = read_lines(client, done.output_file_id)
    [refused] = read_lines(client, done.error_file_id)
    assert refused["custom_id"] == "e-2", refused
    assert refused["response"]["body"]["error"]["param"] == "dimensions", refused
    body = output["response"]["body"]
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    sync = client.embeddings.create(model="all-minilm-l6-v2", input=["In the beginning"])
    assert body["data"][0]["embedding"] == pytest.approx(sync.data[0].embedding, abs=1e-5)


def test_a_cancelled_batch_keeps_finished_lines_and_names_the_rest(client):
    lines = [completion_line(i, max_tokens=64) for i in range(60)]
    upload = client.files.create(file=jsonl(lines), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
    )
    cancelling = client.batches.cancel(batch.id)
    # "cancelling" while requests in flight are stopped, then "cancelled".
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    cancelled = finished(client, batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)
    output_id = cancelled.output_file_id
    finished_lines = read_lines(client, output_id) if output_id else []
    unrun = read_lines(client, cancelled.error_file_id)
    assert len(finished_lines) + len(unrun) == 60
    assert {line["error"]["code"] for line in unrun} == {"batch_cancelled"}
    assert all(line["response"] is None for line in unrun)


def test_a_bad_input_line_refuses_the_batch_naming_it(client):
    lines = [completion_line(0), {**completion_line(1), "url": "/v1/chat/completions"}]
    upload = client.files.create(file=jsonl(lines), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
    assert "line 2.url" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-000000000000000000000000",
            endpoint="/v1/completions",
            completion_window="24h",
        )


def test_another_tenants_files_and_batches_are_not_found(mesh, client):
    upload = client.files.create(file=jsonl([completion_line(0)]), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
    )
    stranger = create_key(mesh, "--tenant", "globex", scopes=SCOPES)
    with sdk(mesh, stranger["secret"]) as other:
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(upload.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(batch.id)
    without_jobs = create_key(mesh, scopes="inference:generate")
    with sdk(mesh, without_jobs["secret"]) as other:
        with pytest.raises(openai.PermissionDeniedError):
            other.batches.retrieve(batch.id)


def test_a_file_of_several_megabytes_is_accepted_and_one_over_the_cap_refused(client):
    line = completion_line(0)
    count = 3 * 1024 * 1024 // len(json.dumps(line))
    lines = [{**line, "custom_id": f"big-{i}"} for i in range(count)]
    upload = client.files.create(file=jsonl(lines), purpose="batch")
    assert upload.bytes > 3 * 1000 * 1000
    assert len(client.files.content(upload.id).content) == upload.bytes
    too_large = io.BytesIO(b"x" * (8 * 1024 * 1024 + 1))
    too_large.name = "too-large.jsonl"
    with pytest.raises((openai.BadRequestError, openai.APIStatusError)) as info:
        client.files.create(file=too_large, purpose="batch")
    assert info.value.status_code in (400, 413)


# TOKENMESH_JOBS_RETENTION_DAYS's default (the session mesh keeps it).
RETENTION_S = 7 * 86400


def test_files_say_when_they_expire(client):
    """Every file object said `expires_at: null`, though an upload is deleted after the
    retention and a batch's result files go with the batch (its retention after it ended)."""
    upload = client.files.create(file=jsonl([completion_line(0)]), purpose="batch")
    assert upload.expires_at == upload.created_at + RETENTION_S
    assert client.files.retrieve(upload.id).expires_at == upload.expires_at
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
    )
    done = finished(client, batch.id)
    assert done.completed_at is not None and done.output_file_id
    output = client.files.retrieve(done.output_file_id)
    assert output.created_at == done.completed_at
    assert output.expires_at == done.completed_at + RETENTION_S
    assert output.bytes == len(client.files.content(done.output_file_id).content)


def test_an_uploads_expires_after_is_kept_within_the_retention(mesh, client):
    """The SDK's expires_after was ignored: a file asked to go in an hour was kept the
    whole retention (7 days) in Redis, and its file object said so."""
    hour = {"anchor": "created_at", "seconds": 3600}
    upload = client.files.create(
        file=jsonl([completion_line(0)]), purpose="batch", expires_after=hour
    )
    assert upload.expires_at == upload.created_at + 3600
    assert client.files.retrieve(upload.id).expires_at == upload.expires_at
    ttl = redis.Redis.from_url(mesh.redis_url).ttl(f"tm:jobs:file:{upload.id}")
    assert 3500 < ttl <= 3600, ttl
    # Longer than the retention: kept the retention, as its expires_at says.
    month = {"anchor": "created_at", "seconds": 30 * 86400}
    kept = client.files.create(
        file=jsonl([completion_line(0)]), purpose="batch", expires_after=month
    )
    assert kept.expires_at == kept.created_at + RETENTION_S
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(
            file=jsonl([completion_line(0)]),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 60},
        )
    assert refused.value.body["param"] == "expires_after[seconds]", refused.value.body


def test_files_are_listed_and_deleted_as_openais(mesh):
    """`client.files.list()` was 404 and deleting a batch's output file 400: a cleanup
    script written for OpenAI (list the files, delete each) stopped at its first call."""
    # A tenant of its own: it lists (and deletes) every file of its tenant.
    tenant = f"files-{uuid.uuid4().hex[:8]}"
    with sdk(mesh, create_key(mesh, "--tenant", tenant, scopes=SCOPES)["secret"]) as own:
        uploads = [
            own.files.create(file=jsonl([completion_line(i)]), purpose="batch") for i in range(3)
        ]
        batch = own.batches.create(
            input_file_id=uploads[0].id, endpoint="/v1/completions", completion_window="24h"
        )
        done = finished(own, batch.id)
        # Two pages of two: the SDK asks for the next with `after` while `has_more`.
        assert sorted(f.id for f in own.files.list(limit=2)) == sorted(u.id for u in uploads)
        with pytest.raises(openai.BadRequestError) as refused:
            own.files.list(purpose="batch_output")
        assert refused.value.param == "purpose"
        for listed in own.files.list():
            assert own.files.delete(listed.id).deleted
        assert list(own.files.list()) == []
        assert own.files.delete(done.output_file_id).deleted
        with pytest.raises(openai.NotFoundError):
            own.files.retrieve(done.output_file_id)
        assert own.batches.retrieve(batch.id).output_file_id == done.output_file_id


def test_an_upload_with_an_unusual_filename_keeps_it(client):
    """The SDK (httpx) writes the multipart form itself: quotes and backslashes in the
    name are escaped, the purpose comes first, then the file as application/octet-stream."""
    data = jsonl([completion_line(0)])
    data.name = 'my "requests" \\ v2 é.jsonl'
    upload = client.files.create(file=data, purpose="batch")
    assert upload.bytes == len(data.getvalue())
    assert client.files.content(upload.id).content == data.getvalue()
    assert client.files.retrieve(upload.id).filename == upload.filename


def test_an_upload_of_the_largest_size_downloads_whole(client):
    """An upload was sent back as one message of its whole size: 8 MiB and its framing,
    all of it in the edge's buffer at once. It comes in 1 MiB messages now."""
    line = json.dumps(completion_line(0)).encode() + b"\n"
    data = line * (8 * 1024 * 1024 // len(line))
    data += (
        b" " * (8 * 1024 * 1024 - len(data) - 1) + b"\n"
    )  # exactly TOKENMESH_OPENAI_FILE_MAX_BYTES
    assert len(data) == 8 * 1024 * 1024
    upload = client.files.create(file=("largest.jsonl", data), purpose="batch")
    assert upload.bytes == len(data)
    try:
        assert client.files.content(upload.id).content == data
    finally:
        client.files.delete(upload.id)


def test_an_owner_past_its_storage_quota_is_refused_429_in_openais_shape(mesh):
    """Uploads had no bound per tenant (or key): one key could fill the Redis every
    service shares. TOKENMESH_OPENAI_FILES_PER_OWNER (100) files are kept at most."""
    tenant = f"quota-{uuid.uuid4().hex[:8]}"  # a room of its own (not acme's)
    with sdk(mesh, create_key(mesh, "--tenant", tenant, scopes=SCOPES)["secret"]) as own:
        data = jsonl([completion_line(0)]).getvalue()
        kept = [own.files.create(file=("r.jsonl", data), purpose="batch") for _ in range(100)]
        with pytest.raises(openai.RateLimitError) as refused:
            own.files.create(file=("r.jsonl", data), purpose="batch")
        assert refused.value.code == "storage_quota_exceeded", refused.value.body
        assert "TOKENMESH_OPENAI_FILES_PER_OWNER" in refused.value.message
        # The SDK does not send it again (it retried a 429 twice).
        assert refused.value.response.headers.get("x-should-retry") == "false"
        own.files.delete(kept[0].id)
        assert own.files.create(file=("r.jsonl", data), purpose="batch").bytes == len(data)
