"""OpenAI batches mapped onto jobs: input lines to v2 items, results to output files.

Each line of a batch's input file is OpenAI's request line
`{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body"}`;
its body is read by the OpenAI surface's own parser
(services.inference.openai.params), so a batch line means exactly what the
same body means at /openai/v1, and becomes one v2 item of a job (a legacy
completion line takes one prompt). Results come back through the surface's
own shapes (services.inference.openai.shapes) as OpenAI's output lines
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.

A batch is a hash (`tm:jobs:batch:<id>`) next to its job: the endpoint, the
input file, the metadata and each line's custom_id and response options
(`lines`: up to ~8 MB, read only to write the result files), and once a
result file's size was asked for, both files' sizes (`output_bytes`,
`error_bytes`: final with the job, so computed once);
the batch id, the job id and the output and error file ids share one hex
part (`batch_<hex>`, `job-<hex>`, `file-<hex>-output`, `file-<hex>-errors`).
Status, counts and times are read from the job, so a batch is exactly as
far as its job, and it lives as long: its record expires with the job, its
job's retention after the job ended (store.py's `finish`).

An owner's batches are listed from `tm:jobs:batches:<owner>` (a zset by
creation time). A list drops the members whose batch is gone; a new batch
drops the members older than any batch can live, and the zset expires as its
newest batch would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from services.core.errors import FieldViolation, InvalidArgument, TokenmeshError
from services.core.redis_service import text
from services.inference.openai import errors as openai_errors
from services.inference.openai import params, shapes
from services.inference.v2 import validation as v2_validation
from services.jobs.store import (
    CANCELLED,
    CANCELLING,
    EXPIRED,
    FAILED,
    FINAL,
    FIRST_PAGE_MS,
    KEY_EXPIRED,
    KEY_REVOKED,
    PAGE_AFTER,
    PREFIX,
    STOP_GRACE_S,
    SUCCEEDED,
    JobRecord,
    now_ms,
    page_after,
    request_id,
)
from services.jobs.validation import MAX_WINDOW_S
from tokenmesh.jobs.v1 import jobs_pb2

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
# The OpenAI names of an endpoint's v2 input fields (an item error's `param`).
_RENAMES = {
    CHAT: params.Renames(input="messages"),
    COMPLETIONS: params.Renames(input="prompt"),
    EMBEDDINGS: params.Renames(input="input"),
}
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)
COMPLETION_WINDOW = "24h"
BATCH_PREFIX, JOB_PREFIX, FILE_PREFIX = "batch_", "job-", "file-"
OUTPUT_SUFFIX, ERRORS_SUFFIX = "-output", "-errors"
MAX_METADATA = 16
# The first bad lines a refused batch names (a status must stay small).
MAX_LINE_ERRORS = 10
# Job status -> OpenAI batch status (validation happens before the batch exists).
BATCH_STATUS = {
    "QUEUED": "in_progress",
    "RUNNING": "in_progress",
    CANCELLING: "cancelling",  # requests in flight are being stopped
    SUCCEEDED: "completed",
    FAILED: "completed",  # every request failed: OpenAI still completes the batch
    CANCELLED: "cancelled",
    EXPIRED: "expired",
}
# What a request the batch never ran says in the error file, by its job's
# (status, stop_reason).
NEVER_RAN = {
    (CANCELLED, ""): ("batch_cancelled", "This request was not run: the batch was cancelled."),
    (CANCELLED, KEY_REVOKED): (
        "key_revoked",
        "This request was not run: the API key that created the batch was revoked.",
    ),
    (CANCELLED, KEY_EXPIRED): (
        "key_expired",
        "This request was not run: the API key that created the batch expired.",
    ),
    (EXPIRED, ""): (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
}
# gRPC code -> HTTP status (as the edge's transcoder maps them).
HTTP_STATUS = {
    1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429,
    9: 400, 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}  # fmt: skip


def batch_key(batch_id: str) -> str:
    """Returns the hash of a batch."""
    return f"{PREFIX}batch:{batch_id}"


def owner_batches_key(owner: str) -> str:
    """Returns the zset of an owner's batches by creation time."""
    return f"{PREFIX}batches:{owner}"


def hex_of(job_id: str) -> str:
    """Returns the hex part a job shares with its batch and files."""
    return job_id.removeprefix(JOB_PREFIX)


def batch_id_of(job_id: str) -> str:
    """Returns the id of the batch a job runs."""
    return BATCH_PREFIX + hex_of(job_id)


def job_id_of(batch_id: str) -> str:
    """Returns the id of a batch's job."""
    return JOB_PREFIX + batch_id.removeprefix(BATCH_PREFIX)


def result_file_ids(batch_id: str) -> tuple[str, str]:
    """Returns the ids of a batch's output file and error file."""
    stem = FILE_PREFIX + batch_id.removeprefix(BATCH_PREFIX)
    return stem + OUTPUT_SUFFIX, stem + ERRORS_SUFFIX


def result_file_batch(file_id: str) -> tuple[str, bool] | None:
    """Returns (batch id, is the error file) of a result file id; None for an upload."""
    for suffix, errors in ((OUTPUT_SUFFIX, False), (ERRORS_SUFFIX, True)):
        if file_id.startswith(FILE_PREFIX) and file_id.endswith(suffix):
            return BATCH_PREFIX + file_id[len(FILE_PREFIX) : -len(suffix)], errors
    return None


# -- the request -----------------------------------------------------------


@dataclass(frozen=True)
class BatchRequest:
    """BatchRequest is a CreateBatch body, read."""

    input_file_id: str
    endpoint: str
    metadata: dict[str, str]


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def _json(raw: bytes, field: str) -> Any:
    """Parses a client's JSON as the OpenAI routes do (params.client_json)."""
    return params.client_json(raw, field)


def parse_batch_request(raw: bytes) -> BatchRequest:
    """Reads a CreateBatch body; raises InvalidArgument naming OpenAI's parameters."""
    body = _json(raw, "body")
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object")
    out: list[FieldViolation] = []
    known = {"input_file_id", "endpoint", "completion_window", "metadata"}
    out += [FieldViolation(k, "is not a supported parameter") for k in sorted(set(body) - known)]
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        out.append(FieldViolation("input_file_id", "is required"))
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        out.append(FieldViolation("endpoint", f"must be one of {', '.join(ENDPOINTS)}"))
    if body.get("completion_window") != COMPLETION_WINDOW:
        out.append(FieldViolation("completion_window", f"must be {COMPLETION_WINDOW!r}"))
    metadata = body.get("metadata") or {}
    if not _valid_metadata(metadata):
        out.append(
            FieldViolation(
                "metadata",
                f"must be at most {MAX_METADATA} string pairs "
                "(keys up to 64 characters, values up to 512)",
            )
        )
    if out:
        raise InvalidArgument(out)
    return BatchRequest(str(input_file_id), str(endpoint), dict(metadata))


def _valid_metadata(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= MAX_METADATA
        and all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    )


# -- input lines -----------------------------------------------------------


@dataclass(frozen=True)
class BatchLine:
    """BatchLine is one input line: its custom_id, its v2 item and its response options.

    Attributes:
        options: what shapes the response beyond the v2 answer: `logprobs`
            (legacy completions), `base64` and `dimensions` (embeddings).
    """

    custom_id: str
    item: jobs_pb2.JobItem
    options: Mapping[str, Any]


def _line_item(endpoint: str, body: bytes) -> tuple[jobs_pb2.JobItem, dict[str, Any]]:
    """Maps one body onto a v2 item with the OpenAI surface's parser and v2's rules."""
    if endpoint == EMBEDDINGS:
        call = params.parse_embedding(body)
        v2_validation.validate_embed(call.request)
        options = {"base64": call.base64, "dimensions": call.dimensions}
        return jobs_pb2.JobItem(embed=call.request), options
    generation = params.parse_chat(body) if endpoint == CHAT else params.parse_completion(body)
    if generation.stream:
        raise _bad("stream", "must be false in a batch")
    requests = generation.complete_requests()
    if len(requests) != 1:
        raise _bad("prompt", "a batch line takes one prompt (write one line per prompt)")
    try:
        v2_validation.validate_generation(requests[0])
    except InvalidArgument as bad:
        raise openai_errors.renamed(bad, generation.renames) from None
    return jobs_pb2.JobItem(complete=requests[0]), {"logprobs": generation.logprobs}


def _read_line(number: int, raw: bytes, endpoint: str, seen: set[str]) -> BatchLine:
    line = _json(raw, f"line {number}")
    if not isinstance(line, dict):
        raise _bad(f"line {number}", "must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _bad(f"line {number}.custom_id", "is required (a string)")
    if custom_id in seen:
        raise _bad(f"line {number}.custom_id", f"{custom_id!r} is used by an earlier line")
    if line.get("method", "POST") != "POST":
        raise _bad(f"line {number}.method", "must be POST")
    if line.get("url") != endpoint:
        raise _bad(f"line {number}.url", f"must be the batch's endpoint {endpoint}")
    if not isinstance(line.get("body"), dict):
        raise _bad(f"line {number}.body", "must be a JSON object")
    try:
        item, options = _line_item(endpoint, json.dumps(line["body"]).encode())
    except InvalidArgument as bad:
        raise InvalidArgument(
            [FieldViolation(f"line {number}.body.{v.field}", v.description) for v in bad.violations]
        ) from None
    seen.add(custom_id)
    return BatchLine(custom_id, item, options)


def parse_input(data: bytes, endpoint: str, max_lines: int) -> list[BatchLine]:
    """Reads an input file's lines (1-based numbers in errors; blank lines skipped).

    Raises:
        InvalidArgument: naming the first bad lines (up to MAX_LINE_ERRORS).
    """
    # Counted before any line is parsed: a file of many small lines was parsed whole
    # (seconds for ~70,000) before it was refused for holding too many. A UTF-8 BOM
    # (Windows tools write one) opens the file, not its first request.
    raws = data.removeprefix(b"\xef\xbb\xbf").splitlines()
    if sum(1 for raw in raws if raw.strip()) > max_lines:
        raise _bad("input_file_id", f"the file must hold 1-{max_lines} requests")
    lines: list[BatchLine] = []
    out: list[FieldViolation] = []
    seen: set[str] = set()
    for number, raw in enumerate(raws, start=1):
        if not raw.strip():
            continue
        try:
            lines.append(_read_line(number, raw, endpoint, seen))
        except InvalidArgument as bad:
            out.extend(bad.violations)
            if len(out) >= MAX_LINE_ERRORS:
                break
    if out:
        raise InvalidArgument(out[:MAX_LINE_ERRORS], reason="INVALID_BATCH_INPUT")
    if not 1 <= len(lines) <= max_lines:
        raise _bad("input_file_id", f"the file must hold 1-{max_lines} requests")
    return lines


# -- the stored batch ------------------------------------------------------


@dataclass(frozen=True)
class BatchRecord:
    """BatchRecord is a batch's hash, decoded.

    Attributes:
        lines: each line's [custom_id, options], in item order; empty unless read
            (BatchStore.get's `lines`: only the result files need them).
    """

    batch_id: str
    owner: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str]
    created_ms: int
    lines: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        """Returns the id of the batch's job."""
        return job_id_of(self.batch_id)


@dataclass(frozen=True)
class ResultSizes:
    """ResultSizes is the bytes of an ended batch's output file and error file."""

    output_bytes: int
    error_bytes: int


# KEYS: the batch's hash. ARGV: output bytes, error bytes. Only into a record that
# is there (the sizes of a batch that is gone must not make its hash again).
_KEEP_SIZES = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'output_bytes', ARGV[1], 'error_bytes', ARGV[2])
end
return 1
"""


# The longest a batch lives: its window, a cancel's grace, then its retention.
def _lifetime_s(retention_s: int) -> int:
    return int(MAX_WINDOW_S) + STOP_GRACE_S + retention_s


class BatchStore:
    """BatchStore keeps batches' records next to their jobs.

    Args:
        client: the AOF Redis.
        retention_s: how long a finished batch is kept (its job's retention).
    """

    def __init__(self, client: aioredis.Redis, retention_s: int) -> None:
        self.redis = client
        self.retention_s = retention_s
        self._page = client.register_script(PAGE_AFTER)
        self._keep_sizes = client.register_script(_KEEP_SIZES)

    def queue_creation(
        self,
        pipe: Any,
        job_id: str,
        owner: str,
        request: BatchRequest,
        lines: Sequence[BatchLine],
        deadline_ms: int,
    ) -> str:
        """Queues the record of the batch a job runs into `pipe` (the job's creating
        transaction: JobStore.create's `also`, so neither exists without the other);
        returns the batch's id."""
        batch_id = batch_id_of(job_id)
        created = now_ms()
        # Until its job ends, which then sets both to the retention: a stopped job
        # ends up to STOP_GRACE_S after its deadline (the record died first).
        ttl_s = max(1, (deadline_ms - created) // 1000) + STOP_GRACE_S + self.retention_s
        pipe.hset(
            batch_key(batch_id),
            mapping={
                "owner": owner,
                "endpoint": request.endpoint,
                "input_file_id": request.input_file_id,
                "metadata": json.dumps(request.metadata),
                "created_ms": created,
                "lines": json.dumps([[line.custom_id, line.options] for line in lines]),
            },
        )
        pipe.expire(batch_key(batch_id), ttl_s)
        index = owner_batches_key(owner)
        pipe.zadd(index, {batch_id: created})
        # The index kept every batch an owner ever made, and never expired.
        lifetime_s = _lifetime_s(self.retention_s)
        pipe.zremrangebyscore(index, "-inf", created - lifetime_s * 1000)
        pipe.expire(index, lifetime_s)
        return batch_id

    async def get(self, batch_id: str, owner: str, lines: bool = False) -> BatchRecord | None:
        """Returns an owner's batch (None when there is none, or it is another owner's),
        its `lines` only when asked: a batch object needs only their count (its job's
        total), and GetBatch and ListBatches read every line's custom_id (up to ~8 MB
        a batch, ~800 MB for a list of 100) to count them."""
        if not batch_id.startswith(BATCH_PREFIX):
            return None
        names = ["owner", "endpoint", "input_file_id", "metadata", "created_ms"]
        if lines:
            names.append("lines")
        raw: Any = await self.redis.hmget(batch_key(batch_id), names)
        if raw[0] is None or text(raw[0]) != owner:
            return None
        return BatchRecord(
            batch_id=batch_id,
            owner=owner,
            endpoint=text(raw[1]),
            input_file_id=text(raw[2]),
            metadata=json.loads(raw[3]),
            created_ms=int(raw[4]),
            lines=[(c, o) for c, o in json.loads(raw[5])] if lines else [],
        )

    async def sizes(self, batch_id: str) -> ResultSizes | None:
        """Returns the sizes of a batch's result files (None: not computed yet)."""
        raw: Any = await self.redis.hmget(batch_key(batch_id), ["output_bytes", "error_bytes"])
        if raw[0] is None or raw[1] is None:
            return None
        return ResultSizes(int(raw[0]), int(raw[1]))

    async def keep_sizes(self, batch_id: str, sizes: ResultSizes) -> None:
        """Keeps the sizes of an ended batch's result files in its record (not in one
        that expired meanwhile: an HSET would make it again, without a TTL)."""
        await self._keep_sizes(
            keys=[batch_key(batch_id)], args=[sizes.output_bytes, sizes.error_bytes]
        )

    async def page(
        self, owner: str, after: str, limit: int, place_ms: int | None = None
    ) -> tuple[list[tuple[str, int]], bool]:
        """Returns up to `limit` of an owner's batches (id, created ms), newest first,
        after the batch `after` (created at `place_ms`; read from its record when not
        given), and whether more follow.

        By the batch's place, not its creation time alone: a page that ended at one
        of several batches created in the same millisecond skipped the others. A
        batch no longer listed is followed from its place.

        Raises:
            UnknownCursor: `after` is not listed and its place is not known (it is no
                batch of the owner's, or it is gone): the page started again from the
                newest, and a client paging through read the same batches again.
        """
        if not after:
            place_ms = FIRST_PAGE_MS
        elif place_ms is None:
            place_ms = await self._created_ms(after, owner)
        found = await page_after(self._page, owner_batches_key(owner), after, limit + 1, place_ms)
        return found[:limit], len(found) > limit

    async def _created_ms(self, batch_id: str, owner: str) -> int | None:
        """Returns when an owner's batch was created (None: no such batch of theirs)."""
        raw: Any = await self.redis.hmget(batch_key(batch_id), ["owner", "created_ms"])
        if raw[0] is None or text(raw[0]) != owner or raw[1] is None:
            return None
        return int(raw[1])

    async def forget(self, owner: str, batch_ids: Iterable[str]) -> None:
        """Drops batches whose records expired from an owner's list."""
        gone = list(batch_ids)
        if gone:
            await self.redis.zrem(owner_batches_key(owner), *gone)


# -- the batch object ------------------------------------------------------


def _seconds(millis: int) -> int | None:
    return millis // 1000 if millis else None


def _at(condition: bool, millis: int) -> int | None:
    return _seconds(millis) if condition else None


def batch_object(batch: BatchRecord, job: JobRecord) -> dict[str, Any]:
    """Returns OpenAI's batch object of a batch as far as its job is."""
    status = job.status
    ended = job.number("ended_ms")
    stopping = job.number("stopping_ms") or ended  # a cancel from before it was kept
    output_id, errors_id = result_file_ids(batch.batch_id)
    succeeded, failed = job.number("succeeded"), job.number("failed")
    unrun = job.number("total") - succeeded - failed
    final = status in FINAL
    return {
        "id": batch.batch_id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None,
        "input_file_id": batch.input_file_id,
        "completion_window": COMPLETION_WINDOW,
        "status": BATCH_STATUS.get(status, "in_progress"),
        "output_file_id": output_id if final and succeeded else None,
        "error_file_id": errors_id if final and (failed or unrun) else None,
        "created_at": _seconds(batch.created_ms),
        "in_progress_at": _seconds(batch.created_ms),
        "expires_at": _seconds(job.number("deadline_ms")),
        "finalizing_at": _at(status in (SUCCEEDED, FAILED), ended),
        "completed_at": _at(status in (SUCCEEDED, FAILED), ended),
        "failed_at": None,
        "expired_at": _at(status == EXPIRED, ended),
        "cancelling_at": _at(status in (CANCELLING, CANCELLED), stopping),
        "cancelled_at": _at(status == CANCELLED, ended),
        "request_counts": {"total": job.number("total"), "completed": succeeded, "failed": failed},
        "metadata": batch.metadata or None,
    }


# -- output lines ----------------------------------------------------------


def _body(
    endpoint: str, result: jobs_pb2.JobResult, options: Mapping[str, Any], created: int
) -> dict[str, Any]:
    if result.HasField("embed"):
        dimensions = options.get("dimensions")
        first = result.embed.embeddings[0] if result.embed.embeddings else None
        size = (len(first.values) or len(first.base64) // 4) if first is not None else 0
        # The worker refuses another size before computing (v2 EmbedRequest.dimensions);
        # one from before that field computed the line anyway.
        if dimensions is not None and size and dimensions != size:
            raise _bad("dimensions", f"must be {size} for this model (or left out)")
        return shapes.embeddings(result.embed, bool(options.get("base64")))
    if endpoint == CHAT:
        return shapes.chat_completion(result.complete, created)
    return shapes.text_completion([result.complete], 1, bool(options.get("logprobs")), created)


def _line(batch: BatchRecord, index: int, response: Any, error: Any) -> bytes:
    custom_id = batch.lines[index][0]
    line = {
        "id": f"batch_req_{hex_of(batch.job_id)}_{index}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return shapes.json_bytes(line) + b"\n"


def _error_response(rid: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": rid, "body": body}


def output_line(batch: BatchRecord, result: jobs_pb2.JobResult, created: int) -> tuple[bytes, bool]:
    """Returns a finished item's output line and whether it belongs in the error file."""
    index = result.index
    rid = result.request_id or request_id(batch.job_id, index)
    if result.HasField("error"):
        failure = result.error
        kind = openai_errors.ERROR_TYPES.get(failure.grpc_code, openai_errors.SERVER_ERROR)
        param = params.v2_param(failure.field, _RENAMES[batch.endpoint]) if failure.field else None
        body = shapes.error(failure.message, kind, param, failure.reason.lower() or None)
        status = HTTP_STATUS.get(failure.grpc_code, 500)
        return _line(batch, index, _error_response(rid, status, body), None), True
    try:
        body = _body(batch.endpoint, result, batch.lines[index][1], created)
    except TokenmeshError as bad:
        error = openai_errors.from_error(bad)
        return _line(batch, index, _error_response(rid, 400, error), None), True
    return _line(batch, index, _error_response(rid, 200, body), None), False


def unrun_error(job: JobRecord) -> dict[str, str] | None:
    """Returns the error of the requests a batch will never run (None while they may
    still run, or when it ended having run every one)."""
    reason = job.get("stop_reason") if job.status == CANCELLED else ""
    # A reason this replica does not know (a newer one's) reads as a plain cancel.
    found = NEVER_RAN.get((job.status, reason)) or NEVER_RAN.get((job.status, ""))
    if found is None:
        return None
    code, message = found
    return {"code": code, "message": message}


def unrun_line(batch: BatchRecord, index: int, error: Mapping[str, str]) -> bytes:
    """Returns the error-file line of a request a cancelled or expired batch never ran
    (`error`: `unrun_error` of its job)."""
    return _line(batch, index, None, dict(error))


def result_lines(
    batch: BatchRecord, job: JobRecord, start: int, stored: Sequence[bytes | None]
) -> list[tuple[bytes, bool]]:
    """Returns the result-file lines of the items from `start` on (`stored`: their
    stored results, None where an item has none), each with whether it belongs in the
    error file. `batch` must hold its lines. CPU-bound (~1.4 ms a line of a 3072-dim
    embedding): call it off the event loop."""
    created = job.number("ended_ms") // 1000
    unrun = unrun_error(job)
    out: list[tuple[bytes, bool]] = []
    for index, raw in enumerate(stored, start):
        if raw is None:
            if unrun is not None:
                out.append((unrun_line(batch, index, unrun), True))
            continue
        result = jobs_pb2.JobResult.FromString(raw)
        result.request_id = request_id(batch.job_id, index)
        out.append(output_line(batch, result, created))
    return out
