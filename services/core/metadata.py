"""A call's request metadata, read once per RPC.

grpc.aio's `invocation_metadata()` builds new tuples of new strings from
the C-core's metadata on every call, and an inference RPC from the edge read
it five or six times (caller rules, rate limit, allowed models, routing):
~11% of a worker's GIL time per call in py-spy (`--gil`, ListModels with the
edge's headers). The first read parses it; the result is kept in a context
variable of the RPC's task (each RPC runs in a task of its own), keyed by
the call's context object, so a later read in the same call is a lookup and
a read for another call never sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from services.core import contract


@dataclass(frozen=True)
class RequestMetadata:
    """RequestMetadata is one call's request metadata, parsed.

    Attributes:
        headers: lower-case names to text values (binary `-bin` values left
            out; a repeated name keeps its last value). Shared by every reader
            of the call: never modify it.
        edge_keys: the names (as sent) that carry the edge's prefix, binary
            ones included (only the edge may send any).
    """

    headers: Mapping[str, str]
    edge_keys: tuple[str, ...]


_CURRENT: ContextVar[tuple[object, RequestMetadata] | None] = ContextVar(
    "tokenmesh_request_metadata", default=None
)


def request_metadata(context: Any) -> RequestMetadata:
    """Returns the call's parsed metadata (parsed on the first read in the call)."""
    call = _underlying(context)
    cached = _CURRENT.get()
    if cached is not None and cached[0] is call:
        return cached[1]
    parsed = parse(call.invocation_metadata() or ())
    _CURRENT.set((call, parsed))
    return parsed


def parse(metadata: Sequence[tuple[str, str | bytes]]) -> RequestMetadata:
    """Parses gRPC metadata pairs."""
    headers = {key.lower(): value for key, value in metadata if isinstance(value, str)}
    edge = tuple(key for key, _ in metadata if key.lower().startswith(contract.EDGE_HEADER_PREFIX))
    return RequestMetadata(headers, edge)


def _underlying(context: Any) -> Any:
    """Returns grpc's context under the wrappers that add behaviour to it (each keeps
    the one it wraps as `_context`), so every layer of one call shares one entry."""
    while True:
        inner = getattr(context, "__dict__", {}).get("_context")
        if inner is None:
            return context
        context = inner
