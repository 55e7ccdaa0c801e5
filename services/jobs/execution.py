"""Runs one item on a worker as the job's owner, waiting out backpressure.

The item goes straight to an inference worker over mTLS as the `jobs`
identity, carrying the owner's identity headers (the worker accepts them from
`jobs` only at batch priority and only for a key holding the RPC's scope:
contract.CALLER_RULES), with the stable request id `<job>:<index>`, so the
worker's budgets, limits, permissions and metering apply exactly as if the
owner had sent it, and the usage meter counts a replayed item once.

Backpressure: no worker for the model, a worker's full queue or drain
(UNAVAILABLE), the owner's exhausted token budget (RESOURCE_EXHAUSTED) and
the like make the item wait (RetryInfo's delay, else exponential backoff
with jitter) and try again until the job's deadline; any other status is the
item's result, and so is a RESOURCE_EXHAUSTED that gRPC raised itself (an
answer past the message size limit: `waits`). A call cut by the call timeout
(TOKENMESH_JOBS_CALL_TIMEOUT_SECONDS) is tried again with twice the timeout,
and so on (within the job's deadline): with the same timeout, an item longer
than it ran again and again, each run cut and wasted. Doubling wastes at most
what the run that finishes takes, and an item that only waited in a busy
worker's queue (the worker cannot tell the two apart either) is not failed
for it.

An item for a model version past its sunset (or naming no version of a model
whose versions all are) ends at once with NOT_FOUND and the edge's text for
the same request (`workers.Sunset`): it used to run on a worker still loading
the version, or wait for one until the job expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from services.core import contract
from services.core.identity import ClientChannel
from services.core.pki import IdentityFiles
from services.core.server import MAX_MESSAGE_BYTES
from services.jobs import metrics
from services.jobs.workers import Placement, Sunset, WorkerDirectory
from tokenmesh.inference.v2 import inference_pb2, inference_service_pb2_grpc
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

DetailT = TypeVar("DetailT", bound=Message)
AnswerT = TypeVar("AnswerT")

logger = logging.getLogger(__name__)
# Statuses that mean "not now": the item waits and tries again until its deadline.
WAIT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
# A worker may answer up to the servers' message cap; a client channel accepts only
# 4 MiB unless told otherwise, and an item answered with more failed every try.
WORKER_CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),)


class DeadlinePassed(Exception):
    """DeadlinePassed: the job's deadline came before the item could run."""


@dataclass(frozen=True)
class Backoff:
    """Backoff is how long an item waits between tries.

    Attributes:
        first_s: the first wait; it doubles per try.
        max_s: the longest wait.
    """

    first_s: float = 0.2
    max_s: float = 30.0

    def delay_s(self, tries: int, suggested_s: float | None) -> float:
        """Returns the wait after `tries` tries (>= 1), with +-20% jitter."""
        base = suggested_s if suggested_s else self.first_s * 2.0 ** min(tries - 1, 16)
        return min(self.max_s, base) * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class Outcome:
    """Outcome is an item's result and the tokens it used (prompt, completion, cached)."""

    result: jobs_pb2.JobResult
    usage: tuple[int, int, int]


def call_metadata(
    identity: Mapping[str, str], deadline_s: float | None
) -> tuple[tuple[str, str], ...]:
    """Returns the owner's identity headers as gRPC metadata (empty values left out),
    and until when the item may run again (its job's deadline): the worker keeps its
    budget charge that long, so a re-run is charged once, as it is billed once.

    With no deadline (a worker of an earlier release, which refuses any delegated
    header but the identity ones: _older_worker), the identity headers alone: the
    item's API version (contract.API_VERSION_HEADER) is left out too."""
    identity_headers = tuple(
        (name, value)
        for name, value in identity.items()
        if value and (deadline_s is not None or name in contract.IDENTITY_HEADERS)
    )
    if deadline_s is None:
        return identity_headers
    return (*identity_headers, (contract.REPLAY_UNTIL_HEADER, str(math.ceil(deadline_s))))


def _older_worker(error: grpc.aio.AioRpcError, status: status_pb2.Status | None) -> bool:
    """Tells whether a worker refused the call for its replay header: a worker of the
    release before it (mid-upgrade), which accepts only identity headers from the
    jobs service. Final, the refusal failed every item it was picked for."""
    return (
        error.code() == grpc.StatusCode.PERMISSION_DENIED
        and error_reason(status) == "DELEGATED_HEADER_NOT_ALLOWED"
    )


def error_result(
    index: int,
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    field: str = "",
    metadata: Mapping[str, str] | None = None,
) -> jobs_pb2.JobResult:
    """Returns an item's error result."""
    number = code.value[0] if isinstance(code.value, tuple) else int(code.value)
    error = jobs_pb2.JobError(
        code=code.name,
        message=message,
        reason=reason,
        grpc_code=number,
        field=field,
        metadata=metadata,
    )
    return jobs_pb2.JobResult(index=index, error=error)


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """Returns the google.rpc.Status of a failed call, when it carried one."""
    for key, value in error.trailing_metadata() or ():
        if key == contract.STATUS_DETAILS_HEADER and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def _details(status: status_pb2.Status | None, kind: type[DetailT]) -> Iterator[DetailT]:
    """Yields each of a status's details of type `kind` (none without a status)."""
    for detail in status.details if status is not None else ():
        unpacked = kind()
        if detail.Unpack(unpacked):
            yield unpacked


def error_field(status: status_pb2.Status | None) -> str:
    """Returns the field of a status's first BadRequest violation ("" when none): an
    OpenAI batch line names it as `param`."""
    for bad in _details(status, error_details_pb2.BadRequest):
        if bad.field_violations:
            return str(bad.field_violations[0].field)
    return ""


def error_reason(status: status_pb2.Status | None) -> str:
    """Returns the ErrorInfo reason of a status ("" when none)."""
    info = next(_details(status, error_details_pb2.ErrorInfo), None)
    return "" if info is None else str(info.reason)


def error_metadata(status: status_pb2.Status | None) -> dict[str, str]:
    """Returns the ErrorInfo metadata of a status (empty when none)."""
    info = next(_details(status, error_details_pb2.ErrorInfo), None)
    return {} if info is None else dict(info.metadata)


def retry_delay_s(status: status_pb2.Status | None) -> float | None:
    """Returns the RetryInfo delay of a status, when it has one."""
    info = next(_details(status, error_details_pb2.RetryInfo), None)
    if info is None:
        return None
    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


def waits(error: grpc.aio.AioRpcError, status: status_pb2.Status | None) -> bool:
    """Whether a failed call means "not now" (the item tries again) rather than a result.

    A RESOURCE_EXHAUSTED from a worker (a full queue, a limit, a spent budget) carries
    an ErrorInfo or a RetryInfo; one with neither is gRPC's own, raised here: a message
    past a size limit, which fails again however long the item waits.
    """
    code = error.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        has_info = next(_details(status, error_details_pb2.ErrorInfo), None) is not None
        return has_info or retry_delay_s(status) is not None
    return code in WAIT_CODES


def usage_of(usage: inference_pb2.Usage) -> tuple[int, int, int]:
    """Returns (prompt, completion, cached) tokens of a v2 Usage."""
    return usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens


class ItemExecutor:
    """ItemExecutor sends items to workers.

    Args:
        directory: where the workers are.
        files: this service's certificate (None: plaintext, development only).
        backoff: waits between tries.
        call_timeout_s: an item's first call's timeout (doubled after each call it cuts).
    """

    def __init__(
        self,
        directory: WorkerDirectory,
        files: IdentityFiles | None,
        backoff: Backoff,
        call_timeout_s: float,
    ) -> None:
        self.directory = directory
        self.files = files
        self.backoff = backoff
        self.call_timeout_s = call_timeout_s
        self.waiting = 0  # items backing off now (no worker, a refusal to retry later)
        self._channels: dict[tuple[str, str], ClientChannel] = {}

    async def close(self) -> None:
        """Closes every worker channel."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    def _stub(self, placement: Placement) -> inference_service_pb2_grpc.InferenceServiceAsyncStub:
        # The worker must hold its registration's pool's certificate (`worker-<pool>`
        # names itself; every worker certificate names `worker`), as the edge checks.
        key = (placement.address, placement.pool)
        channel = self._channels.get(key)
        if channel is None:
            peer = contract.worker_identity(placement.pool)
            channel = self._channels[key] = ClientChannel(
                placement.address, self.files, peer, WORKER_CHANNEL_OPTIONS
            )
        return inference_service_pb2_grpc.InferenceServiceStub(channel.get())

    async def run(
        self,
        item: jobs_pb2.JobItem,
        index: int,
        request_id: str,
        identity: Mapping[str, str],
        deadline_s: float,
        slot: contextlib.AbstractAsyncContextManager[Any] | None = None,
    ) -> Outcome:
        """Runs an item until it has a result; raises DeadlinePassed when time ran out.

        slot: held around each call to a worker, not while the item waits (no worker
        for its model, a spent budget, a refusal to retry later): held across the
        waits, a few such items took every slot of the replica, and every other
        tenant's items waited behind them until their jobs' deadlines.
        """
        tries = 0
        call_timeout_s = self.call_timeout_s
        older: set[str] = set()  # workers that refused the replay header (_older_worker)
        while True:
            remaining = deadline_s - time.time()
            if remaining <= 0:
                raise DeadlinePassed()
            tries += 1
            try:
                placement = await self.directory.pick(_model_of(item), request_id)
            except Sunset as retired:  # final: no wait brings the version back
                refused = error_result(index, grpc.StatusCode.NOT_FOUND, str(retired))
                return Outcome(refused, (0, 0, 0))
            if placement is None:
                await self._wait(tries, None, deadline_s)
                continue
            try:
                async with slot or contextlib.nullcontext():
                    remaining = max(0.001, deadline_s - time.time())
                    timeout_s = min(remaining, call_timeout_s)
                    bound = placement.address not in older
                    metadata = call_metadata(identity, deadline_s if bound else None)
                    return await self._call(placement, item, index, request_id, metadata, timeout_s)
            except grpc.aio.AioRpcError as error:
                status = status_details(error)
                if placement.address not in older and _older_worker(error, status):
                    older.add(placement.address)  # tried again at once, without the header
                    continue
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    call_timeout_s *= 2  # the next try gets twice as long (see module)
                if not waits(error, status):
                    failed = error_result(
                        index,
                        error.code(),
                        error.details() or "",
                        error_reason(status),
                        error_field(status),
                        error_metadata(status),
                    )
                    return Outcome(failed, (0, 0, 0))
                logger.debug("item %s waits: %s", request_id, error.code().name)
                await self._wait(tries, retry_delay_s(status), deadline_s)

    async def _wait(self, tries: int, suggested_s: float | None, deadline_s: float) -> None:
        delay = self.backoff.delay_s(tries, suggested_s)
        self.waiting += 1
        metrics.ITEMS_WAITING.inc()
        try:
            await asyncio.sleep(max(0.0, min(delay, deadline_s - time.time())))
        finally:
            self.waiting -= 1
            metrics.ITEMS_WAITING.dec()

    async def _call(
        self,
        placement: Placement,
        item: jobs_pb2.JobItem,
        index: int,
        request_id: str,
        metadata: Sequence[tuple[str, str]],
        timeout: float,
    ) -> Outcome:
        stub = self._stub(placement)
        kind = item.WhichOneof("request")
        if kind == "embed":
            embed = v2.EmbedRequest()
            embed.CopyFrom(item.embed)
            embed.request_id = request_id
            embed.version = placement.version
            response = await kept_answer(stub.Embed(embed, metadata=metadata, timeout=timeout))
            return Outcome(
                jobs_pb2.JobResult(index=index, embed=response), usage_of(response.usage)
            )
        # Generate and Complete share their fields (same numbers): a Generate
        # item runs as Complete, its stream collected into one response.
        source = item.complete if kind == "complete" else item.generate
        complete = v2.CompleteRequest.FromString(source.SerializeToString())
        complete.request_id = request_id
        complete.version = placement.version
        complete.priority = inference_pb2.PRIORITY_BATCH
        answer = await kept_answer(stub.Complete(complete, metadata=metadata, timeout=timeout))
        result = jobs_pb2.JobResult(index=index)
        (result.complete if kind == "complete" else result.generate).CopyFrom(answer)
        return Outcome(result, usage_of(answer.usage))


async def kept_answer(call: grpc.aio.UnaryUnaryCall[Any, AnswerT]) -> AnswerT:
    """Awaits a worker's answer to `call`; an answer that arrived before a cancel is kept.

    The worker meters an answer once it has sent it. Awaited plainly, a cancel (the
    job stopping, the entry taken over) that landed after the answer arrived but
    before this task next ran threw it away: the item ran again from the start (its
    whole cost again) or its stopped job ended without a result its owner paid for.
    A call not answered yet is cut (a cut call is billed nothing) and the cancel goes
    on; so does one whose call ended in an error, as no result is lost then.
    """
    task = asyncio.current_task()
    assert task is not None  # awaited in a task
    cancelling = task.cancelling()
    waiting = asyncio.ensure_future(call)
    absorbed = False
    while True:
        try:
            answer = await asyncio.shield(waiting)
        except asyncio.CancelledError:
            # Cut, not answered: by this cancel, or under it (its channel closed, the
            # loop's shutdown cancelled gRPC's own response task; then `waiting` never
            # answers, and going round again spun without ever yielding).
            if not call.done() or waiting.cancelled():
                call.cancel()
                raise
            absorbed = True  # answered: its result is a loop turn or two away
            continue
        except Exception:
            if absorbed:  # no answer to keep: the cancel goes on
                raise asyncio.CancelledError from None
            raise
        break
    while task.cancelling() > cancelling:
        task.uncancel()  # every cancel since (two in one turn raise once): the item finished
    return answer


def _model_of(item: jobs_pb2.JobItem) -> tuple[str, str]:
    kind = item.WhichOneof("request")
    request = getattr(item, kind) if kind else None
    if request is None:
        return "", ""
    return str(request.model), str(request.version)
