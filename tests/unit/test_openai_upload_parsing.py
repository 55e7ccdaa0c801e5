"""Multipart uploads of OpenAI's files (services/jobs/openai_files.py's parse_upload).

The bodies the SDK sends are written here by httpx's own multipart encoder, which
openai-python's client.files.create uses (tests/e2e/test_openai_batches.py sends them
through the edge); the hostile ones are what the standard library's email parser
spent a minute of the event loop on.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from services.core.errors import InvalidArgument
from services.jobs.openai_files import parse_upload

MAX_BYTES = 8 * 1024 * 1024
DATA = b'{"custom_id": "r1", "method": "POST", "url": "/v1/embeddings", "body": {}}\n'


def _sdk_body(data: bytes, filename: str = "requests.jsonl", **fields: Any) -> tuple[str, bytes]:
    """Returns the Content-Type and body httpx writes for the SDK's files.create."""
    request = httpx.Request(
        "POST",
        "http://edge/openai/v1/files",
        data={"purpose": "batch", **fields},
        files={"file": (filename, data, "application/octet-stream")},
    )
    return request.headers["content-type"], request.read()


def _field(upload: InvalidArgument) -> str:
    return upload.violations[0].field


def test_the_sdks_upload_is_read():
    content_type, body = _sdk_body(DATA)
    upload = parse_upload(content_type, body, MAX_BYTES)
    assert (upload.purpose, upload.filename, upload.data) == ("batch", "requests.jsonl", DATA)


def test_the_sdks_expires_after_fields_are_read():
    fields = {"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}
    content_type, body = _sdk_body(DATA, **fields)
    upload = parse_upload(content_type, body, MAX_BYTES)
    assert (upload.data, upload.expires_after_s) == (DATA, 3600)
    assert parse_upload(*_sdk_body(DATA), MAX_BYTES).expires_after_s is None


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}, "anchor"),
        ({"expires_after[seconds]": "3600"}, "anchor"),
        ({"expires_after[anchor]": "created_at"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3599"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "1e4"}, "seconds"),
    ],
)
def test_an_expires_after_openai_refuses_is_refused_naming_its_field(
    fields: dict[str, str], named: str
):
    with pytest.raises(InvalidArgument) as refused:
        parse_upload(*_sdk_body(DATA, **fields), MAX_BYTES)
    assert _field(refused.value) == f"expires_after[{named}]"


def test_a_filename_keeps_what_the_sdk_escaped_and_its_utf8():
    # httpx writes '"' as %22 and a backslash as a quoted pair (HTML5's form encoding).
    content_type, body = _sdk_body(DATA, filename='my "requests" \\ é.jsonl')
    assert parse_upload(content_type, body, MAX_BYTES).filename == "my %22requests%22 \\ é.jsonl"


def test_data_that_looks_like_headers_or_boundaries_is_kept_byte_for_byte():
    data = b"\r\n\r\nContent-Disposition: form-data; name=purpose\r\n\r\n--x\r\n" + DATA + b"\r\n"
    content_type, body = _sdk_body(data)
    assert parse_upload(content_type, body, MAX_BYTES).data == data


def test_a_browser_style_body_with_a_preamble_and_quoted_boundary_is_read():
    body = (
        b"a preamble\r\n--AaB03x\r\n"
        b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b"--AaB03x  \r\n"  # transport padding
        b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''r%C3%A9q.jsonl\r\n"
        b"Content-Type: application/jsonl\r\n\r\n" + DATA + b"\r\n--AaB03x--\r\nan epilogue"
    )
    upload = parse_upload('multipart/form-data; boundary="AaB03x"', body, MAX_BYTES)
    assert (upload.filename, upload.data) == ("réq.jsonl", DATA)


def test_many_empty_parts_are_refused_at_once():
    """The email parser took ~7 s and +37 MiB for each MiB of empty parts (~70 s for
    the edge's 8 MiB cap), all of it on the event loop."""
    body = b"--b\r\n\r\n" + b"\r\n--b\r\n\r\n" * 100_000 + b"\r\n--b--\r\n"
    started = time.perf_counter()
    with pytest.raises(InvalidArgument) as refused:
        parse_upload("multipart/form-data; boundary=b", body, MAX_BYTES)
    assert time.perf_counter() - started < 0.2
    assert _field(refused.value) == "file" and "parts" in str(refused.value)


@pytest.mark.parametrize(
    ("content_type", "body", "says"),
    [
        ("multipart/form-data", b"--b\r\n\r\nx\r\n--b--\r\n", "boundary"),
        ("multipart/form-data; boundary=" + "b" * 71, b"", "boundary"),
        ("application/json", b"{}", "multipart/form-data"),
        ("multipart/form-data; boundary=b", b"no boundary at all", "no part"),
        ("multipart/form-data; boundary=b", b"--b\r\n\r\n" + DATA, "not closed"),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\nX: " + b"y" * 16_384,
            "headers",
        ),
        ("multipart/form-data; boundary=b", b"--bgarbage\r\n\r\nx\r\n--b--\r\n", "malformed"),
    ],
)
def test_a_body_that_is_no_multipart_form_is_refused_on_file(content_type, body, says):
    with pytest.raises(InvalidArgument) as refused:
        parse_upload(content_type, body, MAX_BYTES)
    assert _field(refused.value) == "file" and says in str(refused.value)


def test_a_missing_file_a_second_file_or_another_purpose_is_refused():
    content_type, body = _sdk_body(DATA)
    boundary = content_type.partition("boundary=")[2].encode()
    without_file = (
        b"--%s\r\nContent-Disposition: form-data; name=purpose\r\n\r\nbatch\r\n--%s--\r\n"
    )
    with pytest.raises(InvalidArgument, match="is required"):
        parse_upload(content_type, without_file % (boundary, boundary), MAX_BYTES)
    part = body[body.index(b'Content-Disposition: form-data; name="file"') :]
    twice = body.replace(b"--%s--\r\n" % boundary, b"--%s\r\n" % boundary + part)
    with pytest.raises(InvalidArgument, match="more than once"):
        parse_upload(content_type, twice, MAX_BYTES)
    other = body.replace(b"\r\n\r\nbatch\r\n", b"\r\n\r\nfine-tune\r\n")
    with pytest.raises(InvalidArgument) as refused:
        parse_upload(content_type, other, MAX_BYTES)
    assert _field(refused.value) == "purpose"


def test_a_file_over_the_cap_or_not_utf8_is_refused():
    content_type, body = _sdk_body(DATA)
    with pytest.raises(InvalidArgument, match=f"at most {len(DATA) - 1}"):
        parse_upload(content_type, body, len(DATA) - 1)
    content_type, body = _sdk_body(b"\xff\xfe" + DATA)
    with pytest.raises(InvalidArgument, match="UTF-8"):
        parse_upload(content_type, body, MAX_BYTES)
