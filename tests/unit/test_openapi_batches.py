"""docs/openapi.yaml describes the objects OpenAI's files and batches really answer."""

from __future__ import annotations

from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from gateway import openapi
from services.core.errors import InvalidArgument
from services.jobs import openai_batches as batches
from services.jobs.openai_files import file_object
from services.jobs.store import CANCELLED, EXPIRED, FAILED, SUCCEEDED, JobRecord

DOCUMENT: dict[str, Any] = yaml.safe_load(openapi.DOCUMENT_PATH.read_text(encoding="utf-8"))
BATCH = batches.BatchRecord(
    batch_id="batch_0123456789abcdef",
    owner="tenant-a",
    endpoint=batches.CHAT,
    input_file_id="file-0123456789abcdef01234567",
    metadata={"project": "psalms"},
    created_ms=1_735_689_600_000,
    lines=[("a", {}), ("b", {})],
)


def _schema_of(path: str, verb: str, status: str = "200") -> dict[str, Any]:
    response = DOCUMENT["paths"][path][verb]["responses"][status]
    if "$ref" in response:
        response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return {**root, "components": DOCUMENT["components"]}


def _check(schema: dict[str, Any], value: Any) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(value)]
    assert not errors


def _job(status: str, succeeded: int, failed: int) -> JobRecord:
    fields = {
        "status": status,
        "total": "2",
        "succeeded": str(succeeded),
        "failed": str(failed),
        "deadline_ms": "1735776000000",
    }
    if status not in ("QUEUED", "RUNNING"):
        fields["ended_ms"] = "1735689700000"
    return JobRecord("job-0123456789abcdef", fields)


@pytest.mark.parametrize(
    ("status", "succeeded", "failed"),
    [("QUEUED", 0, 0), ("RUNNING", 1, 0), (SUCCEEDED, 2, 0), (FAILED, 0, 2), (CANCELLED, 1, 0)]
    + [(EXPIRED, 0, 0)],
)
def test_batch_objects_match_the_documented_batch(status, succeeded, failed):
    view = batches.batch_object(BATCH, _job(status, succeeded, failed))
    for path, verb in (
        ("/openai/v1/batches", "post"),
        ("/openai/v1/batches/{batch_id}", "get"),
        ("/openai/v1/batches/{batch_id}/cancel", "post"),
    ):
        _check(_schema_of(path, verb), view)
    page = {"object": "list", "data": [view], "first_id": view["id"], "last_id": view["id"]}
    _check(_schema_of("/openai/v1/batches", "get"), page | {"has_more": False})


def test_file_objects_match_the_documented_file():
    created, expires = 1_735_689_600_000, 1_736_294_400_000
    upload = file_object("file-0123456789abcdef01234567", 42, created, "in.jsonl", "batch", expires)
    output = file_object("file-0123-output", 7, created, "b_output.jsonl", "batch_output", expires)
    assert upload["expires_at"] == output["expires_at"] == expires // 1000
    for view in (upload, output):
        _check(_schema_of("/openai/v1/files", "post"), view)
        _check(_schema_of("/openai/v1/files/{file_id}", "get"), view)
    page = {"object": "list", "data": [upload], "first_id": upload["id"], "last_id": upload["id"]}
    _check(_schema_of("/openai/v1/files", "get"), page | {"has_more": False})
    deleted = {"id": upload["id"], "object": "file", "deleted": True}
    _check(_schema_of("/openai/v1/files/{file_id}", "delete"), deleted)


def test_batch_errors_are_documented_in_openai_shape():
    for path, ops in DOCUMENT["paths"].items():
        if not path.startswith(("/openai/v1/files", "/openai/v1/batches")):
            continue
        for verb in ops:
            for status in ("401", "403", "404", "429"):
                error = {"message": "no", "type": "permission_error", "param": None, "code": None}
                _check(_schema_of(path, verb, status), {"error": error})


def test_a_batch_body_or_line_nested_too_deep_is_invalid_json_not_an_internal_error():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidArgument, match="JSON"):
        batches.parse_batch_request(deep)
    with pytest.raises(InvalidArgument, match="JSON"):
        batches._read_line(1, deep, "/v1/chat/completions", set())


def test_a_file_with_too_many_lines_is_refused_before_any_line_is_parsed():
    # It was parsed whole first (seconds for ~70,000 small lines, on the jobs
    # replica's event loop), and a bad line past the limit was what got reported.
    line = b'{"custom_id": "c%d", "method": "POST", "url": "/v1/chat/completions", "body": {}}'
    data = b"\n".join([line % 1, line % 2, b"{not json"])
    with pytest.raises(InvalidArgument) as refused:
        batches.parse_input(data, "/v1/chat/completions", max_lines=2)
    assert [v.field for v in refused.value.violations] == ["input_file_id"]
