"""A unary answer's response headers, as a gRPC caller inside the mesh reads them.

A service's unary answer sends them in its trailing metadata, named by
contract.RESPONSE_HEADERS_TRAILER (services.core.interceptors, HeadersAtEnd);
the edge lifts them back into the headers for its clients. A large answer
sent them first, as initial metadata; a stream's always are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.core import contract

Metadata = Sequence[tuple[str, Any]] | None


def answer_headers(initial: Metadata, trailing: Metadata) -> dict[str, Any]:
    """Returns the headers of an answer with this initial and trailing metadata."""
    headers = {k: v for k, v in initial or () if k != contract.RESPONSE_HEADERS_TRAILER}
    named = dict(trailing or ()).get(contract.RESPONSE_HEADERS_TRAILER)
    if isinstance(named, str):
        lifted = set(named.split(","))
        headers.update((k, v) for k, v in trailing or () if k in lifted)
    return headers


async def call_headers(call: Any) -> dict[str, Any]:
    """Returns a finished grpc.aio unary call's response headers."""
    return answer_headers(await call.initial_metadata(), await call.trailing_metadata())
