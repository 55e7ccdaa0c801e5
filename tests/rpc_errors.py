"""What a failed gRPC call's google.rpc status says: the fields its BadRequest names."""

from __future__ import annotations

import json
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.core import contract


def bad_request_fields(status: status_pb2.Status | None) -> list[str]:
    """Returns the fields every BadRequest detail of `status` names ([] if none)."""
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """Returns the fields a failed call's BadRequest names; fails if it has none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields = bad_request_fields(status)
    assert fields, "no BadRequest detail"
    return fields


async def failed_call_fields(call: Any) -> tuple[grpc.StatusCode, list[str]]:
    """Awaits a call that must fail; returns its code and the fields its BadRequest names."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    status = await rpc_status.aio.from_call(call)
    return info.value.code(), bad_request_fields(status)


async def failed_call_reason(call: Any) -> tuple[grpc.StatusCode, str]:
    """Awaits a call that must fail; returns its code and its ErrorInfo's reason ("": none)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    status = await rpc_status.aio.from_call(call)
    for detail in status.details if status is not None else ():
        error_info = error_details_pb2.ErrorInfo()
        if detail.Unpack(error_info):
            return info.value.code(), error_info.reason
    return info.value.code(), ""


async def openai_refusal(call: Any) -> tuple[grpc.StatusCode, dict[str, Any]]:
    """Awaits an OpenAI-surface call that must fail before any message; returns its code
    and the OpenAI error JSON its trailers carry (as the edge reads it)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pytest.fail("no message expected before the error")
        else:
            await call
    trailers = dict(info.value.trailing_metadata() or ())
    assert contract.OPENAI_ERROR_HEADER in trailers, trailers
    return info.value.code(), dict(json.loads(trailers[contract.OPENAI_ERROR_HEADER])["error"])
