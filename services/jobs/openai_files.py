"""OpenAI's files for batches: multipart uploads read, kept in the AOF Redis.

An upload is one hash (`tm:jobs:file:<id>`: owner, purpose, filename, size,
creation and expiry time and the bytes), kept for the jobs' retention; its owner is
the uploading key's tenant (or the key, without a tenant), as OpenAI's files
belong to an organisation. Only purpose "batch" is accepted, JSON Lines in
UTF-8 of at most `max_bytes` (TOKENMESH_OPENAI_FILE_MAX_BYTES).

The multipart body is split here, not by the standard library's email parser:
that parser took ~70 s and ~300 MiB of the event loop for an 8 MiB body of
empty parts (`--b\r\n\r\n` repeated), while the replica's runners missed
their heartbeats and other replicas ran their items a second time. The
splitter finds each boundary with one `bytes.find` and gives up after
MAX_PARTS parts or a part's headers over MAX_PART_HEADER_BYTES, so a body
costs at most a few passes over its bytes; the servicer runs it in a thread.
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.core.errors import FieldViolation, InvalidArgument
from services.core.redis_service import text
from services.jobs.store import PREFIX, now_ms

PURPOSE = "batch"
FILE_ID_PREFIX = "file-"
# OpenAI's upload has 2-4 fields (purpose, file, the optional expires_after[anchor]
# and expires_after[seconds]); a body of more parts is no upload of theirs.
MAX_PARTS = 8
MAX_PART_HEADER_BYTES = 8 * 1024
# RFC 2046: a boundary is 1-70 characters.
MAX_BOUNDARY = 70
# A header's parameter: name="quoted \" string" or name=token (RFC 7578 section 4.2).
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")


def file_key(file_id: str) -> str:
    """Returns the hash of an uploaded file."""
    return f"{PREFIX}file:{file_id}"


def new_file_id() -> str:
    """Returns a fresh file id: "file-" + 24 hex digits."""
    return FILE_ID_PREFIX + secrets.token_hex(12)


@dataclass(frozen=True)
class Upload:
    """Upload is a multipart upload's fields: the purpose, the file's name and bytes."""

    purpose: str
    filename: str
    data: bytes


@dataclass(frozen=True)
class StoredFile:
    """StoredFile is an uploaded file's record (its bytes are read separately)."""

    file_id: str
    owner: str
    purpose: str
    filename: str
    size: int
    created_ms: int
    expires_ms: int

    def to_json(self) -> dict[str, Any]:
        """Returns OpenAI's file object."""
        return file_object(
            self.file_id, self.size, self.created_ms, self.filename, self.purpose, self.expires_ms
        )


def file_object(
    file_id: str, size: int, created_ms: int, filename: str, purpose: str, expires_ms: int
) -> dict[str, Any]:
    """Returns OpenAI's file object (every file is "processed" once stored). It is
    deleted at `expires_ms`: an upload its retention after it was created, a batch's
    output and error files with the batch, its retention after it ended."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_ms // 1000,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": expires_ms // 1000,
    }


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def _boundary(content_type: str) -> bytes:
    """Returns the boundary of a multipart/form-data content type."""
    media, _, rest = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        raise _bad("file", "upload the file as multipart/form-data (fields purpose and file)")
    params = _params(";" + rest)
    boundary = params.get("boundary", "")
    if not 0 < len(boundary) <= MAX_BOUNDARY or not boundary.isascii():
        raise _bad("file", "the multipart/form-data body has no valid boundary")
    return boundary.encode("ascii")


def _params(value: str) -> dict[str, str]:
    """Returns a header value's parameters (lowercase names; quoted strings unquoted)."""
    params: dict[str, str] = {}
    for name, raw in _PARAM.findall(value):
        if raw.startswith('"'):
            raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
        params.setdefault(name.lower(), raw)
    return params


@dataclass(frozen=True)
class _Part:
    """_Part is one part of a multipart body: its Content-Disposition's parameters and
    where its bytes lie in the body (not copied: only the parts used are)."""

    params: dict[str, str]
    start: int
    end: int


def _part_params(head: bytes) -> dict[str, str]:
    """Returns the Content-Disposition parameters of a part's header block."""
    for line in head.decode("utf-8", "replace").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-disposition":
            kind, _, rest = value.partition(";")
            return _params(";" + rest) if kind.strip().lower() == "form-data" else {}
    return {}


def _split(body: bytes, boundary: bytes) -> list[_Part]:
    """Splits a multipart body into its parts (RFC 2046 section 5.1.1), preamble and
    epilogue left out.

    Raises:
        InvalidArgument: on `file` when the body is not split by the boundary, holds
            more than MAX_PARTS parts, or a part's headers are longer than
            MAX_PART_HEADER_BYTES.
    """
    delimiter = b"\r\n--" + boundary
    # The first delimiter may open the body (no CRLF before it).
    if body.startswith(delimiter[2:]):
        at = len(delimiter) - 2
    else:
        found = body.find(delimiter)
        if found < 0:
            raise _bad("file", "the multipart/form-data body has no part")
        at = found + len(delimiter)
    parts: list[_Part] = []
    while not body.startswith(b"--", at):  # "--" after a delimiter closes the body
        if len(parts) == MAX_PARTS:
            raise _bad("file", f"the multipart/form-data body has over {MAX_PARTS} parts")
        head_start = _line_end(body, at)
        head_end = body.find(b"\r\n\r\n", head_start - 2, head_start + MAX_PART_HEADER_BYTES)
        if head_end < 0:
            raise _bad(
                "file", f"a part's headers are not closed within {MAX_PART_HEADER_BYTES} bytes"
            )
        data_start = head_end + 4
        end = _next_delimiter(body, delimiter, data_start)
        parts.append(_Part(_part_params(body[head_start:head_end]), data_start, end))
        at = end + len(delimiter)
    return parts


def _line_end(body: bytes, at: int) -> int:
    """Returns where the line after a delimiter starts (only spaces and tabs may follow
    a delimiter on its line: RFC 2046's transport padding)."""
    eol = body.find(b"\r\n", at, at + MAX_PART_HEADER_BYTES)
    if eol < 0 or body[at:eol].strip(b" \t"):
        raise _bad("file", "the multipart/form-data body is malformed")
    return eol + 2


def _next_delimiter(body: bytes, delimiter: bytes, start: int) -> int:
    """Returns where the delimiter that ends a part starts. A boundary never occurs in
    a part's data (RFC 2046; clients pick a random one): the first one found ends
    the part, and the caller refuses it when it is no delimiter (other text after it)."""
    found = body.find(delimiter, start)
    if found < 0:
        raise _bad("file", "the multipart/form-data body is not closed by its boundary")
    return found


def parse_upload(content_type: str, body: bytes, max_bytes: int) -> Upload:
    """Reads a multipart/form-data upload (`purpose` and `file`), as OpenAI's SDKs send it.
    Other fields (the SDK's optional `expires_after[...]`) are ignored. It takes a few
    passes over the body: call it off the event loop.

    Raises:
        InvalidArgument: naming the field that is missing, too large or not allowed.
    """
    purpose, filename, data = "", "", None
    for part in _split(body, _boundary(content_type)):
        name = part.params.get("name")
        if name == "purpose":
            purpose = body[part.start : part.end].decode("utf-8", "replace").strip()
        elif name == "file":
            if data is not None:
                raise _bad("file", "is sent more than once")
            if part.end - part.start > max_bytes:
                raise _bad(
                    "file", f"is {part.end - part.start} bytes; at most {max_bytes} are accepted"
                )
            filename, data = _filename(part.params), body[part.start : part.end]
    if data is None:
        raise _bad("file", "is required")
    if purpose != PURPOSE:
        raise _bad("purpose", f"must be {PURPOSE!r} (the only purpose served)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("file", "must be JSON Lines in UTF-8") from None
    return Upload(purpose, filename[:256], data)


def _filename(params: dict[str, str]) -> str:
    """Returns a file part's name: RFC 5987's `filename*` (charset''percent-encoded)
    before `filename`, "upload.jsonl" without either."""
    charset, _, encoded = params.get("filename*", "").partition("'")
    encoded = encoded.partition("'")[2]  # after the language
    if encoded:
        try:
            return urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            pass
    return params.get("filename") or "upload.jsonl"


class FileStore:
    """FileStore keeps uploaded files in Redis.

    Args:
        client: the AOF Redis.
        retention_s: how long an upload is kept.
    """

    def __init__(self, client: aioredis.Redis, retention_s: int) -> None:
        self.redis = client
        self.retention_s = retention_s

    async def create(self, owner: str, upload: Upload) -> StoredFile:
        """Stores an upload; returns its record."""
        created_ms = now_ms()
        stored = StoredFile(
            new_file_id(),
            owner,
            upload.purpose,
            upload.filename,
            len(upload.data),
            created_ms,
            created_ms + self.retention_s * 1000,
        )
        key = file_key(stored.file_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "owner": owner,
                    "purpose": stored.purpose,
                    "filename": stored.filename,
                    "bytes": stored.size,
                    "created_ms": stored.created_ms,
                    "expires_ms": stored.expires_ms,
                    "data": upload.data,
                },
            )
            pipe.expire(key, self.retention_s)
            await pipe.execute()
        return stored

    async def get(self, file_id: str, owner: str) -> StoredFile | None:
        """Returns an owner's file (None when there is none, or it is another owner's)."""
        raw: Any = await self.redis.hmget(
            file_key(file_id),
            ["owner", "purpose", "filename", "bytes", "created_ms", "expires_ms"],
        )
        if raw[0] is None or text(raw[0]) != owner:
            return None
        created_ms = int(raw[4] or 0)
        # As the key's TTL was set (an upload from before it was kept: the retention now).
        expires_ms = int(raw[5] or 0) or created_ms + self.retention_s * 1000
        return StoredFile(
            file_id, owner, text(raw[1]), text(raw[2]), int(raw[3] or 0), created_ms, expires_ms
        )

    async def content(self, file_id: str) -> bytes:
        """Returns a file's bytes (b"" when it is gone)."""
        raw: Any = await self.redis.hget(file_key(file_id), "data")
        return bytes(raw or b"")

    async def delete(self, file_id: str) -> None:
        """Deletes a file."""
        await self.redis.delete(file_key(file_id))
