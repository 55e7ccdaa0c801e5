"""tokenmesh.openai.v1.OpenAIBatchService: OpenAI's files and batches, run as jobs.

A transport adapter: OpenAI's JSON (or multipart) in, OpenAI's bytes out;
the files live in services.jobs.openai_files, the mapping of lines and
results in services.jobs.openai_batches, the work in the job store and its
runners. Errors end the RPC with the gRPC status and OpenAI's error JSON in
`contract.OPENAI_ERROR_HEADER`, which the edge makes the body (as for
tokenmesh.openai.v1.OpenAIService).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from google.api.httpbody_pb2 import HttpBody

from services.core import contract
from services.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from services.core.interceptors import Context, abort_with, request_headers, to_domain_error
from services.core.model_access import check_model_allowed
from services.core.tasks import cancel_and_wait
from services.inference.openai import errors as openai_errors
from services.inference.openai import shapes
from services.jobs import openai_batches as batches
from services.jobs import validation, workers
from services.jobs.chunking import MESSAGE_BYTES, READ_BYTES, byte_chunks
from services.jobs.openai_batches import ErrorIndex
from services.jobs.openai_files import (
    PURPOSE,
    QUOTA_REASON,
    FileStore,
    file_object,
    parse_upload,
)
from services.jobs.store import (
    FINAL,
    IDEMPOTENCY_TTL_S,
    QUEUED,
    JobRecord,
    JobStore,
    NewJob,
    Owner,
    StopOutcome,
    UnknownCursor,
    now_ms,
)
from tokenmesh.jobs.v1 import jobs_pb2
from tokenmesh.openai.v1 import openai_batch_service_pb2 as pb
from tokenmesh.openai.v1 import openai_batch_service_pb2_grpc

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OpenAIBatchService"].full_name
BATCH_WINDOW_S = 24 * 3600.0  # completion_window "24h", the only one OpenAI offers
JSONL = "application/jsonl"
RETRY_COUNT_HEADER = contract.OPENAI_RETRY_COUNT_HEADER
# A client's own key for one batch (as the jobs API's idempotency_key).
IDEMPOTENCY_HEADER = "idempotency-key"
MAX_FILES_PAGE = 10_000  # OpenAI's default and largest `limit` of GET /files


# Sent with a refusal that a retry soon cannot pass (a full storage quota): OpenAI's
# SDKs read `x-should-retry` before their own rules, and retried a 429 twice (each
# retry of an upload sending its 8 MiB again).
NO_CLIENT_RETRY = (contract.SHOULD_RETRY_HEADER, "false")
_FINAL_REFUSALS = frozenset({QUOTA_REASON})


class _OpenAIErrorContext:
    """The RPC's context, whose abort also sends OpenAI's error JSON (for the edge)."""

    def __init__(self, context: Context, error_json: str, final: bool = False) -> None:
        self._context = context
        self._error_json = error_json
        self._final = final

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        extra: tuple[tuple[str, str], ...] = ((contract.OPENAI_ERROR_HEADER, self._error_json),)
        if self._final:
            extra += (NO_CLIENT_RETRY,)
        await self._context.abort(code, details, (*tuple(trailing_metadata), *extra))


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    """Yields an upload's bytes a message's worth at a time (not one 8 MiB copy)."""
    for start in range(0, len(data), MESSAGE_BYTES):
        yield data[start : start + MESSAGE_BYTES]


async def _answer(context: Context, rpc: str, work: Callable[[], Awaitable[T]]) -> T:
    """Runs an RPC's work; an error ends it in OpenAI's shape."""
    try:
        return await work()
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        error = to_domain_error(exc, f"/{SERVICE_NAME}/{rpc}")
        body = openai_errors.header_value(openai_errors.from_error(error))
        final = error.reason in _FINAL_REFUSALS
        await abort_with(cast(Context, _OpenAIErrorContext(context, body, final)), error)
        raise  # not reached: abort_with raised


def _json(value: Any) -> HttpBody:
    return HttpBody(content_type=shapes.JSON, data=shapes.json_bytes(value))


def _caller(context: Context) -> Owner:
    headers = request_headers(context)
    key_id = headers.get(contract.KEY_ID_HEADER, "")
    if not key_id:
        raise Unauthenticated("files and batches belong to an API key: call with one")
    return Owner(key_id, headers.get(contract.TENANT_HEADER, ""), validation.identity_of(headers))


def _retries_taken(headers: Mapping[str, str]) -> int:
    count = headers.get(RETRY_COUNT_HEADER, "")
    return int(count) if count.isdecimal() else 0


def _not_found(kind: str, name: str) -> NotFound:
    return NotFound(f"No such {kind}: {name!r}", resource_type=f"openai.{kind}", resource_name=name)


class OpenAIBatchServicer(openai_batch_service_pb2_grpc.OpenAIBatchServiceServicer):
    """OpenAIBatchServicer serves tokenmesh.openai.v1.OpenAIBatchService.

    Args:
        jobs: the job store (a batch is a job).
        files: the uploaded files.
        batches: the batches' records.
        max_lines: the most requests one batch may hold (a job's item limit).
        max_file_bytes: the largest upload accepted.
    """

    def __init__(
        self,
        jobs: JobStore,
        files: FileStore,
        batches: batches.BatchStore,
        max_lines: int,
        max_file_bytes: int,
    ) -> None:
        self.jobs = jobs
        self.files = files
        self.batches = batches
        self.max_lines = max_lines
        self.max_file_bytes = max_file_bytes
        # What is being computed of ended batches (error indexes, file sizes), by
        # (batch id, what): once per batch and replica at a time.
        self._computing: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._stopped = False

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancels what is being computed of ended batches and waits until it has ended.

        Shielded from their callers, these went on past the service's stop: their
        next Redis command opened a connection on the closed pool, still open when
        the event loop ended (collected during a later test, it failed that test:
        the shape of two CI failures).
        The service calls this before it closes its Redis client.
        """
        self._stopped = True
        computing = list(self._computing.values())
        await asyncio.gather(*(cancel_and_wait(task, timeout_s) for task in computing))

    # -- files ------------------------------------------------------------

    async def CreateFile(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            # Off the event loop: splitting and checking up to 8 MiB takes a few passes
            # over it, and the replica's runners, heartbeats and webhooks share the loop.
            upload = await asyncio.to_thread(
                parse_upload, request.content_type, request.data, self.max_file_bytes
            )
            stored = await self.files.create(owner.lane, upload)
            return _json(stored.to_json())

        return await _answer(context, "CreateFile", work)

    async def GetFile(self, request: pb.GetFileRequest, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            found = batches.result_file_batch(request.file_id)
            if found is None:
                stored = await self.files.get(request.file_id, owner.lane)
                if stored is None:
                    raise _not_found("file", request.file_id)
                return _json(stored.to_json())
            batch, job, errors = await self._result_file(owner, request.file_id)
            size = await self._size(batch, job, errors)
            ended_ms = job.number("ended_ms")
            kind = "errors" if errors else "output"
            return _json(
                file_object(
                    request.file_id,
                    size,
                    ended_ms,
                    f"{batch.batch_id}_{kind}.jsonl",
                    "batch_output",
                    # It goes with its batch: the retention after the batch ended.
                    ended_ms + self.batches.retention_s * 1000,
                )
            )

        return await _answer(context, "GetFile", work)

    async def GetFileContent(
        self, request: pb.GetFileContentRequest, context: Context
    ) -> AsyncIterator[HttpBody]:
        async def head() -> AsyncIterator[bytes]:
            owner = _caller(context)
            if batches.result_file_batch(request.file_id) is None:
                if await self.files.get(request.file_id, owner.lane) is None:
                    raise _not_found("file", request.file_id)
                return _pieces(await self.files.content(request.file_id))
            batch, job, errors = await self._result_file(owner, request.file_id)
            with_lines = await self.batches.get(batch.batch_id, owner.lane, lines=True)
            if with_lines is None:
                raise _not_found("file", request.file_id)
            return await self._file_lines(with_lines, job, errors)

        # By size, not by line count (services/jobs/chunking.py); an upload too, not as
        # one message of up to 8 MiB that the edge's transcoder buffered whole.
        pieces = await _answer(context, "GetFileContent", head)
        sent = False
        async for chunk in byte_chunks(pieces):
            yield HttpBody(content_type=JSONL, data=chunk) if not sent else HttpBody(data=chunk)
            sent = True
        if not sent:
            yield HttpBody(content_type=JSONL, data=b"")

    async def ListFiles(self, request: pb.ListFilesRequest, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            if request.purpose not in ("", PURPOSE):
                reason = f'only uploads are listed ("{PURPOSE}"): a batch names its files'
                raise InvalidArgument([FieldViolation("purpose", reason)])
            if request.order not in ("", "asc", "desc"):
                raise InvalidArgument([FieldViolation("order", 'must be "asc" or "desc"')])
            limit = validation.page_size(request.limit, MAX_FILES_PAGE, MAX_FILES_PAGE, "limit")
            files = await self.files.listed(owner.lane)
            files.sort(key=lambda f: (f.created_ms, f.file_id), reverse=request.order != "asc")
            ids = [stored.file_id for stored in files]
            if request.after and request.after not in ids:
                reason = "is not a file of this list (it may have been deleted or expired)"
                raise InvalidArgument([FieldViolation("after", reason)])
            start = ids.index(request.after) + 1 if request.after else 0
            data = [stored.to_json() for stored in files[start : start + limit]]
            return _json(
                {
                    "object": "list",
                    "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                    "has_more": start + limit < len(files),
                }
            )

        return await _answer(context, "ListFiles", work)

    async def DeleteFile(self, request: pb.DeleteFileRequest, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            if batches.result_file_batch(request.file_id) is not None:
                # As OpenAI's: gone for its owner (404 from now on); its results go
                # with the batch's record, the retention after the batch ended.
                batch, _, errors = await self._result_file(owner, request.file_id)
                await self.batches.delete_file(batch.batch_id, errors)
                return _json({"id": request.file_id, "object": "file", "deleted": True})
            if await self.files.get(request.file_id, owner.lane) is None:
                raise _not_found("file", request.file_id)
            await self.files.delete(request.file_id, owner.lane)
            return _json({"id": request.file_id, "object": "file", "deleted": True})

        return await _answer(context, "DeleteFile", work)

    async def _result_file(
        self, owner: Owner, file_id: str
    ) -> tuple[batches.BatchRecord, JobRecord, bool]:
        """Returns the batch and job of an output or error file that exists now."""
        found = batches.result_file_batch(file_id)
        if found is None:
            raise _not_found("file", file_id)
        batch_id, errors = found
        try:
            batch, job, view = await self._read_batch(owner, batch_id)
        except NotFound:
            raise _not_found("file", file_id) from None
        if view["error_file_id" if errors else "output_file_id"] != file_id:
            raise _not_found("file", file_id)
        if errors in batch.deleted:
            raise _not_found("file", file_id)
        return batch, job, errors

    async def _file_lines(
        self, batch: batches.BatchRecord, job: JobRecord, errors: bool
    ) -> AsyncIterator[bytes]:
        """Returns the lines of an ended batch's output or error file, to be read. The
        error file reads only its own lines (`_error_index`, found here): it wrote
        every output line to keep the few errors. `batch` must hold its lines."""
        if errors:
            indexes: Sequence[int] = (await self._error_index(batch, job)).indexes
        else:
            indexes = range(len(batch.lines))
        return self._render(batch, job, errors, indexes)

    async def _render(
        self, batch: batches.BatchRecord, job: JobRecord, errors: bool, indexes: Sequence[int]
    ) -> AsyncIterator[bytes]:
        """Yields the lines of one result file of the items `indexes`, in order, a read
        of results at a time (READ_BYTES of them: by count, a read of large embeddings
        was hundreds of MB)."""
        async for read in self.batches.result_reads(batch.job_id, indexes, READ_BYTES):
            # Off the event loop: a read of 3072-dim embeddings is ~140 ms of JSON.
            for line in await asyncio.to_thread(batches.result_lines, batch, job, read, errors):
                yield line

    async def _once(
        self, batch_id: str, what: str, compute: Callable[[], Coroutine[Any, Any, T]]
    ) -> T:
        """Runs `compute` of an ended batch once per batch and replica at a time; every
        caller waits for the same run."""
        key = (batch_id, what)
        task = self._computing.get(key)
        if task is None:
            if self._stopped:
                # A caller whose cancel was lost (redis-py can lose one) got here after
                # stop: a run started now would outlive the service's Redis client.
                raise Unavailable("the service is stopping; retry", retry_after_s=1.0)
            task = asyncio.create_task(compute())
            self._computing[key] = task
            task.add_done_callback(lambda _: self._computing.pop(key, None))
        # Shielded: a caller that goes away leaves it to those still waiting.
        found: T = await asyncio.shield(task)
        return found

    async def _error_index(self, batch: batches.BatchRecord, job: JobRecord) -> ErrorIndex:
        """Returns which lines of an ended batch are in its error file: kept in its
        record, or found (reading every result once, writing none) and kept."""
        kept = await self.batches.error_index(batch.batch_id)
        if kept is not None:
            return kept

        async def find() -> ErrorIndex:
            with_lines = batch
            if not batch.lines:
                found = await self.batches.get(batch.batch_id, batch.owner, lines=True)
                if found is None:
                    raise _not_found("batch", batch.batch_id)
                with_lines = found
            indexes: list[int] = []
            render_failed = 0
            every = range(len(with_lines.lines))
            async for read in self.batches.result_reads(batch.job_id, every, READ_BYTES):
                part = await asyncio.to_thread(batches.error_lines, with_lines, job, read)
                indexes += part.indexes
                render_failed += part.render_failed
            index = ErrorIndex(indexes, render_failed)
            await self.batches.keep_error_index(batch.batch_id, index)
            return index

        return await self._once(batch.batch_id, "errors", find)

    async def _size(self, batch: batches.BatchRecord, job: JobRecord, errors: bool) -> int:
        """Returns the bytes of an ended batch's output or error file: kept in its
        record, or written once (per batch and replica at a time) to count them and
        kept. Its files are final: written for every files.retrieve, they cost the
        whole batch's JSON each time (~14 s of CPU for 10,000 lines of 3072-dim
        embeddings); the error file's size writes only the error lines."""
        kept = await self.batches.size(batch.batch_id, errors)
        if kept is not None:
            return kept

        async def count() -> int:
            with_lines = await self.batches.get(batch.batch_id, batch.owner, lines=True)
            if with_lines is None:
                raise _not_found("batch", batch.batch_id)
            size = 0
            async for line in await self._file_lines(with_lines, job, errors):
                size += len(line)
            await self.batches.keep_size(batch.batch_id, errors, size)
            return size

        return await self._once(batch.batch_id, "errors-size" if errors else "output-size", count)

    # -- batches ----------------------------------------------------------

    async def CreateBatch(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            headers = request_headers(context)
            scopes = headers.get(contract.SCOPES_HEADER, "").split()
            wanted = batches.parse_batch_request(request.data)
            stored = await self.files.get(wanted.input_file_id, owner.lane)
            if stored is None:
                raise _not_found("file", wanted.input_file_id)
            data = await self.files.content(wanted.input_file_id)
            # Off the event loop: a file of many lines takes a while to parse, and the
            # replica's runners, heartbeats and webhooks share the loop.
            lines = await asyncio.to_thread(
                batches.parse_input, data, wanted.endpoint, self.max_lines
            )
            items = [line.item for line in lines]
            validation.check_item_scopes(
                items, scopes, lambda index: f"line {lines[index].number} ({wanted.endpoint})"
            )
            await self._check_models(lines, headers)
            created_ms = now_ms()
            new = batches.NewBatch(
                owner=owner.lane,
                request=wanted,
                retry_hold=batches.retry_hold_key(owner.key_id, owner.lane, wanted),
                lines=batches.record_lines(lines),
                may_fail_rendering=batches.may_fail_rendering(lines),
                created_ms=created_ms,
                deadline_ms=created_ms + int(BATCH_WINDOW_S * 1000),
                items_bytes=sum(item.ByteSize() for item in items),
            )
            return _json(await self._create(owner, new, items, headers))

        return await _answer(context, "CreateBatch", work)

    async def _check_models(
        self, lines: Sequence[batches.BatchLine], headers: Mapping[str, str]
    ) -> None:
        """Refuses a file whose lines name a model the key may not use (403, first: a
        restricted key learns nothing of other models) or one nothing knows (400,
        naming the lines): their items were never placed, and the batch sat
        in_progress for its whole 24 h window, then expired."""
        models = validation.item_models([line.item for line in lines])
        for model in models:
            check_model_allowed(headers, model)
        unknown = await workers.unknown_models(self.jobs.redis, models)
        if unknown:
            raise batches.unknown_models_error(lines, frozenset(unknown))

    async def _create(
        self,
        owner: Owner,
        new: batches.NewBatch,
        items: list[jobs_pb2.JobItem],
        headers: Mapping[str, str],
    ) -> dict[str, Any]:
        """Creates a batch and its job, charged to the owner's storage; returns the batch
        object, built from what was written (it was read back, and a read that failed
        answered 503 for a batch that runs: the SDK's retry made a second one).

        Created once, however the request is retried:
        - The store's own retry, when the connection drops after the transaction
          was sent (its WATCH reads as broken), finds the job by this creation's
          own idempotency key, if the transaction made it.
        - A client's retry (OpenAI's SDKs send `x-stainless-retry-count`) within
          RETRY_HOLD_S answers the batch the same request created.
        - With an `Idempotency-Key`, the same key answers its batch for 24 h, as
          the jobs API's does.
        """
        client_key = headers.get(IDEMPOTENCY_HEADER, "")
        if client_key and not contract.is_request_id(client_key):
            # Named as OpenAI's docs spell the header (and as a reused key's refusal).
            raise InvalidArgument([FieldViolation("Idempotency-Key", contract.REQUEST_ID_RULE)])
        if _retries_taken(headers) > 0:
            held = await self.batches.held(new)
            if held is not None:
                with contextlib.suppress(NotFound):  # gone since: create it again
                    return (await self._read_batch(owner, held))[2]
        job = NewJob(
            owner=owner,
            items=items,
            webhook_url="",
            metadata={"openai.input_file_id": new.request.input_file_id},
            idempotency_key=validation.BATCH_IDEMPOTENCY_PREFIX
            + (client_key or secrets.token_hex(12)),
            deadline_ms=new.deadline_ms,
            idempotency_ttl_s=IDEMPOTENCY_TTL_S if client_key else batches.RETRY_HOLD_S,
            fingerprint=batches.request_fingerprint(new.request),
            idempotency_field="Idempotency-Key",  # as OpenAI's docs spell the header
        )
        if client_key:
            # Its batch, before any storage is reserved: reserving first, a replay of
            # a batch near its owner's quota was refused 429 for a batch that exists.
            made = await self.jobs.created_by(job)
            if made is not None:
                with contextlib.suppress(NotFound):  # gone since: create it again
                    return (await self._read_batch(owner, batches.batch_id_of(made)))[2]
        new = await self.batches.reserve(new)
        job_id, created = await self.batches.ledger.written_or_released(
            new.owner,
            new.reservation,
            # One transaction with the job: neither is written without the other.
            lambda: self.jobs.create(
                job, also=lambda pipe, new_id: self.batches.queue_creation(pipe, new_id, new)
            ),
        )
        batch_id = batches.batch_id_of(job_id)
        if not created:  # made by the transaction whose reply was lost, or the client key's
            return (await self._read_batch(owner, batch_id))[2]
        batch = batches.BatchRecord(
            batch_id=batch_id,
            owner=new.owner,
            endpoint=new.request.endpoint,
            input_file_id=new.request.input_file_id,
            metadata=new.request.metadata,
            created_ms=new.created_ms,
        )
        fields = {"status": QUEUED, "total": str(len(items)), "deadline_ms": str(new.deadline_ms)}
        return batches.batch_object(batch, JobRecord(job_id, fields))

    async def _read_batch(
        self, owner: Owner, batch_id: str
    ) -> tuple[batches.BatchRecord, JobRecord, dict[str, Any]]:
        """Returns an owner's batch, its job and its batch object. Once a batch whose
        results may render as errors ended, its errors are indexed first (once): its
        counts and files depend on them."""
        batch = await self.batches.get(batch_id, owner.lane)
        job = await self.jobs.get(batch.job_id) if batch is not None else None
        if batch is None or job is None:
            raise _not_found("batch", batch_id)
        if job.status in FINAL and batch.may_fail_rendering and batch.render_failed is None:
            index = await self._error_index(batch, job)
            batch = replace(batch, render_failed=index.render_failed)
        return batch, job, batches.batch_object(batch, job)

    async def _object(self, owner: Owner, batch_id: str) -> dict[str, Any]:
        return (await self._read_batch(owner, batch_id))[2]

    async def GetBatch(self, request: pb.GetBatchRequest, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            return _json(await self._object(_caller(context), request.batch_id))

        return await _answer(context, "GetBatch", work)

    async def CancelBatch(self, request: pb.CancelBatchRequest, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            view = await self._object(owner, request.batch_id)
            # "cancelling" while requests in flight are stopped, then "cancelled".
            stopped = await self.jobs.stop(batches.job_id_of(request.batch_id))
            if stopped == StopOutcome.ENDED_BEFORE:
                raise FailedPrecondition(
                    f"Cannot cancel a batch with status {view['status']!r}",
                    reason="BATCH_ENDED",
                )
            return _json(await self._object(owner, request.batch_id))

        return await _answer(context, "CancelBatch", work)

    async def ListBatches(self, request: pb.ListBatchesRequest, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            limit = validation.page_size(request.limit, 20, 100, field="limit")
            data, more = await self._batch_page(owner, request.after, limit)
            return _json(
                {
                    "object": "list",
                    "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                    "has_more": more,
                }
            )

        return await _answer(context, "ListBatches", work)

    async def _batch_page(
        self, owner: Owner, after: str, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """Returns up to `limit` batch objects after the batch `after`, and whether more
        follow. Batches that are gone are skipped (and dropped from the list): a page
        of them came back short, or empty with has_more and no last_id to go on from.
        `has_more` counts only a batch that is there: it looks for one more than the
        page (a page followed only by expired batches said has_more, and the next
        page was empty).

        Raises:
            InvalidArgument: `after` is no batch of this list (OpenAI answers 400).
        """
        data: list[dict[str, Any]] = []
        gone: list[str] = []
        cursor, place_ms, more = after, None, True
        try:
            while more and len(data) <= limit:
                found, more = await self.batches.page(
                    owner.lane, cursor, limit + 1 - len(data), place_ms
                )
                for batch_id, _ in found:
                    try:
                        data.append(await self._object(owner, batch_id))
                    except NotFound:
                        gone.append(batch_id)
                if found:
                    cursor, place_ms = found[-1]
        except UnknownCursor:
            raise InvalidArgument(
                [FieldViolation("after", "is not a batch of this list (it may have expired)")]
            ) from None
        finally:
            await self.batches.forget(owner.lane, gone)
        return data[:limit], len(data) > limit
