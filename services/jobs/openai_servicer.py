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
from collections.abc import AsyncIterator, Awaitable, Callable
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
)
from services.core.interceptors import Context, abort_with, request_headers, to_domain_error
from services.inference.openai import errors as openai_errors
from services.inference.openai import shapes
from services.jobs import openai_batches as batches
from services.jobs import validation
from services.jobs.chunking import RESULTS_PER_READ, byte_chunks
from services.jobs.openai_batches import ResultSizes
from services.jobs.openai_files import FileStore, file_object, parse_upload
from services.jobs.store import (
    JobRecord,
    JobStore,
    NewJob,
    Owner,
    StopOutcome,
    UnknownCursor,
    now_ms,
)
from tokenmesh.openai.v1 import openai_batch_service_pb2 as pb
from tokenmesh.openai.v1 import openai_batch_service_pb2_grpc

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OpenAIBatchService"].full_name
BATCH_WINDOW_S = 24 * 3600.0  # completion_window "24h", the only one OpenAI offers
JSONL = "application/jsonl"


class _OpenAIErrorContext:
    """The RPC's context, whose abort also sends OpenAI's error JSON (for the edge)."""

    def __init__(self, context: Context, error_json: str) -> None:
        self._context = context
        self._error_json = error_json

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        extra = ((contract.OPENAI_ERROR_HEADER, self._error_json),)
        await self._context.abort(code, details, (*tuple(trailing_metadata), *extra))


async def _answer(context: Context, rpc: str, work: Callable[[], Awaitable[T]]) -> T:
    """Runs an RPC's work; an error ends it in OpenAI's shape."""
    try:
        return await work()
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        error = to_domain_error(exc, f"/{SERVICE_NAME}/{rpc}")
        body = openai_errors.header_value(openai_errors.from_error(error))
        await abort_with(cast(Context, _OpenAIErrorContext(context, body)), error)
        raise  # not reached: abort_with raised


def _json(value: Any) -> HttpBody:
    return HttpBody(content_type=shapes.JSON, data=shapes.json_bytes(value))


def _caller(context: Context) -> Owner:
    headers = request_headers(context)
    key_id = headers.get(contract.KEY_ID_HEADER, "")
    if not key_id:
        raise Unauthenticated("files and batches belong to an API key: call with one")
    return Owner(key_id, headers.get(contract.TENANT_HEADER, ""), validation.identity_of(headers))


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
        # Result-file sizes being computed, by batch id (services/jobs/openai_batches.py).
        self._sizing: dict[str, asyncio.Task[ResultSizes]] = {}

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
            sizes = await self._sizes(batch, job)
            ended_ms = job.number("ended_ms")
            kind = "errors" if errors else "output"
            return _json(
                file_object(
                    request.file_id,
                    sizes.error_bytes if errors else sizes.output_bytes,
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
        async def head() -> tuple[bytes, batches.BatchRecord | None, JobRecord | None, bool]:
            owner = _caller(context)
            if batches.result_file_batch(request.file_id) is None:
                if await self.files.get(request.file_id, owner.lane) is None:
                    raise _not_found("file", request.file_id)
                return await self.files.content(request.file_id), None, None, False
            batch, job, errors = await self._result_file(owner, request.file_id)
            with_lines = await self.batches.get(batch.batch_id, owner.lane, lines=True)
            if with_lines is None:
                raise _not_found("file", request.file_id)
            return b"", with_lines, job, errors

        data, batch, job, errors = await _answer(context, "GetFileContent", head)
        if batch is None or job is None:
            yield HttpBody(content_type=JSONL, data=data)
            return
        sent = False
        # By size, not by line count (services/jobs/chunking.py).
        async for chunk in byte_chunks(self._render(batch, job, errors)):
            yield HttpBody(content_type=JSONL, data=chunk) if not sent else HttpBody(data=chunk)
            sent = True
        if not sent:
            yield HttpBody(content_type=JSONL, data=b"")

    async def DeleteFile(self, request: pb.DeleteFileRequest, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            if batches.result_file_batch(request.file_id) is not None:
                raise InvalidArgument(
                    [FieldViolation("file_id", "a batch's output and error files go with it")]
                )
            if await self.files.get(request.file_id, owner.lane) is None:
                raise _not_found("file", request.file_id)
            await self.files.delete(request.file_id)
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
        batch = await self.batches.get(batch_id, owner.lane)
        job = await self.jobs.get(batch.job_id) if batch is not None else None
        if batch is None or job is None:
            raise _not_found("file", file_id)
        view = batches.batch_object(batch, job)
        if view["error_file_id" if errors else "output_file_id"] != file_id:
            raise _not_found("file", file_id)
        return batch, job, errors

    async def _lines(
        self, batch: batches.BatchRecord, job: JobRecord
    ) -> AsyncIterator[list[tuple[bytes, bool]]]:
        """Yields both result files' lines (each with whether it is an error line), a
        read of results at a time, in request order. `batch` must hold its lines."""
        total = len(batch.lines)
        for start in range(0, total, RESULTS_PER_READ):
            indexes = list(range(start, min(start + RESULTS_PER_READ, total)))
            stored = await self.jobs.results(batch.job_id, indexes)
            # Off the event loop: a read of 3072-dim embeddings is ~140 ms of JSON.
            yield await asyncio.to_thread(batches.result_lines, batch, job, start, stored)

    async def _render(
        self, batch: batches.BatchRecord, job: JobRecord, errors: bool
    ) -> AsyncIterator[bytes]:
        """Yields a result file's lines, one at a time, in request order."""
        async for lines in self._lines(batch, job):
            for line, is_error in lines:
                if is_error == errors:
                    yield line

    async def _sizes(self, batch: batches.BatchRecord, job: JobRecord) -> ResultSizes:
        """Returns the sizes of an ended batch's result files: kept in its record, or
        computed (once per batch and replica at a time) and kept. Its files are final:
        written for every files.retrieve, they cost the whole batch's JSON each time
        (~14 s of CPU for 10,000 lines of 3072-dim embeddings)."""
        kept = await self.batches.sizes(batch.batch_id)
        if kept is not None:
            return kept
        task = self._sizing.get(batch.batch_id)
        if task is None:
            task = asyncio.create_task(self._compute_sizes(batch, job))
            self._sizing[batch.batch_id] = task
            task.add_done_callback(lambda _: self._sizing.pop(batch.batch_id, None))
        # Shielded: a caller that goes away leaves the sizes to those still waiting.
        return await asyncio.shield(task)

    async def _compute_sizes(self, batch: batches.BatchRecord, job: JobRecord) -> ResultSizes:
        with_lines = await self.batches.get(batch.batch_id, batch.owner, lines=True)
        if with_lines is None:
            raise _not_found("batch", batch.batch_id)
        output = errors = 0
        async for lines in self._lines(with_lines, job):
            for line, is_error in lines:
                if is_error:
                    errors += len(line)
                else:
                    output += len(line)
        sizes = ResultSizes(output, errors)
        await self.batches.keep_sizes(batch.batch_id, sizes)
        return sizes

    # -- batches ----------------------------------------------------------

    async def CreateBatch(self, request: HttpBody, context: Context) -> HttpBody:
        async def work() -> HttpBody:
            owner = _caller(context)
            scopes = request_headers(context).get(contract.SCOPES_HEADER, "").split()
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
            validation.check_item_scopes(items, scopes)
            deadline_ms = now_ms() + int(BATCH_WINDOW_S * 1000)
            job_id, _ = await self.jobs.create(
                NewJob(
                    owner=owner,
                    items=items,
                    webhook_url="",
                    metadata={"openai.input_file_id": wanted.input_file_id},
                    idempotency_key="",
                    deadline_ms=deadline_ms,
                ),
                # One transaction with the job: neither is written without the other.
                also=lambda pipe, new_id: self.batches.queue_creation(
                    pipe, new_id, owner.lane, wanted, lines, deadline_ms
                ),
            )
            return _json(await self._object(owner, batches.batch_id_of(job_id)))

        return await _answer(context, "CreateBatch", work)

    async def _object(self, owner: Owner, batch_id: str) -> dict[str, Any]:
        batch = await self.batches.get(batch_id, owner.lane)
        job = await self.jobs.get(batch.job_id) if batch is not None else None
        if batch is None or job is None:
            raise _not_found("batch", batch_id)
        return batches.batch_object(batch, job)

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
