"""tokenmesh.jobs.v1.JobsService: protobuf at the edge, the store and runner inside.

Every RPC acts for the key the edge vouched for (x-tokenmesh-key-id): a job
belongs to the key that created it, and another key's job is NOT_FOUND
(not PERMISSION_DENIED: its existence is not revealed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from google.api import httpbody_pb2

from services.core import contract
from services.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
)
from services.core.interceptors import Context, request_headers
from services.core.model_access import check_model_allowed
from services.jobs import signing, ssrf, validation, views, workers
from services.jobs.chunking import PAGE_BYTES, RESULTS_PER_READ, byte_chunks
from services.jobs.openai_files import StorageLedger
from services.jobs.store import (
    FINAL,
    FIRST_PAGE_MS,
    STATUSES,
    STOP_GRACE_S,
    JobRecord,
    JobStore,
    NewJob,
    Owner,
    StopOutcome,
    items_key,
    now_ms,
    request_id,
)
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2_grpc
from tokenmesh.jobs.v1 import jobs_service_pb2 as pb

WATCH_POLL_S = 0.5
WATCH_KEEPALIVE_S = 15.0  # an unchanged job is sent again this often (idle timeouts)
# The most WatchJob streams one key holds open on a replica. Each polls Redis twice a
# second for as long as its job runs (up to the jobs' retention) and its keepalive
# outlives every idle timeout: unbounded, ~1,100 of one key's (two minutes at its
# default request rate) filled the event loop that runs every tenant's items.
MAX_WATCHES_PER_KEY = 16
MAX_TOKEN_ID_CHARS = 64  # a page token's job id ("job-" and 24 hex digits)


class JobsServicer(jobs_service_pb2_grpc.JobsServiceServicer):
    """JobsServicer serves tokenmesh.jobs.v1.JobsService.

    Args:
        store: the jobs in Redis.
        max_items: the most items a job may have.
        default_window_s: a job's completion window when it sets none.
        allow_hosts: webhook hosts exempt from the address check (may use http).
        ledger: what each owner keeps in the AOF Redis: a job's items are charged to
            its owner's storage until the job ends (the OpenAI batches' ledger).
    """

    def __init__(
        self,
        store: JobStore,
        max_items: int,
        default_window_s: float,
        allow_hosts: Collection[str],
        ledger: StorageLedger,
    ) -> None:
        self.store = store
        self.max_items = max_items
        self.default_window_s = default_window_s
        self.allow_hosts = allow_hosts
        self.ledger = ledger
        self._watches: dict[str, int] = {}  # key id -> its WatchJob streams open here

    # -- helpers ----------------------------------------------------------

    @staticmethod
    def _key_id(context: Context) -> str:
        key_id = request_headers(context).get(contract.KEY_ID_HEADER, "")
        if not key_id:
            raise Unauthenticated("jobs belong to an API key: call with one", reason="NO_KEY")
        return key_id

    async def _owned(self, context: Context, job_id: str) -> JobRecord:
        key_id = self._key_id(context)
        record = await self.store.get(job_id) if job_id else None
        if record is None or record.owner.key_id != key_id:
            raise NotFound(
                f"no job {job_id!r}", resource_type="tokenmesh.jobs.v1.Job", resource_name=job_id
            )
        return record

    async def _job(self, record: JobRecord) -> jobs_pb2.Job:
        attempts = await self.store.attempts(record.job_id) if record.get("webhook_url") else []
        return views.job_pb(record, attempts)

    async def _reload(self, job_id: str) -> jobs_pb2.Job:
        record = await self.store.get(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r}")
        return await self._job(record)

    async def _check_webhook(self, url: str, key_id: str) -> None:
        try:
            # The key's lookups in flight are bounded: its hung names wait for its own.
            await ssrf.resolve(ssrf.parse(url, self.allow_hosts), owner=key_id)
        except ssrf.RefusedUrl as exc:
            raise InvalidArgument(
                [FieldViolation("webhook_url", str(exc))], reason="WEBHOOK_URL_REFUSED"
            ) from None
        if not await self.store.has_secret(key_id):
            raise FailedPrecondition(
                "a webhook needs the key's webhook secret first "
                "(tokenmesh webhooks secret create, or POST /v1/webhooks/secret)",
                reason="NO_WEBHOOK_SECRET",
            )

    async def _check_models(
        self, items: Collection[jobs_pb2.JobItem], headers: Mapping[str, str]
    ) -> None:
        """Refuses items naming a model the key may not use (PERMISSION_DENIED, checked
        first, as a worker does: a restricted key learns nothing of other models) or
        one nothing knows (NOT_FOUND). Such an item was never placed: the job sat
        queued for its whole completion window, up to 7 days, then expired."""
        models = validation.item_models(items)
        for model in models:
            check_model_allowed(headers, model)
        for model in await workers.unknown_models(self.store.redis, models):
            raise NotFound(
                f"items[{models[model]}] names model {model!r}, which is not served here",
                reason="MODEL_NOT_FOUND",
                metadata={"model": model},
            )

    # -- RPCs -------------------------------------------------------------

    async def CreateJob(self, request: pb.CreateJobRequest, context: Context) -> jobs_pb2.Job:
        return await self.create_job(request, context)

    async def create_job(
        self, request: pb.CreateJobRequest, context: Context, api_version: str = ""
    ) -> jobs_pb2.Job:
        """CreateJob; `api_version` names the inference API a handed-over Complete came
        in ("v1": its item is metered as v1, contract.API_VERSION_HEADER)."""
        headers = request_headers(context)
        key_id = self._key_id(context)
        validation.validate_create(request, self.max_items)
        validation.check_item_scopes(request.items, headers.get(contract.SCOPES_HEADER, "").split())
        await self._check_models(request.items, headers)
        if request.webhook_url:
            await self._check_webhook(request.webhook_url, key_id)
        window_s = validation.completion_window_s(
            request.completion_window, request.HasField("completion_window"), self.default_window_s
        )
        identity = validation.identity_of(headers)
        if api_version:
            identity[contract.API_VERSION_HEADER] = api_version  # sent with the item
        owner = Owner(key_id, headers.get(contract.TENANT_HEADER, ""), identity)
        job = NewJob(
            owner=owner,
            items=list(request.items),
            webhook_url=request.webhook_url,
            metadata=dict(request.metadata),
            idempotency_key=request.idempotency_key,
            deadline_ms=now_ms() + int(window_s * 1000),
            fingerprint=_fingerprint(request) if request.idempotency_key else "",
        )
        # A replay finds its job before any storage is reserved (a replay near the
        # owner's quota would be refused for a job that exists).
        made = await self.store.created_by(job) if job.idempotency_key else None
        return await self._reload(made or await self._create_charged(job))

    async def _create_charged(self, job: NewJob) -> str:
        """Creates a job whose items are charged to its owner's storage until it ends
        (they are deleted then); returns its id. Uncharged, one key's jobs of 10,000
        items each filled the AOF Redis every service shares, at no token cost
        until they ran.

        Raises:
            ResourceExhausted: the owner keeps the most bytes it may.
        """
        lane = job.owner.lane
        size = sum(item.ByteSize() for item in job.items)
        reservation = await self.ledger.reserve(lane, size, what="job")
        until_ms = job.deadline_ms + STOP_GRACE_S * 1000  # a stop ends it this much later

        def charge(pipe: Any, job_id: str) -> None:
            charges = [(items_key(job_id), size, until_ms)]
            self.ledger.queue_confirm(pipe, lane, reservation, charges)

        job_id, _ = await self.ledger.written_or_released(
            lane, reservation, lambda: self.store.create(job, also=charge)
        )
        return job_id

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> jobs_pb2.Job:
        return await self._job(await self._owned(context, request.id))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        key_id = self._key_id(context)
        size = validation.page_size(request.page_size, 20, 100)
        if request.status and request.status not in STATUSES:
            raise InvalidArgument(
                [FieldViolation("status", f"must be one of {', '.join(STATUSES)}")]
            )
        before, after = _list_token(request.page_token)
        records, token = await self._listed(key_id, request.status, size, before, after)
        jobs = [await self._job(record) for record in records]
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def _listed(
        self, key_id: str, status: str, size: int, before: int, after: str
    ) -> tuple[list[JobRecord], str]:
        """Returns up to `size` of a key's jobs in `status` ("": any) that follow the
        place (`before`, `after`), and the token of the next page: "" when this page
        is the last. Jobs that are gone are skipped and dropped from the key's list.

        It looks for one job more than the page: a token given whenever the page was
        full sent a client that had read the last jobs on for an empty page. It reads
        at most `_scan_limit(size)` jobs: a filter few jobs match read every job of
        the key in one call (400 reads for an empty page of 1); the page is then
        short, and its token goes on from the last job read (AIP-158).
        """
        found: list[tuple[int, str, JobRecord]] = []
        read, ended = 0, False
        while len(found) <= size and read < _scan_limit(size):
            page = await self.store.owned(key_id, before, size + 1, after)
            gone = []
            for job_id, created in page:
                before, after = created, job_id
                read += 1
                record = await self.store.get(job_id)
                if record is None:
                    gone.append(job_id)
                elif not status or record.status == status:
                    found.append((created, job_id, record))
                    if len(found) > size:
                        break
            await self.store.forget_owned(key_id, gone)
            if len(page) <= size:
                ended = True  # the list ended
                break
        listed = found[:size]
        if len(found) > size:
            token = f"{listed[-1][0]}:{listed[-1][1]}"
        else:
            token = "" if ended else f"{before}:{after}"
        return [record for _, _, record in listed], token

    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> jobs_pb2.Job:
        """Stops the job: CANCELLING while items in flight are cut (one that finishes
        meanwhile keeps its result), then CANCELLED, its results final; at once when
        none is in flight. Cancelling a job that is CANCELLING answers it as it is."""
        record = await self._owned(context, request.id)
        if await self.store.stop(record.job_id) == StopOutcome.ENDED_BEFORE:
            raise FailedPrecondition(
                f"job {record.job_id} has ended already ({record.status})", reason="JOB_ENDED"
            )
        return await self._reload(record.job_id)

    async def _results(self, record: JobRecord, start: int, end: int) -> list[jobs_pb2.JobResult]:
        indexes = list(range(start, end))
        stored = await self.store.results(record.job_id, indexes)
        never_ran = views.never_ran(record)
        out = []
        for index, raw in zip(indexes, stored, strict=True):
            if raw is not None:
                result = jobs_pb2.JobResult.FromString(raw)
            elif never_ran is not None:
                result = jobs_pb2.JobResult(index=index, error=never_ran)
            else:
                continue  # still to run
            result.request_id = request_id(record.job_id, index)
            out.append(result)
        return out

    async def ListJobResults(
        self, request: pb.ListJobResultsRequest, context: Context
    ) -> pb.ListJobResultsResponse:
        record = await self._owned(context, request.id)
        size = validation.page_size(request.page_size, 100, 1000)
        total = record.number("total")
        start = min(_page_token(request.page_token, default=0), total)
        results, end = await self._result_page(record, start, min(start + size, total))
        return pb.ListJobResultsResponse(
            results=results, next_page_token=str(end) if end < total else ""
        )

    async def _result_page(
        self, record: JobRecord, start: int, end: int
    ) -> tuple[list[jobs_pb2.JobResult], int]:
        """Returns the results of items `start` to `end` that fit in PAGE_BYTES (the
        first one whatever its size: a page always moves on), and the item the next
        page starts at. A page may hold fewer results than asked for (AIP-158)."""
        page: list[jobs_pb2.JobResult] = []
        used = 0
        for read in range(start, end, RESULTS_PER_READ):
            for result in await self._results(record, read, min(read + RESULTS_PER_READ, end)):
                # The field's tag and length take at most 6 bytes more.
                cost = result.ByteSize() + 6
                if page and used + cost > PAGE_BYTES:
                    return page, max(result.index, page[-1].index + 1)  # always moves on
                page.append(result)
                used += cost
        return page, end

    async def DownloadJobResults(
        self, request: pb.DownloadJobResultsRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        record = await self._owned(context, request.id)
        sent = False
        # By size, not by result count (services/jobs/chunking.py).
        async for chunk in byte_chunks(self._jsonl(record)):
            yield httpbody_pb2.HttpBody(content_type="application/jsonl", data=chunk)
            sent = True
        if not sent:
            yield httpbody_pb2.HttpBody(content_type="application/jsonl", data=b"")

    async def _jsonl(self, record: JobRecord) -> AsyncIterator[bytes]:
        """Yields a job's results as JSON lines, one at a time, in item order."""
        total = record.number("total")
        for start in range(0, total, RESULTS_PER_READ):
            for result in await self._results(record, start, min(start + RESULTS_PER_READ, total)):
                line = json.dumps(views.to_json(result), separators=(",", ":")) + "\n"
                yield line.encode()

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchJobResponse]:
        record = await self._owned(context, request.id)
        key_id = record.owner.key_id
        if self._watches.get(key_id, 0) >= MAX_WATCHES_PER_KEY:
            raise ResourceExhausted(
                f"this key watches {MAX_WATCHES_PER_KEY} jobs at once already: close a "
                "watch, or poll GetJob",
                retry_after_s=WATCH_KEEPALIVE_S,
                quota_violations=[
                    QuotaViolation(f"key {key_id}", f"at most {MAX_WATCHES_PER_KEY} open watches")
                ],
                reason="TOO_MANY_WATCHES",
            )
        self._watches[key_id] = self._watches.get(key_id, 0) + 1
        try:
            async for response in self._watch(record):
                yield response
        finally:
            self._watches[key_id] -= 1
            if not self._watches[key_id]:
                del self._watches[key_id]

    async def _watch(self, record: JobRecord) -> AsyncIterator[pb.WatchJobResponse]:
        """Yields the job's events until it ends (or is gone)."""
        sent = b""
        sent_at = 0.0
        while True:
            job = await self._job(record)
            payload = job.SerializeToString()
            if payload != sent or time.monotonic() - sent_at >= WATCH_KEEPALIVE_S:
                event = jobs_pb2.JobEvent(type=views.event_type(job), job=job)
                yield pb.WatchJobResponse(event=event)
                sent, sent_at = payload, time.monotonic()
            if job.status in FINAL:
                return
            await asyncio.sleep(WATCH_POLL_S)
            reloaded = await self.store.get(record.job_id)
            if reloaded is None:
                return
            record = reloaded

    async def RedeliverWebhook(
        self, request: pb.RedeliverWebhookRequest, context: Context
    ) -> jobs_pb2.Job:
        record = await self._owned(context, request.id)
        if not record.get("webhook_url"):
            raise FailedPrecondition(f"job {record.job_id} has no webhook", reason="NO_WEBHOOK")
        if record.status not in FINAL:
            raise FailedPrecondition(
                f"job {record.job_id} is still {record.status}: its webhook goes out when it ends",
                reason="JOB_NOT_ENDED",
            )
        await self.store.redeliver(record.job_id)
        return await self._reload(record.job_id)

    async def CreateWebhookSecret(
        self, request: pb.CreateWebhookSecretRequest, context: Context
    ) -> pb.CreateWebhookSecretResponse:
        key_id = self._key_id(context)
        secret = signing.new_secret()
        if not await self.store.create_secret(key_id, secret):
            raise AlreadyExists(
                "this key has a webhook secret already; rotate it to get a new one",
                reason="WEBHOOK_SECRET_EXISTS",
            )
        return pb.CreateWebhookSecretResponse(secret=secret, key_id=key_id)

    async def RotateWebhookSecret(
        self, request: pb.RotateWebhookSecretRequest, context: Context
    ) -> pb.RotateWebhookSecretResponse:
        key_id = self._key_id(context)
        overlap = validation.overlap_s(request.overlap, request.HasField("overlap"))
        secret = signing.new_secret()
        await self.store.rotate_secret(key_id, secret, int(overlap * 1000))
        return pb.RotateWebhookSecretResponse(secret=secret, key_id=key_id)


def _fingerprint(request: pb.CreateJobRequest) -> str:
    """Returns a digest of what a CreateJob asks for (store.NewJob.fingerprint): its items,
    webhook, metadata and window (the key itself aside)."""
    asked = pb.CreateJobRequest()
    asked.CopyFrom(request)
    asked.idempotency_key = ""
    return hashlib.sha256(asked.SerializeToString(deterministic=True)).hexdigest()[:32]


def _scan_limit(page_size: int) -> int:
    """Returns how many of a key's jobs one ListJobs page reads at most."""
    return max(10 * page_size, 100)


def _list_token(token: str) -> tuple[int, str]:
    """Reads a ListJobs page token: the last job listed, "<created ms>:<id>" (a bare
    "<created ms>" from earlier versions still reads, without the id). The page goes
    on from that place even when the job is gone; a token without a place (":<id>")
    is refused, as it started again from the first page."""
    if not token:
        return FIRST_PAGE_MS, ""
    created, _, job_id = token.partition(":")
    if not created or len(job_id) > MAX_TOKEN_ID_CHARS or not job_id.isprintable():
        raise InvalidArgument([FieldViolation("page_token", "is not a token this API returned")])
    return _page_token(created, default=FIRST_PAGE_MS), job_id


def _page_token(token: str, default: int) -> int:
    if not token:
        return default
    # ASCII digits: str.isdigit() also takes "²" (int() refuses it: INTERNAL) and "٣".
    if not (token.isascii() and token.isdigit()) or len(token) > 19:
        raise InvalidArgument([FieldViolation("page_token", "is not a token this API returned")])
    return int(token)
