"""A thin asyncio client for the tokenmesh edge (or a worker, directly).

Example::

    async with Client("127.0.0.1:8080") as client:
        async for message in client.generate("deterministic-test", "hello", max_tokens=8):
            print(message.text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc


class TokenmeshRpcError(Exception):
    """TokenmeshRpcError is a failed call with its google.rpc details decoded.

    Attributes:
        code: the gRPC status code.
        message: the server's client-safe message.
        reason: the ErrorInfo reason (UPPER_SNAKE), or "".
        field_violations: (field, description) pairs from BadRequest.
        retry_after_s: the RetryInfo delay in seconds, when the server sent one.
    """

    def __init__(self, error: grpc.aio.AioRpcError, status: Any) -> None:
        self.code = error.code()
        self.message = error.details() or ""
        self.reason = ""
        self.field_violations: list[tuple[str, str]] = []
        self.retry_after_s: float | None = None
        for detail in status.details if status is not None else ():
            self._absorb(detail)
        super().__init__(f"{self.code.name}: {self.message}")

    def _absorb(self, detail: Any) -> None:
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            self.reason = info.reason
        elif detail.Unpack(bad_request):
            self.field_violations = [(v.field, v.description) for v in bad_request.field_violations]
        elif detail.Unpack(retry):
            self.retry_after_s = retry.retry_delay.ToMilliseconds() / 1000


async def _raise_decoded(error: grpc.aio.AioRpcError) -> None:
    trailers = error.trailing_metadata() or ()
    status = None
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            status = rpc_status.status_pb2.Status.FromString(value)  # type: ignore[attr-defined]
    raise TokenmeshRpcError(error, status) from None


class Client:
    """Client calls InferenceService over one shared channel.

    Args:
        target: host:port of the edge or a worker.
        token: a JWT or API key sent as `authorization: Bearer ...`, if any.
        timeout_s: the per-call deadline.
    """

    def __init__(self, target: str, *, token: str | None = None, timeout_s: float = 60.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = rpc.InferenceServiceStub(self._channel)
        self._metadata: Sequence[tuple[str, str]] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._timeout_s = timeout_s

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def list_models(self) -> pb.ListModelsResponse:
        """Returns the served models."""
        try:
            return await self._stub.ListModels(
                pb.ListModelsRequest(), metadata=self._metadata, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            await _raise_decoded(error)
            raise

    async def complete(self, model: str, prompt: str, **fields: Any) -> pb.CompleteResponse:
        """Returns a whole completion; `fields` are CompleteRequest fields."""
        request = pb.CompleteRequest(model=model, prompt=prompt, **fields)
        try:
            return await self._stub.Complete(
                request, metadata=self._metadata, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            await _raise_decoded(error)
            raise

    async def generate(
        self, model: str, prompt: str, **fields: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Streams a generation; `fields` are GenerateRequest fields."""
        request = pb.GenerateRequest(model=model, prompt=prompt, **fields)
        call = self._stub.Generate(request, metadata=self._metadata, timeout=self._timeout_s)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            await _raise_decoded(error)
            raise
