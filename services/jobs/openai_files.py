"""OpenAI's files for batches: multipart uploads read, kept in the AOF Redis.

An upload is one hash (`tm:jobs:file:<id>`: owner, purpose, filename, size,
creation time and the bytes), kept for the jobs' retention; its owner is
the uploading key's tenant (or the key, without a tenant), as OpenAI's files
belong to an organisation. Only purpose "batch" is accepted, JSON Lines in
UTF-8 of at most `max_bytes` (TOKENMESH_OPENAI_FILE_MAX_BYTES).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import redis.asyncio as aioredis

from services.core.errors import FieldViolation, InvalidArgument
from services.core.redis_service import text
from services.jobs.store import PREFIX, now_ms

PURPOSE = "batch"
FILE_ID_PREFIX = "file-"


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

    def to_json(self) -> dict[str, Any]:
        """Returns OpenAI's file object."""
        return file_object(self.file_id, self.size, self.created_ms, self.filename, self.purpose)


def file_object(
    file_id: str, size: int, created_ms: int, filename: str, purpose: str
) -> dict[str, Any]:
    """Returns OpenAI's file object (every file is "processed" once stored)."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_ms // 1000,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def _parts(content_type: str, body: bytes) -> list[EmailMessage]:
    if not content_type.lower().startswith("multipart/form-data"):
        raise _bad("file", "upload the file as multipart/form-data (fields purpose and file)")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise _bad("file", "is not a multipart/form-data body")
    return [part for part in message.iter_parts() if isinstance(part, EmailMessage)]


def parse_upload(content_type: str, body: bytes, max_bytes: int) -> Upload:
    """Reads a multipart/form-data upload (`purpose` and `file`), as OpenAI's SDKs send it.

    Raises:
        InvalidArgument: naming the field that is missing, too large or not allowed.
    """
    purpose, filename, data = "", "", None
    for part in _parts(content_type, body):
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        if name == "purpose":
            purpose = payload.decode("utf-8", "replace").strip()
        elif name == "file":
            filename, data = part.get_filename() or "upload.jsonl", payload
    if data is None:
        raise _bad("file", "is required")
    if purpose != PURPOSE:
        raise _bad("purpose", f"must be {PURPOSE!r} (the only purpose served)")
    if len(data) > max_bytes:
        raise _bad("file", f"is {len(data)} bytes; at most {max_bytes} are accepted")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("file", "must be JSON Lines in UTF-8") from None
    return Upload(purpose, filename[:256], data)


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
        stored = StoredFile(
            new_file_id(), owner, upload.purpose, upload.filename, len(upload.data), now_ms()
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
                    "data": upload.data,
                },
            )
            pipe.expire(key, self.retention_s)
            await pipe.execute()
        return stored

    async def get(self, file_id: str, owner: str) -> StoredFile | None:
        """Returns an owner's file (None when there is none, or it is another owner's)."""
        raw: Any = await self.redis.hmget(
            file_key(file_id), ["owner", "purpose", "filename", "bytes", "created_ms"]
        )
        if raw[0] is None or text(raw[0]) != owner:
            return None
        return StoredFile(
            file_id, owner, text(raw[1]), text(raw[2]), int(raw[3] or 0), int(raw[4] or 0)
        )

    async def content(self, file_id: str) -> bytes:
        """Returns a file's bytes (b"" when it is gone)."""
        raw: Any = await self.redis.hget(file_key(file_id), "data")
        return bytes(raw or b"")

    async def delete(self, file_id: str) -> None:
        """Deletes a file."""
        await self.redis.delete(file_key(file_id))
