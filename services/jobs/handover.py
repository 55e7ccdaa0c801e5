"""tokenmesh.jobs.v1.HandoverService: a Complete that prefers to be answered later.

RFC 7240's `Prefer: respond-async` on a REST Complete (v2 or v1) reaches
this service instead of a worker (an edge route on that header: see
gateway/handover.py). The request becomes a job of one item, created as
JobsService.CreateJob would (same checks, same owner), and:

- with `wait=N` the item gets up to N seconds (at most MAX_WAIT_S): finished
  by then, the answer is the Complete response itself (200, in the shape the
  client's API version prints) with the headers of the direct call's answer
  that the item's result knows (x-request-id, x-model-version, and a deprecated
  model version's Deprecation and Sunset, which the edge's version routes add
  to the direct call's), or its error as the direct call answers it (code,
  message, ErrorInfo reason and the field a BadRequest names: what the item's
  JobError keeps; v1's field names on CompleteV1);
- otherwise, or when it is not finished by then, the answer is `202 Accepted`
  with `Location: /v1/jobs/{id}`, `Preference-Applied: respond-async` and the
  job as JSON (what GET /v1/jobs/{id} answers).

The 202 is the `contract.HTTP_STATUS_HEADER` response header, which the
edge's status filter applies (gateway/error_status.py).

Each RPC answers under the API version policy of the Complete it stands in
for (services.core.api_versions.STAND_INS; the error boundary applies it
before the handler runs, as on a worker): CompleteV1 under inference v1's.
A retired version answers 410 `API_VERSION_SUNSET` and creates no job; a
deprecated one's 202, 200 and errors carry its Deprecation, Sunset and Link
(the 202's through the context, which adds them to the headers sent here).

A Complete naming a model version past its sunset (or an alias of one), or
no version of a model whose versions all are, answers 404 (NOT_FOUND) with
the edge's text and creates no job, as the direct call does: the edge's
sunset routes match the model header, which its routing filter does not set
on a request it hands over (the job's item would fail NOT_FOUND anyway).

So does a model nothing knows (not in the catalogue, which every model a worker
ever registered is in, and served by no routable worker): 404 MODEL_NOT_FOUND
with the worker's text, after the key's scopes are checked (as a worker checks
them first). Its job used to wait for a worker until its window ended (24 h by
default), and a `wait=N` client waited the N seconds for a 202. A model whose
workers are restarting is still in the catalogue: its job waits for them.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable, Mapping

import grpc
from google.api.httpbody_pb2 import HttpBody
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from services.core import contract
from services.core.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    TokenmeshError,
)
from services.core.interceptors import Context, request_headers
from services.core.model_access import check_model_allowed
from services.inference import v1_translation
from services.inference import validation as v1_validation
from services.inference.models import model_not_found
from services.inference.v2 import validation as v2_validation
from services.jobs import validation as jobs_validation
from services.jobs import views, workers
from services.jobs.servicer import JobsServicer
from services.jobs.store import FINAL, JobStore
from services.router.catalog import CATALOG_KEY, ModelEntry
from tokenmesh.jobs.v1 import handover_service_pb2 as pb
from tokenmesh.jobs.v1 import handover_service_pb2_grpc, jobs_pb2
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HandoverService"].full_name
PREFER_HEADER = "prefer"
MAX_WAIT_S = 60.0
FIRST_POLL_S, MAX_POLL_S = 0.02, 0.25
JSON = "application/json"
REQUEST_ID_HEADER, MODEL_VERSION_HEADER = "x-request-id", "x-model-version"
# A finished item's v2 response -> the message the client's API version answers.
Shape = Callable[[jobs_pb2.JobResult], Message]
# A failed item's error -> the error the client's API version answers.
Translate = Callable[[TokenmeshError], TokenmeshError]


def _same(error: TokenmeshError) -> TokenmeshError:
    return error


def _is_number(text: str) -> bool:
    # ASCII digits only: str.isdigit() also takes "²", which float() refuses (INTERNAL).
    return text.isascii() and text.isdigit()


def wait_seconds(prefer: str) -> float:
    """Returns the `wait` preference of a Prefer header in seconds (0 when absent),
    at most MAX_WAIT_S; other preferences and malformed values are ignored (RFC 7240)."""
    for preference in prefer.replace(";", ",").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait" and _is_number(value.strip()):
            return min(float(value.strip()), MAX_WAIT_S)
    return 0.0


def _print(message: Message) -> bytes:
    """Prints a message as the edge's transcoder does (proto field names, every field)."""
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=None,
    ).encode()


def deprecation_headers(entry: ModelEntry, version: str) -> list[tuple[str, str]]:
    """RFC 9745 Deprecation and RFC 8594 Sunset of a deprecated model version, as the
    edge's route for that version adds them (services.router.snapshot)."""
    found = entry.version(version)
    if found is None or found.deprecated_at is None:
        return []
    headers = [("deprecation", f"@{int(found.deprecated_at)}")]
    if found.sunset_at is not None:
        headers.append(("sunset", email.utils.formatdate(found.sunset_at, usegmt=True)))
    return headers


def _status_code(number: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


class ItemFailed(TokenmeshError):
    """ItemFailed is a failed item's error as its worker raised it: any code, with the
    ErrorInfo reason and the BadRequest field the item's JobError kept."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        field: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.code = code
        self.field = field

    def details(self) -> list[Message]:
        details = super().details()
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.message
            )
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        return details


def item_error(error: jobs_pb2.JobError) -> TokenmeshError | None:
    """Returns a failed item's error as the direct call raised it, or None when the
    worker's status had no ErrorInfo (gRPC's own, the edge's sunset text): its code
    and message are all there is.

    A JobError keeps the reason, ErrorInfo's metadata and the first violation's
    field (not further violations): an InvalidArgument whose message starts with
    that field is rebuilt as one (its message is the same), so that v1 can rename
    its fields as for a direct call (`v1_translation.v1_error`).
    """
    if not error.reason:
        return None
    code = _status_code(error.grpc_code)
    prefix = f"{error.field}: "
    named = bool(error.field) and error.message.startswith(prefix)
    if code == grpc.StatusCode.INVALID_ARGUMENT and named:
        described = FieldViolation(error.field, error.message.removeprefix(prefix))
        return InvalidArgument([described], reason=error.reason, metadata=error.metadata)
    return ItemFailed(code, error.message, error.reason, error.field, error.metadata)


class HandoverServicer(handover_service_pb2_grpc.HandoverServiceServicer):
    """HandoverServicer turns a Complete into a one-item job, answered inline or with 202.

    Args:
        jobs: the JobsService servicer (creates the job with its checks).
        store: the jobs in Redis (the item's result is read from it).
    """

    def __init__(self, jobs: JobsServicer, store: JobStore) -> None:
        self.jobs = jobs
        self.store = store

    async def CompleteV2(self, request: pb.CompleteV2Request, context: Context) -> HttpBody:
        # Its own field names first: the job's checks name them `items[0].complete.*`,
        # fields the caller of a Complete never sent.
        v2_validation.validate_generation(request.request)
        item = jobs_pb2.JobItem(complete=request.request)
        return await self._hand_over(item, context, lambda result: result.complete, _same)

    async def CompleteV1(self, request: pb.CompleteV1Request, context: Context) -> HttpBody:
        v1_validation.validate_generation(request.request)
        item = jobs_pb2.JobItem(complete=v1_translation.complete_request(request.request))
        return await self._hand_over(
            item,
            context,
            lambda result: v1_translation.complete_response(result.complete),
            v1_translation.v1_error,
            api_version="v1",  # metered as v1, as the direct call is
        )

    async def _hand_over(
        self,
        item: jobs_pb2.JobItem,
        context: Context,
        shape: Shape,
        translate: Translate,
        api_version: str = "",
    ) -> HttpBody:
        model = item.complete.model
        headers: Mapping[str, str] = request_headers(context)
        # First, as a worker does: a key limited to some models learns nothing of the
        # others (a sunset's or an unknown model's 404 against a 202 told it which exist).
        check_model_allowed(headers, model)
        retired = await workers.sunset_of(self.store.redis, (model, item.complete.version))
        if retired is not None:
            # No ErrorInfo: the edge's own reply to the direct call carries none.
            await context.abort(grpc.StatusCode.NOT_FOUND, retired)
        _check_scopes(item, headers)
        if await workers.unknown_model(self.store.redis, model):
            raise translate(model_not_found(model))
        job = await self.jobs.create_job(
            jobs_pb.CreateJobRequest(items=[item]), context, api_version
        )
        wait_s = wait_seconds(headers.get(PREFER_HEADER, ""))
        result = await self._result_within(job.id, wait_s) if wait_s else None
        if result is None:
            return await self._accepted(job.id, context)
        if result.HasField("error"):
            failed = item_error(result.error)
            if failed is not None:
                raise translate(failed)
            await context.abort(_status_code(result.error.grpc_code), result.error.message)
        await context.send_initial_metadata(await self._answer_headers(result))
        return HttpBody(content_type=JSON, data=_print(shape(result)))

    async def _answer_headers(self, result: jobs_pb2.JobResult) -> list[tuple[str, str]]:
        """The headers a direct Complete's answer carries that the item's result knows
        (not which worker served it, nor how its cache did: x-tokenmesh-worker and
        x-tokenmesh-cache are absent). Without them a client that switched to `wait`
        lost the version it was served by and the signal that it is deprecated."""
        model = result.complete.model
        request_id = result.request_id or result.complete.request_id
        headers = [(REQUEST_ID_HEADER, request_id), (MODEL_VERSION_HEADER, model.version)]
        raw = await self.store.redis.hget(CATALOG_KEY, model.name)
        if raw is not None:
            headers += deprecation_headers(ModelEntry.from_json(model.name, raw), model.version)
        return headers

    async def _result_within(self, job_id: str, wait_s: float) -> jobs_pb2.JobResult | None:
        """Returns the item's result once stored, or None when `wait_s` passed first."""
        deadline = time.monotonic() + wait_s
        pause = FIRST_POLL_S
        while True:
            # One read of both: read one after the other, an item that ended between
            # them showed no result and a final status, and its caller got a 202 for a
            # job that had just answered (seen in CI: `wait=10` answered 202 at once).
            raw, status = await self.store.result_and_status(job_id, 0)
            if raw is not None:
                return jobs_pb2.JobResult.FromString(raw)
            left = deadline - time.monotonic()
            if status in FINAL or left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, MAX_POLL_S)

    async def _accepted(self, job_id: str, context: Context) -> HttpBody:
        await context.send_initial_metadata(
            (
                (contract.HTTP_STATUS_HEADER, "202"),
                ("location", f"/v1/jobs/{job_id}"),
                ("preference-applied", "respond-async"),
            )
        )
        record = await self.store.get(job_id)
        job = views.job_pb(record) if record is not None else jobs_pb2.Job(id=job_id)
        return HttpBody(content_type=JSON, data=_print(job))


def _check_scopes(item: jobs_pb2.JobItem, headers: Mapping[str, str]) -> None:
    """CreateJob's scope check, worded for a Complete (its caller never sent `items[0]`)."""
    try:
        jobs_validation.check_item_scopes([item], headers.get(contract.SCOPES_HEADER, "").split())
    except PermissionDenied as denied:
        if denied.reason != "MISSING_SCOPE":
            raise
        scope = denied.metadata.get("scope", "")
        raise PermissionDenied(
            f"this key lacks the scope {scope!r}, which a Complete needs",
            reason=denied.reason,
            metadata=denied.metadata,
        ) from None
