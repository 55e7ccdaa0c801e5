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

What an owner keeps (its uploads and its batches' records) is charged to its
storage ledger (`StorageLedger`), within a `StorageQuota`: without one a single
key could fill the AOF Redis that every service shares (8 MiB an upload, and
an upload's custom_ids copied into every batch made of it, each kept for the
retention, at no token cost). An object is charged in the same script or
transaction that writes it, and until it is deleted or expires.
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.core.errors import FieldViolation, InvalidArgument, ResourceExhausted
from services.core.redis_service import text
from services.jobs.store import (
    FILE_KEY_PREFIX,
    LEDGER_FUNCTIONS,
    PREFIX,
    items_key,
    ledger_key,
    ledger_sizes_key,
    now_ms,
    results_key,
)

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
    return f"{FILE_KEY_PREFIX}{file_id}"


def new_file_id() -> str:
    """Returns a fresh file id: "file-" + 24 hex digits."""
    return FILE_ID_PREFIX + secrets.token_hex(12)


# OpenAI's expires_after: anchored at the upload's creation, 1 hour to 30 days.
EXPIRES_AFTER_ANCHOR = "created_at"
EXPIRES_AFTER_MIN_S = 3600
EXPIRES_AFTER_MAX_S = 30 * 24 * 3600
_ANCHOR_FIELD = "expires_after[anchor]"
_SECONDS_FIELD = "expires_after[seconds]"


@dataclass(frozen=True)
class Upload:
    """Upload is a multipart upload's fields: the purpose, the file's name and bytes,
    and how long after its creation it is to be deleted (None: the retention)."""

    purpose: str
    filename: str
    data: bytes
    expires_after_s: int | None = None


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
    """Reads a multipart/form-data upload (`purpose` and `file`, the optional
    `expires_after[anchor]` and `expires_after[seconds]`), as OpenAI's SDKs send it.
    Other fields are ignored. It takes a few passes over the body: call it off the
    event loop.

    Raises:
        InvalidArgument: naming the field that is missing, too large or not allowed.
    """
    filename, data = "", None
    fields: dict[str, str] = {}
    for part in _split(body, _boundary(content_type)):
        name = part.params.get("name")
        if name in ("purpose", _ANCHOR_FIELD, _SECONDS_FIELD):
            fields[name] = body[part.start : part.end].decode("utf-8", "replace").strip()
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
    purpose = fields.get("purpose", "")
    if purpose != PURPOSE:
        raise _bad("purpose", f"must be {PURPOSE!r} (the only purpose served)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("file", "must be JSON Lines in UTF-8") from None
    return Upload(purpose, filename[:256], data, _expires_after(fields))


def _expires_after(fields: Mapping[str, str]) -> int | None:
    """Returns an upload's expires_after[seconds] (None when it sent neither field),
    as OpenAI accepts it: anchored at `created_at`, 1 hour to 30 days."""
    anchor, seconds = fields.get(_ANCHOR_FIELD), fields.get(_SECONDS_FIELD)
    if anchor is None and seconds is None:
        return None
    if anchor != EXPIRES_AFTER_ANCHOR:
        raise _bad(_ANCHOR_FIELD, f"must be {EXPIRES_AFTER_ANCHOR!r} (with expires_after[seconds])")
    bounds = f"an integer from {EXPIRES_AFTER_MIN_S} to {EXPIRES_AFTER_MAX_S}"
    if seconds is None or not seconds.isdigit():
        raise _bad(_SECONDS_FIELD, f"must be {bounds}")
    value = int(seconds)
    if not EXPIRES_AFTER_MIN_S <= value <= EXPIRES_AFTER_MAX_S:
        raise _bad(_SECONDS_FIELD, f"must be {bounds}")
    return value


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


# -- what an owner keeps stored ----------------------------------------------


@dataclass(frozen=True)
class StorageQuota:
    """StorageQuota is what one owner (a tenant, or a key without one) may keep at once.

    Attributes:
        max_bytes: its uploads' bytes and its batches' records together
            (TOKENMESH_OPENAI_STORAGE_BYTES_PER_OWNER).
        max_files: its uploads (TOKENMESH_OPENAI_FILES_PER_OWNER).
    """

    max_bytes: int = 64 * 1024 * 1024
    max_files: int = 100


# The reason of a refusal (OpenAI's error `code`: "storage_quota_exceeded").
QUOTA_REASON = "STORAGE_QUOTA_EXCEEDED"
# How long a batch's reservation holds before its record is written with it (the
# creating transaction then moves it onto the record; a creation that failed
# leaves it to expire).
RESERVATION_MS = 60_000
# A record's charge is lowered only when it expires this much sooner (its TTL is
# read a moment after the charge was set).
SETTLE_SLACK_MS = 1000


# KEYS: ledger, sizes, the file's hash. ARGV: now, bytes, until ms, retention s, max
# bytes, max files, then the file's fields and values. Stores an upload if the
# quota allows it: the check and the write are one step, so two uploads at once
# cannot both pass on the same room.
_STORE_FILE = """
local now = tonumber(ARGV[1])
local answer = reserve(KEYS[3], tonumber(ARGV[2]), tonumber(ARGV[3]), now,
                       tonumber(ARGV[5]), tonumber(ARGV[6]))
if answer[1] == 'ok' then
  redis.call('HSET', KEYS[3], unpack(ARGV, 7))
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return answer
"""

# KEYS: ledger, sizes. ARGV: now, id, bytes, until ms, max bytes.
_RESERVE = """
local now = tonumber(ARGV[1])
return reserve(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), now, tonumber(ARGV[5]), 0)
"""

# KEYS: ledger, sizes. ARGV: now, reservation id, then (object's key, until ms,
# bytes) for each object written in the same transaction. Moves a reservation onto
# them; one that expired meanwhile is charged anew (they are written either way).
_CONFIRM = """
forget(ARGV[2])
for i = 3, #ARGV, 3 do
  charge(ARGV[i], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 1]), tonumber(ARGV[1]))
end
return 1
"""

# KEYS: ledger, sizes, and optionally an object to delete with its charge. ARGV: id.
_FORGET = """
forget(ARGV[1])
if KEYS[3] then redis.call('DEL', KEYS[3]) end
return 1
"""

# KEYS: ledger, sizes. ARGV: pairs of (id, until ms; 0: the object is gone).
# Lowers when objects go to when they go now (never raises it: an XX LT update).
_SETTLE = """
for i = 1, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) == 0 then
    forget(ARGV[i])
  else
    redis.call('ZADD', KEYS[1], 'XX', 'LT', ARGV[i + 1], ARGV[i])
  end
end
return 1
"""


class StorageLedger:
    """StorageLedger charges what each owner keeps against its quota, atomically.

    A batch's record is charged until the latest it may expire (its window, a
    stop's grace and the retention); a batch that ends earlier keeps its record
    only the retention after it ended. So when an owner is refused, its records
    are charged until they really go (`settle`), and it is tried again.

    Args:
        client: the AOF Redis.
        quota: what each owner may keep.
    """

    def __init__(self, client: aioredis.Redis, quota: StorageQuota) -> None:
        self.redis = client
        self.quota = quota
        functions = "local LEDGER, SIZES = KEYS[1], KEYS[2]\n" + LEDGER_FUNCTIONS
        self._store_file = client.register_script(functions + _STORE_FILE)
        self._reserve = client.register_script(functions + _RESERVE)
        self._confirm = client.register_script(functions + _CONFIRM)
        self._forget = client.register_script(functions + _FORGET)
        self._settle = client.register_script(functions + _SETTLE)

    @staticmethod
    def _keys(owner: str) -> list[str]:
        return [ledger_key(owner), ledger_sizes_key(owner)]

    async def store_file(
        self, owner: str, key: str, size: int, retention_s: int, fields: Mapping[str, Any]
    ) -> None:
        """Writes a file's hash (for `retention_s`) and charges it, or neither.

        Raises:
            ResourceExhausted: the owner keeps the most files or bytes it may.
        """
        flat: list[Any] = [value for pair in fields.items() for value in pair]

        async def attempt() -> list[Any]:
            now = now_ms()
            args = [now, size, now + retention_s * 1000, retention_s, *self._limits(), *flat]
            answer: list[Any] = await self._store_file(keys=[*self._keys(owner), key], args=args)
            return answer

        await self._within_quota(owner, "upload", size, attempt)

    async def reserve(self, owner: str, size: int, what: str = "batch") -> str:
        """Reserves `size` bytes for a record about to be written (`queue_confirm` in its
        transaction); returns the reservation's id. `what` names the record in a
        refusal ("batch", "job").

        Raises:
            ResourceExhausted: the owner keeps the most bytes it may.
        """
        token = f"{PREFIX}reserved:{secrets.token_hex(8)}"

        async def attempt() -> list[Any]:
            now = now_ms()
            args: list[Any] = [now, token, size, now + RESERVATION_MS, self.quota.max_bytes]
            answer: list[Any] = await self._reserve(keys=self._keys(owner), args=args)
            return answer

        await self._within_quota(owner, what, size, attempt)
        return token

    def queue_confirm(
        self, pipe: Any, owner: str, token: str, charges: Sequence[tuple[str, int, int]]
    ) -> None:
        """Queues into the objects' creating transaction the move of their reservation
        onto them: each (key, bytes, until ms) charged until then."""
        # Queued as the pipeline's own EVALSHA (JobStore.create's `also` queues, it does
        # not await); the pipeline loads its scripts before the transaction.
        pipe.scripts.add(self._confirm)
        keys = self._keys(owner)
        triples = [value for key, size, until in charges for value in (key, until, size)]
        pipe.evalsha(self._confirm.sha, len(keys), *keys, now_ms(), token, *triples)

    async def release(self, owner: str, token: str) -> None:
        """Drops a reservation no record was written for (else it expires)."""
        await self._forget(keys=self._keys(owner), args=[token])

    async def written_or_released(
        self, owner: str, token: str, write: Callable[[], Awaitable[tuple[str, bool]]]
    ) -> tuple[str, bool]:
        """Runs `write` (it moves the reservation onto what it writes, in its transaction)
        and returns what it returns: (the id, whether this call wrote it). The
        reservation is released when nothing was written: `write` raised (refused, or
        failed), or found its record made already (an idempotency key's, a lost
        reply's). Held for a minute instead, a client looping on a reused key filled
        its own quota."""
        try:
            made, written = await write()
        except BaseException:
            await self.release(owner, token)
            raise
        if not written:
            await self.release(owner, token)
        return made, written

    async def delete(self, owner: str, key: str) -> None:
        """Deletes an object and its charge together."""
        await self._forget(keys=[*self._keys(owner), key], args=[key])

    def _limits(self) -> tuple[int, int]:
        return self.quota.max_bytes, self.quota.max_files

    async def _within_quota(
        self, owner: str, what: str, size: int, attempt: Callable[[], Awaitable[list[Any]]]
    ) -> None:
        answer = await attempt()
        if text(answer[0]) != "ok" and await self.settle(owner):
            answer = await attempt()
        if text(answer[0]) != "ok":
            raise _refusal(owner, what, size, text(answer[0]), int(answer[1]), int(answer[2]))

    async def settle(self, owner: str) -> bool:
        """Charges each batch record of an owner until it expires now (a batch that
        ended keeps its record only the retention after that), and forgets those
        that are gone; returns whether any changed. Only on a refusal: it reads
        each record's TTL, which costs less than the refused request's parse."""
        raw: Any = await self.redis.zrangebyscore(
            ledger_key(owner), now_ms(), "+inf", withscores=True
        )
        charged = [(text(m), int(s)) for m, s in raw if _settled(text(m))]
        if not charged:
            return False
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, _ in charged:
                pipe.pttl(key)
            left: list[int] = await pipe.execute()
        now = now_ms()
        pairs: list[Any] = []
        for (key, until), ms in zip(charged, left, strict=True):
            if ms == -2:
                pairs += [key, 0]
            elif 0 <= ms and now + ms < until - SETTLE_SLACK_MS:
                pairs += [key, now + ms]
        if pairs:
            await self._settle(keys=self._keys(owner), args=pairs)
        return bool(pairs)


# The records `settle` looks at: batches' (openai_batches.batch_key), and their jobs'
# items (store.items_key: deleted when the job ends) and results (store.results_key:
# kept the retention after it ended).
RECORD_PREFIX = f"{PREFIX}batch:"
_ITEMS_PREFIX, _, _ITEMS_SUFFIX = items_key("\0").partition("\0")
_RESULTS_PREFIX, _, _RESULTS_SUFFIX = results_key("\0").partition("\0")


def _settled(member: str) -> bool:
    """Whether `settle` lowers a member's charge to when its key goes."""
    return member.startswith(RECORD_PREFIX) or any(
        member.startswith(prefix) and member.endswith(suffix)
        for prefix, suffix in ((_ITEMS_PREFIX, _ITEMS_SUFFIX), (_RESULTS_PREFIX, _RESULTS_SUFFIX))
    )


def _size_text(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB" if size >= 1024 * 1024 else f"{size} bytes"


def _refusal(
    owner: str, what: str, size: int, limit: str, used: int, most: int
) -> ResourceExhausted:
    who = "tenant" if owner.startswith("t.") else "key"
    if limit == "files":
        message = (
            f"this {who} keeps {used} uploaded files, the most it may "
            "(TOKENMESH_OPENAI_FILES_PER_OWNER): delete one (DELETE /files/{file_id}) "
            "or wait until one expires"
        )
    else:
        message = (
            f"this {who}'s files, batches and unfinished jobs keep {_size_text(used)} of the "
            f"{_size_text(most)} it may store (TOKENMESH_OPENAI_STORAGE_BYTES_PER_OWNER); "
            f"this {what} needs {_size_text(size)} more: delete files (DELETE "
            "/files/{file_id}), or wait until jobs end and files and ended batches expire"
        )
    return ResourceExhausted(message, reason=QUOTA_REASON)


_RECORD_FIELDS = ["owner", "purpose", "filename", "bytes", "created_ms", "expires_ms"]


class FileStore:
    """FileStore keeps uploaded files in Redis.

    Args:
        client: the AOF Redis.
        retention_s: how long an upload is kept.
    """

    def __init__(
        self, client: aioredis.Redis, retention_s: int, ledger: StorageLedger | None = None
    ) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.ledger = ledger or StorageLedger(client, StorageQuota())

    async def create(self, owner: str, upload: Upload) -> StoredFile:
        """Stores an upload; returns its record.

        Raises:
            ResourceExhausted: the owner keeps the most files or bytes it may.
        """
        created_ms = now_ms()
        # Its expires_after, within the retention (longer is kept the retention: the
        # file object's expires_at says which).
        kept_s = min(upload.expires_after_s or self.retention_s, self.retention_s)
        stored = StoredFile(
            new_file_id(),
            owner,
            upload.purpose,
            upload.filename,
            len(upload.data),
            created_ms,
            created_ms + kept_s * 1000,
        )
        fields = {
            "owner": owner,
            "purpose": stored.purpose,
            "filename": stored.filename,
            "bytes": stored.size,
            "created_ms": stored.created_ms,
            "expires_ms": stored.expires_ms,
            "data": upload.data,
        }
        await self.ledger.store_file(owner, file_key(stored.file_id), stored.size, kept_s, fields)
        return stored

    async def get(self, file_id: str, owner: str) -> StoredFile | None:
        """Returns an owner's file (None when there is none, or it is another owner's)."""
        raw: Any = await self.redis.hmget(file_key(file_id), _RECORD_FIELDS)
        return self._decoded(file_id, owner, raw)

    async def listed(self, owner: str) -> list[StoredFile]:
        """Returns an owner's uploads, in no order: its ledger names each one (at most
        `StorageQuota.max_files`), so no key is scanned."""
        now = now_ms()
        members: Any = await self.redis.zrangebyscore(ledger_key(owner), now, "+inf")
        prefix = file_key("")
        ids = [text(m)[len(prefix) :] for m in members if text(m).startswith(prefix)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.hmget(file_key(file_id), _RECORD_FIELDS)
            replies: list[Any] = await pipe.execute()
        found = (self._decoded(i, owner, raw) for i, raw in zip(ids, replies, strict=True))
        return [stored for stored in found if stored is not None]

    def _decoded(self, file_id: str, owner: str, raw: Sequence[Any]) -> StoredFile | None:
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

    async def delete(self, file_id: str, owner: str) -> None:
        """Deletes an owner's file, and its charge to the owner's storage."""
        await self.ledger.delete(owner, file_key(file_id))
